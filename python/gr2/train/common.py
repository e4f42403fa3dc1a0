"""Compatibility names for :mod:`gr2.train.dapo.trainer`, which still reads ``common.X``: the
training plumbing lives in one module per concern, and everything else imports from those:

* :mod:`gr2.train.devices` -- seeding, device and dtype choice, mixed precision;
* :mod:`gr2.train.distributed` -- the process world under torchrun, the rank-0 stage start;
* :mod:`gr2.train.optim` -- AdamW, the lr schedule, LoRA;
* :mod:`gr2.train.checkpointing` -- exact-resume checkpoints keyed by config + inputs;
* :mod:`gr2.train.metric_log` -- metrics.jsonl + tensorboard;
* :mod:`gr2.train.batches` -- weighted examples, packing, collation, the data order;
* :mod:`gr2.train.losses` -- the weighted NLL, :class:`DataParallel`, divergence checks;
* :mod:`gr2.train.run_inputs` -- run-directory inputs (sequences, upstream stage keys).

Nothing here but re-exports; remove this module once the DAPO trainer imports those modules
(tests/test_architecture.py fails if anything else imports it).
"""

from __future__ import annotations

from gr2.train.devices import autocast, choose_device, choose_dtype, local_device, param_dtype, seed_everything
from gr2.train.distributed import begin_stage_on_rank0, dist_timeout, init_world, World
from gr2.train.optim import LoraSettings, make_optimizer, make_scheduler, unwrap_model, wrap_lora
from gr2.train.checkpointing import (CHECKPOINT_META, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS, Checkpointer,
                                     checkpoint_key, checkpoint_name, latest_checkpoint, load_checkpoint,
                                     prune_checkpoints, save_checkpoint, training_key)
from gr2.train.metric_log import metric_logger, MetricLogger, NullLogger
from gr2.train.batches import (build_example, chat_example, collate, end_of_turn_ids, epoch_order, pack_examples,
                               pack_rows, to_device, WeightedExample)
from gr2.train.losses import (check_finite_weights, check_loss, DataParallel, summed_nll, summed_nll_selected,
                              SummedNll, token_nll, weighted_nll, weighted_nll_selected)
from gr2.train.run_inputs import input_key, load_sequences

__all__ = ["autocast", "choose_device", "choose_dtype", "local_device", "param_dtype", "seed_everything",
           "begin_stage_on_rank0", "dist_timeout", "init_world", "World", "LoraSettings", "make_optimizer",
           "make_scheduler", "unwrap_model", "wrap_lora", "CHECKPOINT_META", "CHECKPOINT_STATE", "CHECKPOINT_WEIGHTS",
           "Checkpointer", "checkpoint_key", "checkpoint_name", "latest_checkpoint", "load_checkpoint", "prune_checkpoints",
           "save_checkpoint", "training_key", "metric_logger", "MetricLogger", "NullLogger", "build_example",
           "chat_example", "collate", "end_of_turn_ids", "epoch_order", "pack_examples", "pack_rows", "to_device",
           "WeightedExample", "check_finite_weights", "check_loss", "DataParallel", "summed_nll", "summed_nll_selected",
           "SummedNll", "token_nll", "weighted_nll", "weighted_nll_selected", "input_key", "load_sequences"]
