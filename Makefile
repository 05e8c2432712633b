# Two entry points: `make repro` (the pipeline on the embedded default) and `make test`.
VENV   ?= .venv
PYTHON ?= python3
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro test bench gpu-check clean-outputs

$(STAMP): pyproject.toml
	$(PYTHON) tools/install.py --venv $(VENV)   # uv when it can be had (seconds), pip otherwise
	touch $(STAMP)

install: $(STAMP)

repro: $(STAMP)
	dvc repro
	@echo
	sipat metrics
	@echo "Metrics: data/metrics/teacher.json (robust teacher), data/metrics/student.json (student, strategy from params.yaml)"
	@echo "Every key, with the per-attack breakdown: dvc metrics show"

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=25 -n auto --dist loadfile --no-loadscope-reorder   # one worker per core, a file's tests together, in conftest's order

bench: $(STAMP)
	$(BIN)/python benchmarks/salience_extraction.py

# Everything GPU-specific in one call (8-minute budget on one H100); on a CPU, the same code at toy sizes.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py --out benchmarks/out/gpu_check.json

clean-outputs:
	rm -rf data/prepared data/teacher data/masks data/student data/metrics
