# safealign: install into .venv, run the tests, run the demo.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (CPU wheel, no CUDA packages), then the pinned stack; constraints.txt keeps torch in place.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip check

test:
	$(BIN)/python -m pytest -m "not slow_demo"

demo:
	$(BIN)/safealign demo --output-dir demo-out

# the full demo as a test: fails unless the method's claim is visible (minutes; not part of make test)
demo-check:
	$(BIN)/python -m pytest -m slow_demo

bench:
	$(BIN)/python bench/train_rm_speed.py
	$(BIN)/python bench/bound_validation.py --reps 2000 --out bench/results/bound_validation.md
	$(BIN)/python bench/ppo_speed.py --out bench/results/ppo_speed.md

clean:
	rm -rf demo-out runs .pytest_cache
