#!/usr/bin/env bash
# gpu_run.sh - run bench/gpu_ppo.py on the offline GPU host: install the carried wheels, then the benchmark.
#
# Usage, from the repo root of a working tree that carries .whl/ (the folder gpu/pack-gpu-wheels.sh writes):
#   bash bench/gpu_run.sh [gpu_ppo.py arguments, e.g. --iterations 3 --prompts 64 --max-new-tokens 128]
#   bash bench/gpu_run.sh bench/learning.py [learning.py arguments]   (another script: name it first)
#
# The image has torch, transformers, pyarrow, fsspec, safetensors, psutil, pyyaml; the wheels add DeepSpeed,
# Prefect (and its pydantic) and a slim Ray. They go into SITE (pip --target, the pack script's recipe) and reach
# the driver and, through the environment Ray's workers inherit, every actor. ppoflow itself is not installed: the
# repo root goes on PYTHONPATH. With OUT set, the whole log is also written to $OUT/gpu_ppo.log and the table to
# $OUT/gpu_ppo.json.
#
# Environment knobs: PYTHON [python3]  WHEELS [.whl]  SITE [${TMPDIR:-/tmp}/ppoflow-site]
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-${TMPDIR:-/tmp}/ppoflow-site}

# Installed once per set of wheels: a warm host reuses SITE, a new pack (other names or sizes) reinstalls.
if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_run.sh: no wheels in $WHEELS/ (make them with gpu/pack-gpu-wheels.sh $WHEELS)" >&2
    exit 1
fi
stamp=$(cd "$WHEELS" && stat -c '%n %s' -- *.whl *.tar.xz 2>/dev/null | md5sum || true)
if [ "$(cat "$SITE/.ppoflow-installed" 2>/dev/null)" != "$stamp" ]; then
    t0=$SECONDS
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    for tarball in "$WHEELS"/ray-*-slim-*.tar.xz; do
        if [ -e "$tarball" ]; then tar xJf "$tarball" -C "$SITE"; fi
    done
    echo "$stamp" >"$SITE/.ppoflow-installed"
    echo "gpu_run.sh: wheels installed into $SITE in $((SECONDS - t0)) s" >&2
fi

export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The image's 9.0a breaks DeepSpeed's op builder; 9.0 works. No op should be JIT-built here (the trainers use a
# torch optimizer), but one that is must not fail on this.
export TORCH_CUDA_ARCH_LIST=9.0
export PREFECT_UI_ENABLED=false            # the slim Prefect wheel has no web UI
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-${TMPDIR:-/tmp}/ppoflow-torch-extensions}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-${TMPDIR:-/tmp}/ppoflow-triton}

# Versions first: a missing package shows up here in one line rather than deep in an actor's traceback.
"$PYTHON" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()})", end="")
for name in ("transformers", "deepspeed", "ray", "prefect", "pydantic", "pyarrow", "safetensors"):
    print(f"  {name} {importlib.import_module(name).__version__}", end="")
print()
EOF

SCRIPT=bench/gpu_ppo.py
if [[ "${1:-}" == *.py ]]; then SCRIPT=$1; shift; fi
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    "$PYTHON" "$SCRIPT" "$@" 2>&1 | tee "$OUT/$(basename "$SCRIPT" .py).log"
else
    exec "$PYTHON" "$SCRIPT" "$@"
fi
