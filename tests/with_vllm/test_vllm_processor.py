"""gr2's vLLM logits processor driven through vLLM's real classes on the CPU (``make test-vllm``).

V1: vLLM's own loader (``build_logitsprocs``) builds the processor next to vLLM's built-in ones, the
real persistent batch (``InputBatch``: add, remove, ``condense`` moves, ``swap_states`` swaps) emits
the ``BatchUpdate``s through ``refresh_metadata``, and the real ``Sampler.apply_logits_processors``
applies them. V2: vLLM's loader (``build_custom_logits_processors``) builds it over the model runner's
real ``RequestState`` (slot free list, staged writes), requests are admitted with ``add_request``,
rows are reordered every step through a real ``LogitsContext``, a request is preempted and resumed
with its partial output. Every step the processor's mask is compared, row by row, with an
independently driven native automaton (``gr2._gr2.ConstraintBatch``) for that request, the greedy
token is committed the way the model runner commits it, and every finished completion must be a
valid permutation of its candidates for ``gr2.verify_rewards`` and a plain-Python parser.
"""

from __future__ import annotations

import numpy as np
import pytest

vllm = pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

import gr2  # noqa: E402
from gr2 import _gr2  # noqa: E402
from gr2.decoding._setup import add_rerank_rows, as_candidates  # noqa: E402

pytestmark = pytest.mark.vllm

CPU = torch.device("cpu")


# --- an independent reference for one request ---------------------------------------------------


class Reference:
    """One request's expected masks: its own native automaton, advanced by the committed tokens."""

    def __init__(self, world, spec: dict | None, vocab: int):
        self.spec, self.vocab, self.out = spec, vocab, []
        self.forbidden = set(int(t) for t in world.token_map().reasoning_forbidden())
        if spec is not None:
            self.batch = _gr2.ConstraintBatch(world.token_map())
            cands = as_candidates([spec["candidates"]])
            codes = world.index.sids(np.asarray(spec["candidates"], dtype=np.uint64))
            add_rerank_rows(self.batch, cands, codes, reasoning=spec.get("reasoning", "think"),
                            max_reasoning_tokens=spec.get("max_reasoning_tokens", 128))

    def expected(self) -> set[int]:
        if self.spec is None:
            return set(range(self.vocab))  # an opted-out request is left alone
        offsets, ids, free = self.batch.allowed()
        if free[0]:
            return set(range(self.vocab)) - self.forbidden
        return set(int(t) for t in ids[offsets[0]:offsets[1]])

    def commit(self, tok: int) -> None:
        self.out.append(tok)
        if self.spec is not None and self.batch.phases()[0] != 3:
            self.batch.advance(np.zeros(1, dtype=np.int64), np.asarray([tok], dtype=np.int64))

    @property
    def done(self) -> bool:
        return self.spec is not None and self.batch.phases()[0] == 3


def finite(row: torch.Tensor) -> set[int]:
    return set(torch.isfinite(row).nonzero().view(-1).tolist())


# --- requests ----------------------------------------------------------------------------------


def make_requests(world, seed: int, n: int = 10):
    """Ragged K (1..5), every reasoning mode, small budgets, one explicit opt-out."""
    from vllm import SamplingParams

    from gr2.decoding._setup import completion_length

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        if i == 3:
            out.append((f"r{i}", None, SamplingParams(temperature=0.0, max_tokens=6,
                                                      extra_args={"gr2_unconstrained": True})))
            continue
        k = int(rng.integers(1, 6))
        mode = ("think", "in_think", "disabled")[i % 3]
        spec = {"candidates": [int(x) for x in rng.choice(world.items, size=k, replace=False)], "reasoning": mode,
                "max_reasoning_tokens": int(rng.integers(0, 4))}
        need = completion_length(k, world.sid_tokens.levels, mode, spec["max_reasoning_tokens"])
        out.append((f"r{i}", spec, SamplingParams(temperature=0.0, max_tokens=need, extra_args={"gr2": spec})))
    return out


def prompt_of(i: int) -> list[int]:
    return [2] + [4 + (i + j) % 10 for j in range(3 + i % 4)]


# --- V1: InputBatch + BatchUpdateBuilder + Sampler.apply_logits_processors ----------------------


def test_v1_added_tuple_layout_is_what_the_tracker_reads(world):
    """The pinned vLLM's BatchUpdate.added holds (index, SamplingParams, prompt_token_ids,
    output_token_ids), the last the very list the runner appends to (RequestTracker.update reads it
    in that order and keeps the list)."""
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu_input_batch import CachedRequestState, InputBatch

    batch = InputBatch(max_num_reqs=4, max_model_len=64, max_num_batched_tokens=128, device=CPU,
                       vocab_size=world.vocab, block_sizes=[16], max_num_blocks_per_req=[4])
    params = SamplingParams(max_tokens=8, extra_args={"gr2": {"candidates": [int(world.items[0])]}})
    req = CachedRequestState(req_id="a", prompt_token_ids=[2, 5, 6], mm_features=[], sampling_params=params,
                             generator=None, block_ids=([0],), num_computed_tokens=0, output_token_ids=[])
    batch.add_request(req)
    update = batch.batch_update_builder.get_and_reset(batch.num_reqs)
    assert isinstance(update, BatchUpdate)
    (idx, p, prompt, output), = update.added
    assert idx == 0 and p is params and prompt == [2, 5, 6] and output is req.output_token_ids
    assert list(update.removed) == [] and list(update.moved) == []


class V1Runner:
    """What vLLM's V1 GPU model runner does with the persistent batch each step, on the CPU."""

    def __init__(self, world, vllm_config, proc_cls, max_num_reqs=4, async_scheduling=False):
        from vllm.v1.sample.logits_processor import build_logitsprocs
        from vllm.v1.sample.sampler import Sampler
        from vllm.v1.worker.gpu_input_batch import InputBatch

        self.world = world
        self.logitsprocs = build_logitsprocs(vllm_config, CPU, False, False, [proc_cls])
        self.batch = InputBatch(max_num_reqs=max_num_reqs, max_model_len=256, max_num_batched_tokens=512,
                                device=CPU, vocab_size=world.vocab, block_sizes=[16],
                                max_num_blocks_per_req=[16], logitsprocs=self.logitsprocs,
                                logitsprocs_need_output_token_ids=True)  # as GPUModelRunner: bool(custom_logitsprocs)
        self.sampler = Sampler()
        self.states, self.refs = {}, {}
        self.async_scheduling = async_scheduling

    def add(self, rid, spec, params, i):
        from vllm.v1.worker.gpu_input_batch import CachedRequestState

        state = CachedRequestState(req_id=rid, prompt_token_ids=prompt_of(i), mm_features=[], sampling_params=params,
                                   generator=None, block_ids=([i],), num_computed_tokens=0, output_token_ids=[])
        self.states[rid] = state
        self.refs[rid] = Reference(self.world, spec, self.world.vocab)
        self.batch.add_request(state)

    def step(self, gen: torch.Generator) -> dict[str, int]:
        """One decode step: the processors' logits, checked row by row; returns each request's token."""
        self.batch.refresh_metadata()  # BatchUpdate -> update_state of every logits processor
        # async scheduling: the last step's tokens are still -1 placeholders during update_state; the
        # runner's _sample puts the real ones in just before the sampler (and the processors) run
        self.batch.update_async_output_token_ids()
        n = self.batch.num_reqs
        logits = torch.randn(n, self.world.vocab, generator=gen)
        logits = self.sampler.apply_logits_processors(logits, self.batch.sampling_metadata, False)
        picked = {}
        for rid, row in self.batch.req_id_to_index.items():
            ref = self.refs[rid]
            assert finite(logits[row]) == ref.expected(), (rid, row, len(ref.out))
            tok = int(torch.argmax(logits[row]))  # greedy; vLLM's CPU argmax kernel is not in the PyPI wheel
            ref.commit(tok)
            picked[rid] = tok
        if not self.async_scheduling:
            for rid, tok in picked.items():
                self.states[rid].output_token_ids.append(tok)  # what the runner does with a sampled token
        else:  # GPUModelRunner._bookkeeping_sync and sample_tokens under async scheduling
            sampled = torch.zeros(n, 1, dtype=torch.int64)
            for rid, row in self.batch.req_id_to_index.items():
                sampled[row, 0] = picked[rid]
                self.states[rid].output_token_ids.append(-1)
            self.batch.prev_req_id_to_index = dict(self.batch.req_id_to_index)
            self.batch.set_async_sampled_token_ids(sampled, _CopyDone())
        return picked

    def output(self, rid) -> list[int]:
        """The request's output as vLLM will report it (placeholders filled in)."""
        return [t if t != -1 else self.refs[rid].out[i] for i, t in enumerate(self.states[rid].output_token_ids)]


class _CopyDone:
    """The async device-to-host copy's ready event; on the CPU the copy is already done."""

    def synchronize(self):
        pass


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v1_persistent_batch_masks_match_the_native_automaton(world, vllm_config, seed, async_scheduling):
    proc_cls = world.processor()
    assert "v1" in proc_cls.gr2_interfaces
    runner = V1Runner(world, vllm_config, proc_cls, async_scheduling=async_scheduling)
    ours = [lp for lp in runner.logitsprocs.non_argmax_invariant if isinstance(lp, proc_cls)]
    assert len(ours) == 1 and ours[0].interface == "v1"
    pending = make_requests(world, seed)
    specs = {rid: spec for rid, spec, _ in pending}
    max_tokens = {rid: p.max_tokens for rid, _, p in pending}
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    finished, swaps, moves, next_i = {}, 0, 0, 0
    while pending or runner.batch.num_reqs:
        # the runner's order within a step: remove finished, add new (into freed slots), condense, reorder
        while pending and runner.batch.num_reqs < runner.batch.max_num_reqs and rng.random() < 0.8:
            rid, spec, params = pending.pop(0)
            runner.add(rid, spec, params, next_i)
            next_i += 1
        if runner.batch.num_reqs == 0:
            continue
        runner.batch.condense()
        moves += len(runner.batch.batch_update_builder.moved)
        if runner.batch.num_reqs >= 2 and rng.random() < 0.5:
            a, b = sorted(rng.choice(runner.batch.num_reqs, size=2, replace=False).tolist())
            runner.batch.swap_states(int(a), int(b))
            swaps += 1
        picked = runner.step(gen)
        for rid, tok in picked.items():
            out = runner.output(rid)
            if tok == world.eos or len(out) >= max_tokens[rid]:
                finished[rid] = out
                runner.batch.remove_request(rid)  # leaves a hole that condense() fills with a move
    assert swaps > 0 and moves > 0  # the schedule really exercised both kinds of move
    assert len(finished) == 10
    for rid, spec in specs.items():
        if spec is None:
            out = finished[rid]  # untouched (every logit finite at every step): EOS or its max_tokens
            assert out[-1] == world.eos or len(out) == 6
        else:
            assert finished[rid][-1] == world.eos
            world.check_completion(spec, finished[rid])


# --- V2: RequestState + LogitsProcRequestState + LogitsContext ----------------------------------


@pytest.fixture
def v2_buffers_on_cpu(monkeypatch):
    """The only stand-ins of the V2 tests, both for GPU-only steps of the runner's buffers: a host
    "UVA" buffer (the real one pins memory, which needs a CUDA driver) and the staged-write flush (a
    Triton kernel), done with the same semantics on the CPU. RequestState, StagedWriteTensor's
    staging, UvaBackedTensor and everything above them are vLLM's."""
    from vllm.v1.worker.gpu import buffer_utils

    class HostUvaBuffer:
        def __init__(self, size, dtype):
            self.cpu = torch.zeros(size, dtype=dtype, device="cpu")
            self.np = self.cpu.numpy()
            self._uva = self.cpu

        def uva(self, n=None):
            return self._uva[:n] if n is not None else self._uva

    def apply_write(self):
        starts, contents, ends = self._staged_write_starts, self._staged_write_contents, self._staged_write_cu_lens
        lo = 0
        for idx, start, hi in zip(self._staged_write_indices, starts, ends):
            vals = torch.as_tensor(contents[lo:hi], dtype=self.gpu.dtype)
            if self.gpu.dim() == 1:
                self.gpu[idx] = vals[0]
            else:
                self.gpu[idx, start:start + len(vals)] = vals
            lo = hi
        self.clear_staged_writes()

    monkeypatch.setattr(buffer_utils, "UvaBuffer", HostUvaBuffer)
    monkeypatch.setattr(buffer_utils.StagedWriteTensor, "apply_write", apply_write)


class V2Runner:
    """What vLLM's model runner V2 does around the custom logits processors each step, on the CPU."""

    def __init__(self, world, vllm_config, proc_cls, max_num_reqs=4):
        from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors
        from vllm.v1.worker.gpu.states import RequestState

        self.world = world
        self.rs = RequestState(max_num_reqs=max_num_reqs, max_model_len=256, max_num_batched_tokens=512,
                               num_speculative_steps=0, vocab_size=world.vocab, device=CPU)
        procs = build_custom_logits_processors(vllm_config, self.rs, False, [proc_cls])
        assert len(procs) == 1
        self.proc = procs[0]
        self.refs, self.outputs, self.admitted = {}, {}, False

    def add(self, rid, spec, params, i, resumed: list[int] | None = None):
        """Admit a request (``resumed``: the output it had before it was preempted)."""
        prompt = prompt_of(i)
        done = list(resumed or [])
        self.rs.add_request(rid, len(prompt), prompt + done, 0, params.max_tokens)
        slot = self.rs.req_id_to_index[rid]
        claimed = self.proc.add_request(slot, params)
        assert claimed == (spec is not None)
        if resumed is None:
            self.refs[rid] = Reference(self.world, spec, self.world.vocab)
            self.outputs[rid] = []
        self.admitted = True
        return slot

    def remove(self, rid):
        return self.rs.remove_request(rid)

    def step(self, gen: torch.Generator, rng) -> dict[str, int]:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

        if self.admitted:  # the runner flushes its buffers, then the processors', before the forward pass
            self.rs.apply_staged_writes()
            self.proc.apply_staged_writes()
            self.admitted = False
        rids = list(self.rs.req_id_to_index)
        rng.shuffle(rids)  # rows are batch positions, reordered every step
        slots = np.array([self.rs.req_id_to_index[r] for r in rids], dtype=np.int32)
        mapping = torch.as_tensor(slots, dtype=torch.int32)
        total = self.rs.total_len.gpu[mapping.long()]
        ctx = LogitsContext(expanded_idx_mapping=mapping, idx_mapping=mapping, idx_mapping_np=slots,
                            expanded_local_pos=torch.zeros(len(rids), dtype=torch.int32),
                            input_ids=torch.zeros(len(rids), dtype=torch.int32), pos=(total - 1).long(),
                            seq_lens_upper_bound_np=total.numpy().astype(np.int32))
        logits = torch.randn(len(rids), self.world.vocab, generator=gen)
        logits = self.proc.apply(logits, ctx)
        picked = {}
        for row, rid in enumerate(rids):
            ref, slot = self.refs[rid], int(slots[row])
            assert finite(logits[row]) == ref.expected(), (rid, row, slot, len(ref.out))
            tok = int(torch.argmax(logits[row]))
            # commit the way the runner's post-processing does: the token at total_len, then total_len + 1
            n = int(self.rs.total_len.gpu[slot])
            self.rs.all_token_ids.gpu[slot, n] = tok
            self.rs.total_len.gpu[slot] = n + 1
            ref.commit(tok)
            self.outputs[rid].append(tok)
            picked[rid] = tok
        return picked


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_v2_model_runner_masks_match_the_native_automaton(world, vllm_config, v2_buffers_on_cpu, seed):
    proc_cls = world.processor()
    assert "v2" in proc_cls.gr2_interfaces
    runner = V2Runner(world, vllm_config, proc_cls)
    assert runner.proc.interface == "v2"
    pending = make_requests(world, seed)
    specs = {rid: spec for rid, spec, _ in pending}
    params_of = {rid: p for rid, _, p in pending}
    index_of = {rid: i for i, (rid, _, _) in enumerate(pending)}
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    finished, preempted, was_preempted, reused, seen_slots = {}, [], set(), 0, {}
    while pending or preempted or runner.rs.num_reqs:
        if preempted and runner.rs.num_reqs < runner.rs.max_num_reqs and rng.random() < 0.5:
            rid = preempted.pop(0)  # resumed: prefill_len > prompt_len, the partial output re-fed
            runner.add(rid, specs[rid], params_of[rid], index_of[rid], resumed=runner.outputs[rid])
        while pending and runner.rs.num_reqs < runner.rs.max_num_reqs and rng.random() < 0.8:
            rid, spec, params = pending.pop(0)
            slot = runner.add(rid, spec, params, index_of[rid])
            reused += slot in seen_slots.values()
            seen_slots[rid] = slot
        if runner.rs.num_reqs == 0:
            continue
        picked = runner.step(gen, rng)
        for rid, tok in picked.items():
            out = runner.outputs[rid]
            if tok == world.eos or len(out) >= params_of[rid].max_tokens:
                finished[rid] = list(out)
                runner.remove(rid)  # the slot goes back to the free list; the next add_request reuses it
            elif specs[rid] is not None and len(out) == 2 and rid not in was_preempted and rng.random() < 0.4:
                runner.remove(rid)  # preempted; resumed later with its 2 tokens in the prefill
                preempted.append(rid)
                was_preempted.add(rid)
    assert reused > 0 and was_preempted  # slots were recycled (add_request reinitialised them) and requests resumed
    assert len(finished) == 10
    for rid, spec in specs.items():
        if spec is None:
            out = finished[rid]
            assert out[-1] == world.eos or len(out) == 6
        else:
            assert finished[rid][-1] == world.eos
            world.check_completion(spec, finished[rid])


def test_v2_resumed_request_continues_from_its_partial_output(world, vllm_config, v2_buffers_on_cpu):
    """Preemption, deterministically: a request stopped after 3 tokens and re-admitted into another
    slot with its output in the prefill continues under the same automaton state."""
    from vllm import SamplingParams

    spec = {"candidates": [int(world.items[2]), int(world.items[9])], "reasoning": "disabled"}
    params = SamplingParams(temperature=0.0, max_tokens=20, extra_args={"gr2": spec})
    runner = V2Runner(world, vllm_config, world.processor(), max_num_reqs=2)
    gen, rng = torch.Generator().manual_seed(5), np.random.default_rng(5)
    runner.add("keep", spec, params, 0)
    s0 = runner.add("p", spec, params, 1)
    for _ in range(3):
        runner.step(gen, rng)
    runner.remove("keep")
    runner.remove("p")  # freed last, so "other" takes p's slot and p resumes in keep's old one
    runner.add("other", {"candidates": [int(world.items[4])], "reasoning": "disabled"},
               SamplingParams(temperature=0.0, max_tokens=20,
                              extra_args={"gr2": {"candidates": [int(world.items[4])], "reasoning": "disabled"}}), 2)
    s1 = runner.add("p", spec, params, 1, resumed=runner.outputs["p"])
    assert s1 != s0 and runner.rs.req_id_to_index["other"] == s0
    while runner.outputs["p"][-1] != world.eos:
        runner.step(gen, rng)
    world.check_completion(spec, runner.outputs["p"])


def test_v2_refuses_speculative_rows(world, vllm_config, v2_buffers_on_cpu):
    """More logits rows than requests (speculative decoding) is an error, never a misaligned mask."""
    from vllm import SamplingParams
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext

    spec = {"candidates": [int(world.items[1])], "reasoning": "disabled"}
    runner = V2Runner(world, vllm_config, world.processor())
    slot = runner.add("a", spec, SamplingParams(max_tokens=20, extra_args={"gr2": spec}), 0)
    runner.rs.apply_staged_writes()
    m = torch.tensor([slot, slot], dtype=torch.int32)
    ctx = LogitsContext(expanded_idx_mapping=m, idx_mapping=m[:1], idx_mapping_np=np.array([slot], dtype=np.int32),
                        expanded_local_pos=torch.tensor([0, 1], dtype=torch.int32), input_ids=m, pos=m.long(),
                        seq_lens_upper_bound_np=np.array([8], dtype=np.int32))
    with pytest.raises(gr2.ConstraintError, match="speculative"):
        runner.proc.apply(torch.zeros(2, world.vocab), ctx)


def test_interface_choice(world, vllm_config):
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2

    from gr2.decoding.vllm import INTERFACES

    assert INTERFACES == ("v1", "v2")  # vLLM 0.33 ships both
    both = world.processor()
    assert issubclass(both, V1) and issubclass(both, V2)
    only1, only2 = world.processor(interface="v1"), world.processor(interface="v2")
    assert issubclass(only1, V1) and not issubclass(only1, V2)
    assert issubclass(only2, V2) and not issubclass(only2, V1)
    with pytest.raises(gr2.InvalidInputError, match="interface"):
        world.processor(interface="v3")
    with pytest.raises(TypeError, match="v2"):
        only2(vllm_config, CPU, False)  # the V1 constructor call on a V2-only class
    # the V1 loader rejects a V2-only class, as vLLM would at engine start
    from vllm.v1.sample.logits_processor import build_logitsprocs

    with pytest.raises(ValueError, match="subclass"):
        build_logitsprocs(vllm_config, CPU, False, False, [only2])
