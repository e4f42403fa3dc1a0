#!/usr/bin/env bash
# The paper's path, small, on this machine's GPUs: midtrain, SFT and RL under torchrun on every
# visible GPU (one stage killed and resumed), every other stage once, vLLM serving if installed;
# prints pass/fail with seconds and peak memory per stage. See scripts/gpu_check.py.
#   scripts/gpu_check.sh                  # on a CUDA machine, in the repo's environment
#   scripts/gpu_check.sh --cpu --nproc 2  # the CPU dry run (gloo), as tests/test_gpu_check.py runs it
#   make setup-vllm && PYTHON=.venv-vllm/bin/python scripts/gpu_check.sh   # the same, plus vLLM serving
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
# gr2 from this checkout when it is not installed (a bare GPU machine with torch and transformers)
"$PY" -c 'import gr2' 2>/dev/null || export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" scripts/gpu_check.py "$@"
