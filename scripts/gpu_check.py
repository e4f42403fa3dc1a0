"""The paper's path on the GPUs of this machine, small: every stage through the `gr2` CLI, the
training stages under torchrun on every visible GPU, one killed-and-resumed stage, vLLM serving if
installed, and a pass/fail table with seconds and peak memory per stage. Run by
``scripts/gpu_check.sh``; ``--cpu`` is the dry run of the test suite (2 gloo processes, same steps).

    scripts/gpu_check.sh                 # CUDA: all visible GPUs, bf16, ~5 min on one H100
    scripts/gpu_check.sh --cpu --nproc 2 # the CPU dry run (tests/test_gpu_check.py)

What it builds: a slice of the bundled MovieLens-100k (``--users``), a Qwen3 model (the paper
student's architecture family: GQA, q/k norms, tied embeddings off) sized ``--hidden`` x
``--layers`` from a config with random weights and the demo tokenizer (trained on the item
titles), and a run config (``check.toml`` in ``--out``) that mid-trains from that folder.

Stages: data, sid, candidates, prompts, traces, rerank, eval run once (single process, as `gr2
run` runs them under torchrun); midtrain, sft and rl run under ``torchrun --nproc_per_node N``.
midtrain is killed (SIGTERM to torchrun's process group) as soon as its first checkpoint is on
disk and rerun: the rerun must report ``resumed_from_step`` > 0. vLLM: when ``import vllm`` works
and CUDA is up (``PYTHON=.venv-vllm/bin/python`` after ``make setup-vllm``), the rl model reranks the
test lists through ``gr2.decoding.vllm`` (every output a permutation of its candidates) and the same
prompts run unconstrained for as many tokens: the row gives both throughputs and their ratio;
without vLLM the row says skipped.

Peak memory per stage: GPU memory used (``nvidia-smi``, the largest GPU, sampled every 0.2 s) on
CUDA; the summed resident memory of the stage's process tree (psutil) on CPU. Exit status 0 when
every stage passed. Nothing here needs the network.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

CONFIG = """
name = "gpu_check"
description = "scripts/gpu_check.py: {users} users of ml-100k, Qwen3 {layers}x{hidden} from a config (random weights), heuristic teacher (stand-in)"

[data]
format = "recbole"
path = "{data}"

[sid.rqvae]
levels = 3
codebook_size = 32
latent_dim = 16
hidden_dims = [64]
epochs = 10

[candidates]
upstream = "popularity"
k = 5
train_windows = 2

[midtrain]
base_model = "{model}"
device = "{device}"
dtype = "{dtype}"
steps = {midtrain_steps}
batch_size = 4
checkpoint_every = 2
eval_users = 8
eval_beams = 5
eval_ks = [1, 5]

[traces]
backend = "heuristic"
attempts = 4
max_examples = 32

[sft]
device = "{device}"
dtype = "{dtype}"
epochs = 1
batch_size = 4
checkpoint_every = 2

[rl]
device = "{device}"
dtype = "{dtype}"
steps = 2
group_size = 2
prompts_per_step = 4
max_reasoning_tokens = 8
max_train_prompts = 16
save_every = 1
tensorboard = false

[rerank]
device = "{device}"
max_lists = 16
max_reasoning_tokens = 8

[eval]
n_boot = 50
"""


@dataclass
class Row:
    stage: str
    ok: bool = False
    seconds: float = 0.0
    peak_mib: float = 0.0
    detail: str = ""
    log: list[str] = field(default_factory=list)


class PeakMemory:
    """Samples GPU memory used (nvidia-smi, the largest GPU) or a process tree's RSS every 0.2 s."""

    def __init__(self, cuda: bool, pid: int | None = None):
        self.cuda, self.pid, self.peak, self._stop = cuda, pid, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> float:
        if self.cuda:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=10).stdout
            return max((float(x) for x in out.split()), default=0.0)
        try:
            import psutil
        except ImportError:
            return 0.0
        try:
            root = psutil.Process(self.pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0.0
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total / 2**20

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(0.2)


def run_stage(row: Row, cmd: list[str], env: dict, cuda: bool, log_path: Path,
              kill_when: Path | None = None) -> subprocess.CompletedProcess | None:
    """Run one CLI command (its own process group), its output appended to ``log_path``; with
    ``kill_when`` SIGTERM the group as soon as that path exists and return None (the caller reruns
    the stage)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout), daemon=True)
    reader.start()
    killed = False
    with PeakMemory(cuda, proc.pid) as mem:
        while proc.poll() is None:
            if kill_when is not None and kill_when.exists():
                os.killpg(proc.pid, signal.SIGTERM)
                killed = True
                break
            time.sleep(0.1)
        proc.wait()
    reader.join()
    row.seconds += time.perf_counter() - t0
    row.peak_mib = max(row.peak_mib, mem.peak)
    row.log.extend(out)
    with open(log_path, "a") as f:
        f.writelines(out)
    if killed:
        return None
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(out), "")


def build_model(path: Path, run_dir: Path, hidden: int, layers: int) -> Path:
    """A Qwen3 model with random weights and the demo tokenizer, trained on the run's item texts."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from gr2.models import train_demo_tokenizer
    from gr2.prompts import ItemCatalog
    from gr2.train.midtrain import demo_corpus

    tokenizer = train_demo_tokenizer(demo_corpus(ItemCatalog.from_run_dir(run_dir)), vocab_size=800)
    torch.manual_seed(0)
    heads = max(hidden // 64, 2)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 3,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                         head_dim=hidden // heads, max_position_embeddings=4096, tie_word_embeddings=False,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    Qwen3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def slice_data(out: Path, users: int) -> Path:
    from gr2.data.formats import default_ml100k_dir

    source, data = default_ml100k_dir(), out / "data"
    data.mkdir(parents=True, exist_ok=True)
    lines = (source / "ml-100k.inter").read_text().splitlines()
    kept = [lines[0]] + [line for line in lines[1:] if int(line.split("\t")[0]) <= users]
    (data / "slice.inter").write_text("\n".join(kept) + "\n")
    shutil.copyfile(source / "ml-100k.item", data / "slice.item")
    return data


def serve_with_vllm(row: Row, run_dir: Path, lists: int = 16, budget: int = 8) -> None:
    """The rl model served by vLLM with gr2's logits processor on the first test lists, greedy:
    every output must verify (the Rust parser) as a permutation of its candidates."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError:
        row.ok, row.detail = True, "skipped: vllm is not installed"
        return
    import numpy as np
    from transformers import AutoTokenizer

    from gr2 import SidIndex, add_sid_tokens, verify_rewards
    from gr2.decoding._setup import completion_length
    from gr2.decoding.vllm import make_rerank_logits_processor
    from gr2.pipeline.inputs import load_prompt_config
    from gr2.prompts import ItemCatalog, request_messages
    from gr2.pipeline.rerank import load_lists

    model_dir = run_dir / "rl" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    index = SidIndex.load(str(run_dir / "sid" / "index.gr2sid"))
    sid_tokens = add_sid_tokens(tokenizer, index)  # already in the vocabulary: returns their ids
    table, catalog, prompt_config = load_lists(run_dir, "test", lists), ItemCatalog.from_run_dir(run_dir), load_prompt_config(run_dir)
    candidates = np.asarray(table["candidates"], dtype=np.uint64)
    texts = [tokenizer.apply_chat_template(request_messages(table[i], prompt_config, catalog, index, reasoning=True,
                                                            tokenizer=tokenizer).messages,
                                           tokenize=False, add_generation_prompt=True) for i in range(len(table))]
    processor = make_rerank_logits_processor(sid_tokens, eos_token_id=tokenizer.eos_token_id, tokenizer=tokenizer,
                                             index=index)
    max_tokens = completion_length(candidates.shape[1], len(index.level_sizes), "think", budget)
    constrained = [SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                  extra_args={"gr2": {"candidates": [int(c) for c in row_c], "max_reasoning_tokens": budget}})
                   for row_c in candidates]
    # The baseline a server would otherwise run: the same prompts, unconstrained, the same number of
    # new tokens (ignore_eos, so both sides generate the same work).
    free = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"gr2_unconstrained": True})
    t0 = time.perf_counter()
    with PeakMemory(True) as mem:
        llm = LLM(str(model_dir), logits_processors=[processor], dtype="bfloat16", gpu_memory_utilization=0.3,
                  enforce_eager=True)
        llm.generate(texts[:2], constrained[:2])  # warm-up: kernels and the processor's first batch
        seconds = {}
        for name, params in (("gr2", constrained), ("free", [free] * len(texts))):
            start = time.perf_counter()
            outputs = llm.generate(texts, params)
            seconds[name] = time.perf_counter() - start, sum(len(o.outputs[0].token_ids) for o in outputs)
            if name == "gr2":
                completions = [o.outputs[0].text for o in outputs]
    row.seconds, row.peak_mib = time.perf_counter() - t0, mem.peak
    valid = verify_rewards(completions, candidates, candidates[:, 0], index).valid
    row.ok = bool(valid.all())
    (gr2_s, gr2_tokens), (free_s, free_tokens) = seconds["gr2"], seconds["free"]
    ratio = (gr2_tokens / gr2_s) / (free_tokens / free_s)
    row.detail = (f"{len(completions)} lists, {int(valid.sum())} valid permutations; constrained {gr2_tokens / gr2_s:.0f} "
                  f"tok/s vs unconstrained {free_tokens / free_s:.0f} tok/s ({ratio:.2f}x)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="the dry run: gloo processes on the CPU, float32")
    p.add_argument("--nproc", type=int, help="processes for the training stages (default: every visible GPU; 2 with --cpu)")
    p.add_argument("--out", default="runs/gpu_check", help="working folder (replaced)")
    p.add_argument("--users", type=int, default=50, help="MovieLens-100k users in the slice")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    args = p.parse_args()

    import torch

    cuda = not args.cpu
    if cuda and not torch.cuda.is_available():
        print("gpu_check: CUDA is not available here; run with --cpu for the dry run", file=sys.stderr)
        return 2
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    out = Path(args.out).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    data = slice_data(out, args.users)
    model = out / "qwen3_tiny"  # built after the data stage, from the run's item texts
    config = out / "check.toml"
    config.write_text(CONFIG.format(users=args.users, layers=args.layers, hidden=args.hidden, data=data, model=model,
                                    device="cuda" if cuda else "cpu", dtype="bfloat16" if cuda else "float32",
                                    midtrain_steps=12))
    run_dir, logs = out / "run", out / "logs"
    logs.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    gr2 = [sys.executable, "-m", "gr2.cli"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "gr2.cli"]
    common_args = ["--config", str(config), "--run-dir", str(run_dir)]
    print(f"gpu_check: {'CUDA' if cuda else 'CPU dry run'}, {nproc} processes, Qwen3 {args.layers}x{args.hidden}, "
          f"{args.users} users; working folder {out}", flush=True)

    rows: list[Row] = []

    def stage(name: str, launcher: list[str], extra: tuple[str, ...] = (), record: tuple[str, str] | None = None,
              check=None) -> bool:
        """One CLI stage; it passes when it exits 0 and its record (``gr2.rundir.read_stage``: the
        outputs' hashes match) is committed, and ``check(summary)`` holds."""
        from gr2.rundir import read_stage

        row = Row(name)
        rows.append(row)
        cmd = launcher + [name, *common_args, *extra]
        if name == "midtrain":  # kill at the first checkpoint, then resume
            first = run_dir / "midtrain" / "checkpoints" / "step-00000002"
            if run_stage(row, cmd, env, cuda, logs / f"{name}.log", kill_when=first) is not None:
                row.detail = "finished before it could be killed at its first checkpoint"
        if not row.detail:
            done = run_stage(row, cmd, env, cuda, logs / f"{name}.log")
            folder, file = record or (name, "stage.json")
            committed = read_stage(run_dir / folder, file)
            if done.returncode != 0:
                row.detail = f"exit {done.returncode}: " + " | ".join(line.strip() for line in row.log[-3:])
            elif committed is None:
                row.detail = f"exit 0 but {folder}/{file} is not a valid record"
            else:
                row.ok, row.detail = check(committed["summary"]) if check else (True, "")
        print(f"  {name:<10} {'pass' if row.ok else 'FAIL'}  {row.seconds:7.1f} s  {row.peak_mib:9.0f} MiB  {row.detail}",
              flush=True)
        return row.ok

    def on_every_process(summary: dict) -> tuple[bool, str]:
        size = summary.get("world_size")
        return size == nproc, f"{size} processes"

    def resumed(summary: dict) -> tuple[bool, str]:
        step = summary.get("resumed_from_step", 0)
        ok, detail = on_every_process(summary)
        return ok and step > 0, f"{detail}; killed at its first checkpoint, resumed from step {step}"

    ok = all(stage(s, gr2) for s in ("data", "sid", "candidates", "prompts"))
    if ok:
        build_model(model, run_dir, args.hidden, args.layers)
    ok = ok and stage("midtrain", torchrun, check=resumed) and stage("traces", gr2)
    ok = ok and stage("sft", torchrun, check=on_every_process) and stage("rl", torchrun, check=on_every_process)
    ok = ok and stage("rerank", gr2, ("--stage", "rl"), ("rl", "rerank_test.json")) and stage("eval", gr2)
    if ok and cuda:
        row = Row("vllm")
        rows.append(row)
        try:
            serve_with_vllm(row, run_dir)
            print(f"  vllm       {'pass' if row.ok else 'FAIL'}  {row.seconds:7.1f} s  {row.peak_mib:9.0f} MiB  {row.detail}")
        except Exception as e:  # noqa: BLE001 -- a check script reports, it does not stop
            row.ok, row.detail = False, f"{type(e).__name__}: {e}"
        ok = row.ok
    print("\n| stage | result | seconds | peak MiB | detail |\n|---|---|---|---|---|")
    for row in rows:
        print(f"| {row.stage} | {'pass' if row.ok else 'FAIL'} | {row.seconds:.1f} | {row.peak_mib:.0f} | {row.detail} |")
    print(f"\ngpu_check: {'PASS' if ok else 'FAIL'} ({sum(r.seconds for r in rows):.0f} s)")
    if not ok:
        failed = next((r for r in rows if not r.ok), None)
        if failed is not None:
            print(f"\nlast lines of {failed.stage}:\n" + "".join(failed.log[-30:]), file=sys.stderr)
    (out / "result.json").write_text(json.dumps([{k: v for k, v in vars(r).items() if k != "log"} for r in rows], indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
