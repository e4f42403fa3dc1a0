# gr2 — two commands on a fresh machine:
#   make demo   set up (virtual environment in .venv, reused) and run the main job on MovieLens-100k
#   make test   set up and run every test (Rust and Python)
# Setup installs the locked versions of scripts/constraints.txt; `make lock` regenerates that file.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
LOCK := scripts/constraints.txt
STAMP := $(VENV)/.gr2-deps-$(shell cat pyproject.toml scripts/assets.txt $(LOCK) | sha256sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYTHONUNBUFFERED := 1

.PHONY: setup develop demo test test-rust test-python bench clean lock inplace wheel fuzz

# Installs the pinned versions of $(LOCK) (pip -c: a constraint, not an extra requirement), so
# `make test` and `make demo` run in the environment the README's figures came from; rerunning is a
# no-op until pyproject.toml, scripts/assets.txt or the lock change (the stamp hashes all three).
# gr2 needs CPython >= 3.11 (pyproject's requires-python; the lock was resolved on 3.11, and numpy 2.4
# and pandas 3.1 have no 3.10 builds).
$(STAMP): pyproject.toml scripts/assets.txt $(LOCK)
	@python3 -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "make setup: python3 is %d.%d; the locked environment (scripts/constraints.txt) needs Python >= 3.11" % sys.version_info[:2])'
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip maturin -c $(LOCK)
	$(PIP) install -q --no-build-isolation -e '.[test,bench,assets]' -c $(LOCK)
	$(PIP) install -q --no-deps -r scripts/assets.txt -c $(LOCK)
	@rm -f $(VENV)/.gr2-deps-* && touch $@

setup: $(STAMP)

# Rebuild the Rust extension in release mode (incremental; seconds when nothing changed).
develop: setup
	$(VENV)/bin/maturin develop --release -q

# The abi3 wheel and the sdist into dist/ (tests/test_wheel.py installs the wheel into a fresh venv).
wheel: setup
	$(VENV)/bin/maturin build --release --out dist
	$(VENV)/bin/maturin sdist --out dist

demo: develop
	$(VENV)/bin/gr2 run --preset demo

test-rust:
	cargo test --release -q

test-python: develop
	$(PY) -m pytest -q

test: test-rust test-python

# The fuzz and fault suite at a larger budget than `make test` (docs/fuzzing.md): every Rust
# proptest x GR2_FUZZ_SCALE cases, the hypothesis suites at GR2_FUZZ_EXAMPLES examples.
FUZZ_SCALE ?= 50
FUZZ_EXAMPLES ?= 2000
fuzz: develop
	GR2_FUZZ_SCALE=$(FUZZ_SCALE) cargo test --release -q
	GR2_FUZZ=1 GR2_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q tests/test_index_rq_fuzz.py \
	  tests/test_input_validation.py tests/test_rewards.py tests/test_constraint.py tests/test_stage_commits.py

# The benches race TRL (pyproject's `trl` extra, pinned by the lock); the default setup leaves it out.
bench: develop
	$(PIP) install -q 'trl>=1.16' -c $(LOCK)
	cargo bench
	for f in benches/bench_*.py; do $(PY) $$f || exit 1; done

# Re-resolve pyproject.toml's unpinned ranges (newest matching releases) in a scratch venv and
# freeze the result into $(LOCK), keeping its header comments; gr2 itself is left out. Review the
# diff, run `make test`, commit. LOCK_VENV=.venv-lock is removed afterwards.
LOCK_VENV ?= .venv-lock
lock:
	rm -rf $(LOCK_VENV) && python3 -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip maturin
	$(LOCK_VENV)/bin/python -m pip install -q --no-build-isolation -e '.[test,bench,assets]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps -r scripts/assets.txt
	{ grep '^#' $(LOCK) | grep -v '^# Resolved on'; \
	  $(LOCK_VENV)/bin/python -c 'import platform, sys; print(f"# Resolved on {platform.system()} {platform.machine()}, CPython {platform.python_version()}; torch is the PyPI build (CUDA wheels, runs on CPU too).")'; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable --exclude gr2; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK) && rm -rf $(LOCK_VENV)
	@echo "wrote $(LOCK); the next make setup installs it"

clean:
	rm -rf target runs .pytest_cache .hypothesis

# For parallel work trees that share one environment: build the extension with cargo and drop it
# next to the Python sources (use with PYTHONPATH=$PWD/python). Not needed for normal use.
inplace:
	PYO3_PYTHON=$(abspath $(PY)) cargo build --release --features python -q
	cp target/release/libgr2.so python/gr2/.libgr2.so.tmp && mv python/gr2/.libgr2.so.tmp python/gr2/_gr2.abi3.so  # rename: a running process keeps its mapped copy
