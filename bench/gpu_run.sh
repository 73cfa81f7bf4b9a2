#!/usr/bin/env bash
# gpu_run.sh - run a benchmark (bench/gpu_ppo.py unless another script is named) on the offline GPU host, in the
# environment of the carried archive.
#
# Usage, from the repo root of a working tree that carries .carry/ (what `bash gpu/pack.sh` writes):
#   bash bench/gpu_run.sh [gpu_ppo.py arguments, e.g. --iterations 3 --prompts 64 --max-new-tokens 128]
#   bash bench/gpu_run.sh bench/learning.py [learning.py arguments]   (another script: name it first)
#   bash bench/gpu_run.sh gpu/smoke.py                                 (does the environment work? PASS/FAIL lines)
# Any other command in the same environment:  source gpu/env.sh && python3 ...
#
# The image has torch, transformers, pyarrow, fsspec, safetensors, psutil, pyyaml, ...; the archive adds DeepSpeed,
# Prefect, a slim Ray and a slim vLLM (gpu/README.md). gpu/env.sh unpacks it into SITE once per archive and exports
# PYTHONPATH (the site, then the repo: ppoflow is not installed) and the settings they need; Ray's actors inherit
# them. With OUT set, the whole log is also written to $OUT/<script>.log (bench/gpu_ppo.py also writes its table to
# $OUT/gpu_ppo.json).
#
# Environment knobs: PYTHON [python3]  CARRY [.carry]  SITE [${TMPDIR:-/tmp}/ppoflow-site]
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# shellcheck source=../gpu/env.sh
source gpu/env.sh

# Versions first: a missing package shows up here in one line rather than deep in an actor's traceback. vLLM's
# import looks for a GPU and its CUDA libraries: a failure there is printed, not fatal, so a CPU-only check still runs.
"$PYTHON" - <<'EOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}  torch {torch.__version__} (cuda {torch.version.cuda}, "
      f"available {torch.cuda.is_available()})", end="")
for name in ("transformers", "deepspeed", "ray", "prefect", "pydantic", "vllm", "trl"):
    try:
        print(f"  {name} {importlib.import_module(name).__version__}", end="")
    except ImportError as e:
        if name != "trl":  # TRL is carried only with WITH_TRL=1
            print(f"  {name} NOT IMPORTABLE ({type(e).__name__}: {e})", end="")
    except Exception as e:
        print(f"  {name} FAILED ({type(e).__name__}: {e})", end="")
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
