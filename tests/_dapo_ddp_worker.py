"""torchrun worker: one dapo_update on fixed rollouts; rank 0 saves the updated parameters.

Usage: torchrun --nproc_per_node=N tests/_dapo_ddp_worker.py OUT.safetensors
Each rank takes whole groups rank::N of the same fixed batch, so N = 1 and N = 2 see the same data.
"""

import sys

import torch
from safetensors.torch import save_file

import _dapo_fixtures as fx
from gr2.train.dapo import dapo_update, init_world

torch.set_num_threads(1)
world = init_world()
model, tokenizer, sid_tokens = fx.tiny_policy()
data, sids = fx.tiny_data(tokenizer)
rollouts = fx.fixed_rollouts(tokenizer, sid_tokens, data, sids, groups=4)
g = 4
mine = [r for i in range(world.rank, 4, world.size) for r in rollouts[i * g:(i + 1) * g]]
# 3 mini-batches of G = 4 rollouts (3 does not divide 4): the split must not depend on the world size
config = fx.small_config(grad_accum=2, updates_per_batch=3)
# plain SGD: the update is lr * gradient, so the check compares the summed gradients themselves
# (Adam's first step, g / (|g| + eps), would amplify float rounding of near-zero gradients)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
stats = dapo_update(model, optimizer, None, mine, config, tokenizer.pad_token_id, world)
if world.rank == 0:
    save_file({k: v.detach().contiguous() for k, v in model.named_parameters()}, sys.argv[1])
    print("stats", stats)
if world.distributed:
    torch.distributed.destroy_process_group()
