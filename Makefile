# safealign: install into .venv, run the tests, run the demo.
# `make test` and `make demo` install first when .venv/ is missing or older than pyproject.toml /
# constraints.txt (the stamp file $(INSTALLED)); `make install` does only that.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
INSTALLED ?= $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install test demo demo-check bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first (CPU wheel, no CUDA packages), then the pinned stack; constraints.txt keeps torch in place.
$(INSTALLED): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip check
	touch $@

install: $(INSTALLED)

test: $(INSTALLED)
	$(BIN)/python -m pytest -m "not slow_demo"

# A second `make demo` resumes an interrupted demo, or says the finished one is done.
demo: $(INSTALLED)
	$(BIN)/safealign demo --output-dir demo-out

# the full demo as a test: fails unless the method's claim is visible (minutes; not part of make test)
demo-check: $(INSTALLED)
	$(BIN)/python -m pytest -m slow_demo

# the CPU benchmarks (about 45 min on 2 cores); each writes bench/results/*.md. On a shared machine run it
# under the lock: flock /tmp/safealign-cpu.lock make bench. The GPU check is separate: bench/gpu_check.sh.
bench: $(INSTALLED)
	$(BIN)/python bench/startup.py --out bench/results/startup.md
	$(BIN)/python bench/train_rm_speed.py
	$(BIN)/python bench/train_rm_real.py --epochs 2 --repeats 3 --out bench/results/train_rm_real.md
	$(BIN)/python bench/optimizer_step.py --out bench/results/optimizer_step.md
	$(BIN)/python bench/ppo_vs_peers.py --sizes tiny,20m --steps 9 --grpo --out bench/results/ppo_vs_peers.md
	$(BIN)/python bench/ppo_vs_peers.py --sizes 20m --steps 6 --grpo --dtype bf16 --out bench/results/ppo_vs_peers_bf16.md
	$(BIN)/python bench/ppo_floor.py --out bench/results/ppo_floor.md
	$(BIN)/python bench/zero3_rollout.py --out bench/results/zero3_rollout.md
	$(BIN)/python bench/ppo_speed.py --out bench/results/ppo_speed.md
	$(BIN)/python bench/bound_validation.py --reps 2000 --out bench/results/bound_validation.md

clean:
	rm -rf demo-out runs .pytest_cache .bench
