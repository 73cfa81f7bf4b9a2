# env.sh - ppoflow's environment on the offline GPU host: unpack the carried site once, export what it needs.
#
# Source it from bash, in a working tree that holds the archive gpu/pack.sh made (.carry/ppoflow-gpu-site.tar.xz),
# then run anything in that environment:
#   source gpu/env.sh && python3 -c 'import vllm, deepspeed, ray, prefect'
#   source gpu/env.sh && python3 -m pytest -q -m gpu tests/workers
# bench/gpu_run.sh sources it before it runs a script.
#
# The archive goes into SITE once; a later source finds the same archive's stamp there and only exports (the
# host's disk outlives calls while the machine stays warm). A different archive replaces the folder whole.
# Knobs: CARRY [<repo>/.carry]  SITE [${TMPDIR:-/tmp}/ppoflow-site]  PYTHON [python3]
# Sourced, so it returns (never exits) on an error, leaving the shell as it was.

_ppoflow_env() {
    local repo carry archive stamp python
    repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    carry=${CARRY:-$repo/.carry}
    archive=$carry/ppoflow-gpu-site.tar.xz
    python=${PYTHON:-python3}
    SITE=${SITE:-${TMPDIR:-/tmp}/ppoflow-site}
    if [ ! -f "$archive" ]; then
        echo "gpu/env.sh: no $archive; build it where PyPI is reachable (bash gpu/pack.sh) and carry .carry/" >&2
        return 1
    fi
    stamp=$(sha256sum "$archive" | cut -d' ' -f1)
    if [ -f "$carry/SHA256SUMS" ] && ! grep -q "^$stamp " "$carry/SHA256SUMS"; then
        echo "gpu/env.sh: $archive does not match $carry/SHA256SUMS (a broken copy?)" >&2
        return 1
    fi
    if [ "$(cat "$SITE/.ppoflow-stamp" 2>/dev/null)" != "$stamp" ]; then
        local t0=$SECONDS
        # Into a fresh folder beside SITE, renamed at the end: an interrupted unpack is never taken for a done one.
        rm -rf "$SITE" "$SITE.partial" && mkdir -p "$SITE.partial" || return 1
        if command -v xz >/dev/null; then
            xz -dc "$archive" | tar -x -C "$SITE.partial" || return 1
        else
            "$python" -c 'import lzma, sys, tarfile
tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' \
                "$archive" "$SITE.partial" || return 1
        fi
        echo "$stamp" >"$SITE.partial/.ppoflow-stamp"
        mv "$SITE.partial" "$SITE" || return 1
        echo "gpu/env.sh: unpacked $(basename "$archive") into $SITE in $((SECONDS - t0)) s" >&2
    fi

    # The site first (its pydantic, fastapi, ... are newer than the image's), then the repo: ppoflow is not
    # installed. Ray's workers inherit the environment, so every actor sees the same packages.
    export SITE PYTHONPATH="$SITE:$repo${PYTHONPATH:+:$PYTHONPATH}"
    export VLLM_USE_FLASHINFER_SAMPLER=0    # FlashInfer is not carried; vLLM's default sampler would import it
    export CUDA_MODULE_LOADING=LAZY         # the carried vLLM has zeroed kernels: load each only when it is used
    export PREFECT_UI_ENABLED=false         # the carried Prefect has no web UI
    export PREFECT_SERVER_ANALYTICS_ENABLED=false
    # The ephemeral API server (SQLite) took 21 s to start on an H100 host once, past its default of 20 s.
    export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=${PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS:-180}
    # The image's 9.0a breaks DeepSpeed's op builder; 9.0 works. The trainers use a torch optimizer, but an op that
    # is JIT-built (FusedAdam, say) must not fail on this.
    export TORCH_CUDA_ARCH_LIST=9.0
    export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/ppoflow-torch-extensions}
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/ppoflow-triton}
    # Nothing is downloaded at run time, and the host cannot reach anything anyway: fail fast rather than time out.
    export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
}
_ppoflow_env
