#!/usr/bin/env bash
# pack.sh - build the one archive that gives the offline GPU host what its image lacks for ppoflow:
# DeepSpeed, Prefect (no web UI), a slim Ray and a slim vLLM for Hopper (sm_90), with what they need.
#
# Usage (from anywhere; needs a Python 3.12, network access to PyPI, strip, xz):
#   bash gpu/pack.sh [OUTDIR]            default OUTDIR: .carry at the repo root (git-ignored)
# Result, ready to travel with the repo (bench/gpu_run.sh unpacks it there):
#   OUTDIR/ppoflow-gpu-site.tar.xz       ONE xz tarball of a site-packages folder (unpack anywhere, put on PYTHONPATH)
#   OUTDIR/SHA256SUMS  OUTDIR/MANIFEST.txt (versions, options, removals with their sizes)  OUTDIR/SIZES.txt
# gpu/README.md says what is in it, every removal and why, and how to install it by hand.
#
# Why a folder and not wheels: the host's one transfer is 64 MiB with the repo, and the stack does not fit as wheels
# (vLLM's alone is 239 MiB). Installed, stripped and pruned, then xz'd as one stream, packages that share code or
# text (Ray's three binaries share most of theirs) compress far better than zip files one by one.
#
# Idempotent: the scratch folder keeps the build venv, the DeepSpeed wheel and every downloaded wheel; a re-run
# rebuilds the site folder (a minute) and skips xz (minutes) when the tar it would compress is byte-identical.
#
# Environment knobs [defaults]:
#   PY312       a Python 3.12 [python3.12, else a pyenv 3.12]     SCRATCH  scratch folder [${TMPDIR:-/tmp}/ppoflow-pack]
#   RELOCK=1    resolve the versions again and rewrite gpu/requirements.lock (and -trl.lock) [use the locks]
#   WITH_TRL=1  also carry TRL and what it needs the image lacks (for bench/trl_compare.py on the GPU) [0]
#   KEEP_QUANT=1  keep vLLM's quantization/MoE/Mamba/MLA GPU kernels (+~11 MiB) [0: zeroed, see gpu/README.md]
#   ATTN=triton   also drop FlashAttention-3 (-~5 MiB; vLLM then needs attention backend TRITON_ATTN) [fa3]
#   XZ_OPTS     [-9e]
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")
OUTDIR=${1:-$REPO/.carry}
SCRATCH=${SCRATCH:-${TMPDIR:-/tmp}/ppoflow-pack}
WITH_TRL=${WITH_TRL:-0}
KEEP_QUANT=${KEEP_QUANT:-0}
ATTN=${ATTN:-fa3}
XZ_OPTS=${XZ_OPTS:--9e}

DEEPSPEED_VERSION=0.19.8   # the CPU pin (pyproject.toml)
PREFECT_VERSION=3.7.7      # the CPU pin; 3.9 needs a fastapi that vLLM refuses
RAY_VERSION=2.60.0         # the CPU pin
VLLM_VERSION=0.25.1        # the vLLM that pins the image's torch (2.11.0) and links its CUDA 13
TRL_VERSION=1.16.0         # newest TRL whose requirements take transformers 5.17 and vllm 0.25.1 (<=0.31, >=0.22)
LIMIT=$((64 * 1024 * 1024))  # one transfer to the GPU host, the repo included

# What the resolution starts from. vLLM's own requirements are not resolved whole (flashinfer, xgrammar, CUDA wheels,
# torchvision, ... ~5 GB): only those it imports on the LLM.generate path and the image lacks, with vLLM 0.25.1's
# specifiers. DeepSpeed's come from its wheel's metadata (below).
ROOTS=("prefect==$PREFECT_VERSION" "fastapi>=0.133,<0.137" "ray==$RAY_VERSION"
       "pydantic>=2.12.0" "msgspec" "pyzmq>=25.0.0" "cachetools" "cbor2" "blake3" "openai>=2.0.0"
       "openai-harmony>=0.0.3" "pybase64" "partial-json-parser" "starlette>=1.0.1" "setproctitle" "depyf==0.20.0")
# In the image, but sent anyway: its versions may be older than what is sent needs (pydantic and pydantic-core want
# typing-extensions >= 4.16, openai and its httpx2 anyio >= 4.10 and idna >= 3.18, fastapi annotated-doc; certifi and
# python-dateutil came with Prefect in the earlier wheel pack). All small and pure Python.
KEEP_ANYWAY=(typing-extensions anyio idna annotated-doc certifi python-dateutil)
# Prefect requires them, ppoflow never reaches them: notifications (apprise, and its OAuth helpers) and Docker
# (docker: infrastructure blocks and `prefect dev`). Both are imported inside the functions that use them.
EXCLUDE=(apprise requests-oauthlib oauthlib docker)

PLAT=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none)
# pip matches each manylinux_2_N tag exactly: list every N a wheel here may carry (the host has glibc >= 2.34).
for tag in manylinux_2_34 manylinux_2_28 manylinux_2_27 manylinux_2_26 manylinux_2_24 manylinux_2_17 manylinux2014 \
           manylinux_2_5 manylinux1; do PLAT+=(--platform "${tag}_x86_64"); done
PLAT+=(--platform any)

log() { printf '\n== %s\n' "$*" >&2; }
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

mkdir -p "$OUTDIR" "$SCRATCH/wheels"
OUTDIR=$(cd "$OUTDIR" && pwd)
WHEELS=$SCRATCH/wheels
SITE=$SCRATCH/site

# --- build venv ------------------------------------------------------------------------------------------------
PY312=${PY312:-python3.12}
if ! "$PY312" -V >/dev/null 2>&1; then
    for cand in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12; do [ -x "$cand" ] && PY312=$cand; done
fi
"$PY312" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null \
    || { echo "pack.sh: needs a Python 3.12 (set PY312=...); '$PY312' is not one" >&2; exit 1; }
for tool in strip xz tar; do
    command -v $tool >/dev/null || { echo "pack.sh: '$tool' is missing here (binutils, xz-utils)" >&2; exit 1; }
done
VENV=$SCRATCH/venv312
# The machine's own pip constraints (a local torch cap, say) have no say in what the GPU host gets.
export PIP_CONSTRAINT= PIP_DISABLE_PIP_VERSION_CHECK=1
PIP=("$VENV/bin/python" -m pip)
if [ ! -x "$VENV/bin/python" ]; then "$PY312" -m venv "$VENV"; fi
if ! "$VENV/bin/python" -c 'import zstandard' 2>/dev/null; then
    # zstandard: prune_fatbin.py reads the kernel names in CUDA 13's compressed GPU code
    "${PIP[@]}" install -q --upgrade 'pip>=24' zstandard
fi

# --- DeepSpeed: PyPI has only the sdist; DS_BUILD_OPS=0 makes a pure wheel whose CUDA ops JIT-build on first use ---
DS_WHEEL=$SCRATCH/deepspeed/deepspeed-$DEEPSPEED_VERSION-py3-none-any.whl
if [ ! -f "$DS_WHEEL" ]; then
    log "deepspeed $DEEPSPEED_VERSION wheel (no prebuilt ops)"
    rm -rf "$SCRATCH/deepspeed"
    DS_BUILD_OPS=0 DS_ACCELERATOR=cuda "${PIP[@]}" wheel -q --no-deps --no-binary deepspeed \
        -w "$SCRATCH/deepspeed" "deepspeed==$DEEPSPEED_VERSION"
fi
mapfile -t DS_REQS < <("$VENV/bin/python" - "$DS_WHEEL" <<'EOF'
import sys, zipfile
from email.parser import Parser
z = zipfile.ZipFile(sys.argv[1])
meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
for req in meta.get_all("Requires-Dist") or []:
    if "extra ==" not in req and not req.lower().startswith("torch"):  # torch: the image's
        print(req)
EOF
)

# --- the locks: exact versions of everything sent (committed, so a rebuild gets the same set) ---------------------
lock() {  # lock OUT_FILE REPORT [carry_lock.py options] --roots SPEC...
    local out=$1 report=$2; shift 2
    "$VENV/bin/python" "$HERE/carry_lock.py" "$report" "$HERE/image-packages.txt" \
        --always "${KEEP_ANYWAY[@]}" --exclude "${EXCLUDE[@]}" "$@" >"$out.tmp"
    { echo "# gpu/pack.sh's lock: what the GPU host is sent besides deepspeed (built from its sdist) and vllm."
      echo "# Written by RELOCK=1 bash gpu/pack.sh on $(date -u +%F); edit the script, not this file."
      cat "$out.tmp"; } >"$out"
    rm -f "$out.tmp"
}
if [ "${RELOCK:-0}" = 1 ] || [ ! -f "$HERE/requirements.lock" ]; then
    log "resolving: ${ROOTS[*]} ${DS_REQS[*]}"
    "${PIP[@]}" install -q --dry-run --ignore-installed --only-binary=:all: --report "$SCRATCH/resolve.json" \
        "${ROOTS[@]}" "${DS_REQS[@]}" "${KEEP_ANYWAY[@]}"
    lock "$HERE/requirements.lock" "$SCRATCH/resolve.json" --roots "${ROOTS[@]}" "${DS_REQS[@]}" "${KEEP_ANYWAY[@]}"
fi
if [ "$WITH_TRL" = 1 ] && { [ "${RELOCK:-0}" = 1 ] || [ ! -f "$HERE/requirements-trl.lock" ]; }; then
    log "resolving trl==$TRL_VERSION against the main lock"
    grep -v '^#' "$HERE/requirements.lock" >"$SCRATCH/constraints.txt"
    "${PIP[@]}" install -q --dry-run --ignore-installed --only-binary=:all: --report "$SCRATCH/resolve-trl.json" \
        -c "$SCRATCH/constraints.txt" "trl==$TRL_VERSION"
    lock "$HERE/requirements-trl.lock" "$SCRATCH/resolve-trl.json" --constraints "$HERE/requirements.lock" \
        --roots "trl==$TRL_VERSION"
fi
LOCKS=("$HERE/requirements.lock")
[ "$WITH_TRL" = 1 ] && LOCKS+=("$HERE/requirements-trl.lock")

# --- download (pip skips files already in $WHEELS) ------------------------------------------------------------
log "downloading wheels for cp312 manylinux x86_64 into $WHEELS"
REQS=$SCRATCH/requirements.txt
{ cat "${LOCKS[@]}"; echo "vllm==$VLLM_VERSION"; } | grep -v '^#' >"$REQS"
"${PIP[@]}" download -q --no-deps "${PLAT[@]}" -d "$WHEELS" -r "$REQS"

# --- install into one folder ----------------------------------------------------------------------------------
log "installing into $SITE"
rm -rf "$SITE"
"${PIP[@]}" install -q --no-deps --no-compile --no-index --find-links "$WHEELS" "${PLAT[@]}" --target "$SITE" \
    -r "$REQS" "$DS_WHEEL"
declare -A UNPACKED
for c in vllm ray deepspeed prefect; do UNPACKED[$c]=$(du -sb "$SITE/$c" | cut -f1); done
UNPACKED[site]=$(du -sb "$SITE" | cut -f1)

# --- removals: each one is listed in MANIFEST.txt with its size and in gpu/README.md with its reason --------------
REMOVED=$SCRATCH/removed.txt
: >"$REMOVED"
drop() {  # drop REASON PATH... (relative to $SITE, globs allowed): one MANIFEST line per call
    local reason=$1 p bytes; shift
    local -a hits=()
    for p in "$@"; do
        mapfile -t -O ${#hits[@]} hits < <(cd "$SITE" && compgen -G "$p")
        # A pattern that matches nothing means a new version moved things: the removals need a look.
        [ ${#hits[@]} -gt 0 ] || { echo "pack.sh: nothing matches '$p' in the site: update the removals" >&2; exit 1; }
    done
    bytes=$(cd "$SITE" && du -scb "${hits[@]}" | tail -1 | cut -f1)
    (cd "$SITE" && rm -rf "${hits[@]}")
    local what="$*"
    [ $# -le 6 ] || what="$1 $2 $3 ... ($# paths)"
    printf '%9.1f MiB  %s: %s\n' "$(mib "$bytes")" "$reason" "$what" >>"$REMOVED"
}
log "removing what ppoflow does not use on the GPU host"
drop "console scripts: they name this machine's interpreter" bin
drop "Prefect's web UI builds (PREFECT_UI_ENABLED=false on the host)" prefect/server/ui prefect/server/ui-v2
drop "Ray's Java jars (no Java workers)" ray/jars
drop "Ray's dashboard web UI build (ray.init(include_dashboard=False))" ray/dashboard/client/build
drop "Ray libraries ppoflow does not import (RLlib, Tune, Train, Serve, Data, LLM)" \
    ray/rllib ray/tune ray/train ray/serve ray/data ray/llm
drop "vLLM: FlashAttention-2 (sm_80 path; Hopper runs FlashAttention-3)" vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so
drop "vLLM: Rust HTTP front end (serving only)" vllm/vllm-rs
drop "vLLM: DeepGEMM and Blackwell FMHA sources/builds (FP8 GEMM, sm_100)" vllm/third_party/deep_gemm \
    vllm/third_party/fmha_sm100
drop "vLLM: FlashMLA kernels (DeepSeek MLA; import guarded)" vllm/_flashmla_C.abi3.so \
    vllm/_flashmla_extension_C.abi3.so
drop "vLLM: FP4 quantization kernels (import guarded)" vllm/_qutlass_C.abi3.so
drop "vLLM: fused-MoE kernels (dense models only; import guarded)" vllm/_moe_C_stable_libtorch.abi3.so
drop "vLLM: tool-call parser for serving" vllm/_rust_tool_parser.abi3.so
drop "vLLM: KV-cache offload to files" vllm/fs_io_C.abi3.so
drop "vLLM: benchmark scripts and the API server's Swagger UI" vllm/benchmarks \
    vllm/entrypoints/serve/instrumentator/static
if [ "$ATTN" = triton ]; then
    drop "vLLM: FlashAttention-3 (ATTN=triton: attention backend TRITON_ATTN)" vllm/vllm_flash_attn/_vllm_fa3_C.abi3.so
fi
# Tests shipped inside Ray, bytecode (--no-compile leaves little), RECORD files (hashes that no longer match).
mapfile -t extra < <(cd "$SITE" && { find ray -type d -name tests -prune; find . -type d -name __pycache__ -prune;
                                    ls -d ./*.dist-info/RECORD; } | sed 's#^\./##')
drop "tests, __pycache__, RECORD" "${extra[@]}"

# vLLM's structured-output backends annotate dataclass fields with xgrammar/llguidance types, which imports them at
# class creation; postponed annotations make them load only when structured output is asked for (neither is sent).
for f in vllm/v1/structured_output/backend_xgrammar.py vllm/v1/structured_output/backend_guidance.py; do
    if ! grep -q '^from __future__ import annotations' "$SITE/$f"; then
        sed -i '1i from __future__ import annotations' "$SITE/$f"
    fi
done

# --- shrink native code -----------------------------------------------------------------------------------------
log "stripping symbols from every ELF file; zeroing GPU code an sm_90 GPU cannot (or need not) run"
stripped_before=$(du -sb "$SITE" | cut -f1)
"$VENV/bin/python" - "$SITE" <<'PY' | xargs -0 -r strip --strip-unneeded
import os, sys
for root, _, files in os.walk(sys.argv[1]):
    for f in files:
        path = os.path.join(root, f)
        if not os.path.islink(path) and open(path, "rb").read(4) == b"\x7fELF":
            print(path, end="\0")
PY
printf '%9.1f MiB  %s\n' "$(mib $((stripped_before - $(du -sb "$SITE" | cut -f1))))" \
    "symbol tables and debug info (strip --strip-unneeded): every ELF file, *.so and Ray's binaries" >>"$REMOVED"
# Kernel families a dense bf16 model never launches: GPTQ/AWQ/Marlin/Machete/AllSpark weight quantization, FP8/INT8
# scaled GEMMs and quant fusions, Mamba's selective scan, MoE routing/grouped GEMM, DeepSeek MLA, Hadamard transforms.
QUANT_FAMILIES=(marlin machete gptq awq allspark ScaledEpilogue Float8 float_e4m3 e4m3 e5m2 fp8 int8 selective_scan
                hadamard group_gemm router_gemm moe mla nvfp4 _fp4 w4a8 w8a8)
QUANT_KERNELS=$(IFS='|'; echo "${QUANT_FAMILIES[*]}")
prune_args=()
[ "$KEEP_QUANT" = 1 ] || prune_args=(--drop-kernels "$QUANT_KERNELS")
find "$SITE/vllm" -name '*.so' -print0 | xargs -0 "$VENV/bin/python" "$HERE/prune_fatbin.py" "${prune_args[@]}" \
    | sed 's#^'"$SITE"'/##' >"$SCRATCH/pruned.txt"
cat "$SCRATCH/pruned.txt" >&2

# --- manifest, then ONE tarball -----------------------------------------------------------------------------------
versions() {
    "$VENV/bin/python" -c 'import sys, importlib.metadata as m
for d in sorted(m.distributions(path=[sys.argv[1]]), key=lambda d: d.metadata["Name"].lower()):
    print(d.metadata["Name"], d.version)' "$SITE"
}
{
    echo "ppoflow GPU site (gpu/pack.sh), for Python 3.12 x86-64 with the image's torch 2.11.0+cu130, sm_90 GPUs only."
    echo "Options: WITH_TRL=$WITH_TRL KEEP_QUANT=$KEEP_QUANT ATTN=$ATTN"
    echo "Use: PYTHONPATH=<this folder> VLLM_USE_FLASHINFER_SAMPLER=0 PREFECT_UI_ENABLED=false (see gpu/env.sh)"
    echo; echo "Packages:"; versions | sed 's/^/  /'
    echo; echo "Not sent although Prefect requires them: ${EXCLUDE[*]}"
    echo; echo "Removed after install (MiB unpacked):"; cat "$REMOVED"
    echo; echo "GPU code per vLLM library (prune_fatbin.py):"; sed 's/^/  /' "$SCRATCH/pruned.txt"
} >"$SITE/PPOFLOW_GPU_SITE.txt"
cp "$SITE/PPOFLOW_GPU_SITE.txt" "$OUTDIR/MANIFEST.txt"

ARCHIVE=$OUTDIR/ppoflow-gpu-site.tar.xz
# Deterministic tar (sorted names, fixed times and owners): the same site gives the same bytes, so an unchanged
# rebuild skips xz, and the host's stamp (the archive's sha256) only changes when the content does.
tar_site() { tar -C "$SITE" --sort=name --mtime=2026-01-01 --owner=0 --group=0 --numeric-owner -cf - .; }
tar_sum=$(tar_site | sha256sum | cut -d' ' -f1)
STAMP=$OUTDIR/.ppoflow-gpu-site.tarsum   # beside the archive: another OUTDIR's build must not vouch for this one
if [ -f "$ARCHIVE" ] && [ "$(cat "$STAMP" 2>/dev/null)" = "$tar_sum $XZ_OPTS" ]; then
    log "archive unchanged: $ARCHIVE"
else
    log "xz $XZ_OPTS (single-threaded: one stream compresses best; several minutes)"
    tar_site | xz $XZ_OPTS -T1 >"$ARCHIVE.tmp"
    mv "$ARCHIVE.tmp" "$ARCHIVE"
    echo "$tar_sum $XZ_OPTS" >"$STAMP"
fi
(cd "$OUTDIR" && sha256sum "$(basename "$ARCHIVE")" >SHA256SUMS)

# --- size table ---------------------------------------------------------------------------------------------------
archive_b=$(stat -c %s "$ARCHIVE")
repo_b=$(cd "$REPO" && git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
site_b=$(du -sb "$SITE" | cut -f1)
{
    printf '%-46s %10s %10s\n' "component (unpacked)" "installed" "sent"
    for c in vllm ray deepspeed prefect; do
        printf '%-46s %8s M %8s M\n' "$c/" "$(mib "${UNPACKED[$c]}")" "$(mib "$(du -sb "$SITE/$c" | cut -f1)")"
    done
    if [ "$WITH_TRL" = 1 ]; then
        printf '%-46s %10s %8s M\n' "trl/ + datasets/ + multiprocess/" "" \
            "$(mib "$(cd "$SITE" && du -scb trl datasets multiprocess | tail -1 | cut -f1)")"
    fi
    printf '%-46s %8s M %8s M\n' "site folder, all $(ls -d "$SITE"/*.dist-info | wc -l) packages" \
        "$(mib "${UNPACKED[site]}")" "$(mib "$site_b")"
    printf '%-46s %21s M\n' "archive $(basename "$ARCHIVE") (xz $XZ_OPTS)" "$(mib "$archive_b")"
    printf '%-46s %21s M\n' "repo tracked files" "$(mib "$repo_b")"
    printf '%-46s %21s M   (%s MiB limit: %s)\n' "archive + repo" "$(mib $((archive_b + repo_b)))" \
        "$(mib $LIMIT)" "$([ $((archive_b + repo_b)) -le $LIMIT ] && echo fits || echo OVER)"
} | tee "$OUTDIR/SIZES.txt" >&2
[ $((archive_b + repo_b)) -le $LIMIT ] || { echo "pack.sh: archive + repo exceed one transfer" >&2; exit 1; }
log "done: $OUTDIR"
