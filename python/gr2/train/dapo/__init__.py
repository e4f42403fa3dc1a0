"""Stage 3, DAPO reinforcement learning with verifiable rerank rewards (docs/DESIGN.md §1).

The ``rl`` stage that runs it over a run directory, and ``gr2 rl``'s flags, are :mod:`gr2.pipeline.rl`.

One step: sample G rollouts per prompt (constrained decoding by default), score them with
:func:`gr2.verify_rewards`, keep the groups whose outcome varies (dynamic sampling), normalise
rewards within each group and take clipped-ratio, token-level-normalised policy-gradient steps on
log-probabilities taken under the constraint each token was sampled from. One file per concern:

* :mod:`~gr2.train.dapo.config` -- :class:`DapoConfig` (the ``[rl]`` table) and its validation;
* :mod:`~gr2.train.dapo.loss` -- advantages, overlong penalty, packing (per rollout, or each prompt
  once per group), log-probs, the DAPO loss;
* :mod:`~gr2.train.dapo.world` -- the process group (:class:`World`, :func:`init_world`);
* :mod:`~gr2.train.dapo.rollouts` -- rollout records and the rollout functions (seeding contract);
* :mod:`~gr2.train.dapo.data` -- the prompts (:class:`RlData`, :func:`rl_data`);
* :mod:`~gr2.train.dapo.trainer` -- :class:`DapoTrainer` (one step), :func:`dapo_update`,
  :func:`train` (the loop, checkpoints) and :func:`evaluate`;
* :mod:`~gr2.train.dapo.start` -- the start model and KL reference (:func:`load_start_model`);
* :mod:`~gr2.train.dapo.ablation` -- conditional vs unconditional format reward, and its plot.

Names are looked up in the submodule that uses them: to replace one in a test, patch it there
(``gr2.train.dapo.trainer.group_advantages``), not on this package.
"""

from gr2.train.dapo.ablation import ablation
from gr2.train.dapo.config import OUTCOMES, DapoConfig
from gr2.train.dapo.data import RlData, rl_data
from gr2.train.dapo.loss import (dapo_loss, group_advantages, informative_groups, outcome_of, overlong_penalty,
                                 group_token_logprobs, pack, pack_groups, pack_rollouts, token_logprobs)
from gr2.train.dapo.rollouts import (Completion, Rollout, RolloutFn, constrained_rollouts, hash_seed,
                                     sampled_rollouts)
from gr2.train.dapo.start import StartModel, load_start_model
from gr2.train.dapo.trainer import EVAL_BATCH, DapoTrainer, RolloutBatch, dapo_update, evaluate, train
from gr2.train.dapo.world import World, init_world

__all__ = [
    "OUTCOMES", "EVAL_BATCH", "DapoConfig", "RlData", "rl_data", "overlong_penalty", "group_advantages",
    "informative_groups", "outcome_of", "pack_rollouts", "pack_groups", "pack", "token_logprobs",
    "group_token_logprobs", "dapo_loss", "Completion", "Rollout",
    "RolloutFn", "constrained_rollouts", "sampled_rollouts", "hash_seed", "World", "init_world", "RolloutBatch",
    "DapoTrainer", "dapo_update", "evaluate", "train", "StartModel", "load_start_model", "ablation",
]
