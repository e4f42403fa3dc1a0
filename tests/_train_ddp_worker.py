"""torchrun worker: the midtrain, traces and sft stages of tests/test_train_ddp.py on RUN_DIR.

Usage: torchrun --nproc_per_node=N tests/_train_ddp_worker.py RUN_DIR WRITES.json [KILL_STEP]

With KILL_STEP every rank raises after SFT step KILL_STEP (a killed job; rerun it to resume).
Ranks other than 0 record (Python audit hook) every write, rename, mkdir or removal they make
under RUN_DIR and save the list to WRITES.json (outside RUN_DIR): the test expects it empty.
The traces stage is not distributed: rank 0 runs it, the others wait.
"""

import json
import os
import sys
from pathlib import Path

import torch

import test_train_ddp as cfg
from gr2.pipeline.traces import TeacherConfig, run_traces
from gr2.train.distributed import init_world
from gr2.pipeline.midtrain import run_midtrain
from gr2.pipeline.sft import run_sft

torch.set_num_threads(1)
run_dir, writes_path = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
world = init_world(torch.device("cpu"))
writes: list[list[str]] = []

WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
MUTATING = {"os.mkdir", "os.rename", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.symlink",
            "os.link", "os.chmod", "shutil.copyfile", "shutil.move", "os.utime"}


def audit(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = (tuple(args) + (None, None))[:3]
        if not ((isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & WRITE_FLAGS)):
            return
        paths = [path]
    elif event in MUTATING:
        paths = list(args)
    else:
        return
    for p in paths:
        if isinstance(p, (str, os.PathLike)) and os.path.abspath(os.fspath(p)).startswith(str(run_dir)):
            writes.append([event, os.fspath(p)])


if world.rank != 0:
    sys.addaudithook(audit)

kill_step = int(sys.argv[3]) if len(sys.argv) > 3 else None


def kill_at(step: int) -> None:
    if step == kill_step:
        raise RuntimeError(f"killed after step {step}")


try:
    run_midtrain(run_dir, cfg.midtrain_config())
    if world.rank == 0:
        run_traces(run_dir, TeacherConfig(mode="targeted"))
    world.barrier()
    run_sft(run_dir, cfg.sft_config(), on_step=kill_at)
finally:
    if world.rank != 0:
        writes_path.write_text(json.dumps(writes))
if world.distributed:
    torch.distributed.destroy_process_group()
