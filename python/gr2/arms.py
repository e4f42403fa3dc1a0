"""Reasoning arms: the same recipe trained and served with or without a ``<think>`` block.

``think`` writes ``<think>reasoning</think><answer>...</answer>`` (the papers' GR2);
``answer`` writes only ``<answer>...</answer>`` (answer-only: later work reports reasoning can
hurt semantic-ID recommendation, and it is several times cheaper to serve). Both arms share data,
SIDs, candidates, prompts and the mid-trained model; each has its own traces, SFT and RL stages,
in folders named :func:`stage_dir` (``sft`` / ``sft_answer``), so ``gr2 eval`` reports them side
by side.
"""

from __future__ import annotations

from gr2.errors import ConfigError

ARMS = ("think", "answer")
ARM_STAGES = ("traces", "sft", "rl")


def check_arm(arm: str) -> str:
    if arm not in ARMS:
        raise ConfigError(f"unknown arm {arm!r}; arms are {ARMS}")
    return arm


def stage_dir(stage: str, arm: str = "think") -> str:
    """Folder of ``stage`` for ``arm`` inside a run directory (``rl``, ``rl_answer``)."""
    check_arm(arm)
    if stage not in ARM_STAGES or arm == "think":
        return stage
    return f"{stage}_{arm}"


def reasoning(arm: str) -> bool:
    return check_arm(arm) == "think"
