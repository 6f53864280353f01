# The two commands of the README: `make demo` (the main job) and `make test` (the test suite).
# Each creates .venv on first use; torch is pinned through constraints.txt so a CPU machine
# never downloads a CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lowbit-installed

.PHONY: demo test lint bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip -c constraints.txt
	$(PY) -m pip install -q -c constraints.txt -e '.[hf,dev]'
	touch $(STAMP)

# Quantize the default model (SmolLM2-135M-Instruct) at int8 per-channel, int4 group 64, and
# int4 group 64 with a float zero point and the calibrated mse search (16 x 512 tokens of Tiny
# Shakespeare), save all three, and print the WikiText-2 perplexity / size comparison table.
demo: $(STAMP)
	$(VENV)/bin/lowbit quantize --bits 8 --out runs/int8
	$(VENV)/bin/lowbit quantize --bits 4 --group-size 64 --out runs/int4-g64
	$(VENV)/bin/lowbit quantize --bits 4 --group-size 64 --zero-point float --fit mse \
		--calibrate 16 --out runs/int4-g64-mse
	$(VENV)/bin/lowbit eval runs/int8 runs/int4-g64 runs/int4-g64-mse

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/bench_quantize.py
	$(PY) benchmarks/bench_linear.py
