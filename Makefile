# Common tasks; every target is a thin wrapper over a documented command.
PY ?= python

.PHONY: install test train bench-overhead bench-throughput clean

install:            ## install the package with test extras (torch first, see README)
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"

test:               ## the test suite (what CI runs)
	$(PY) -m pytest

train:              ## the default run: llama_tiny on the vendored ml-latest-small
	$(PY) train.py

bench-overhead:     ## Lightning vs a plain PyTorch loop, time per epoch
	$(PY) experiments/bench_lightning_overhead.py

bench-throughput:   ## training tokens/s of llama_tiny and smollm2_135m
	$(PY) experiments/bench_throughput.py

clean:
	rm -rf outputs multirun .pytest_cache
