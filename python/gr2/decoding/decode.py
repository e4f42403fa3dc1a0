# size: greedy/sampling, beam search and catalog decoding share the scorer, token feeding and result assembly
"""``gr2.constrained_decode``: rerank decoding that can only emit a permutation of the candidates.

Each prompt gets a native automaton (``gr2._gr2.ConstraintBatch``) over its candidates' SIDs. Every
step asks it, for all live rows at once, which tokens are allowed: free-reasoning rows are scored
over the whole vocabulary (minus forbidden tags), every other row over a short list of allowed
ids — inside a SID span by gathering only those rows of the output embedding. The chosen tokens
are fed back to the automaton, which refuses anything it did not allow, so an invalid output is
impossible rather than unlikely.

Log-probabilities are those of the *constrained* distribution at temperature 1: the model's
softmax renormalised over the allowed tokens. A forced token (a tag) has log-probability 0, and an
item's log-probability is the sum over its SID span. :func:`constraint_trace` replays finished
completions through fresh automata and returns the allowed ids behind every token, so a trainer can
score the same constrained distribution with a full forward pass (gr2.train.dapo does).

Sampling seeds: ``seed`` is one int or one int per prompt; every decoded row draws from its own
generator (seeded from the prompt's seed and the row's place among that prompt's rows, or from the
one seed and the row), so a prompt's samples do not depend on which other prompts share the batch
(up to float noise of the batched, left-padded forward pass changing a probability near a draw).

Jump-forward decoding (``jump_forward=True``, the default; as SGLang does for grammars): where the
automaton allows exactly one token (tags, SID delimiters, every SID level after a code that is
unique among the remaining candidates: about 5 of every 6 answer tokens) the token is taken without
a model call and fed in the next forward pass together with the token chosen before it. Outputs and
log-probabilities equal step-by-step decoding (``jump_forward=False``) up to float rounding; beam
search always decodes step by step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from gr2 import _checks as checks
from gr2 import _gr2
from gr2._rows import id_array
from gr2.decoding._model import StepModel
from gr2.decoding._setup import (
    MAX_REASONING_TOKENS,
    add_rerank_rows,
    as_candidates,
    build_token_map,
    candidate_codes,
    eos_id,
    prompt_texts,
    resolve_sid_tokens,
)
from gr2.errors import ConstraintError, InternalError, InvalidInputError
from gr2.rewards import CompletionParts, parse_completion_ids
from gr2.tokens import SidTokens

NEG_INF = float("-inf")


@dataclass
class RerankResult:
    """One decoded completion.

    ``items`` are the reranked candidate ids (uint64, K), ``completion_ids`` the generated token ids
    up to and including ``</answer>`` (EOS excluded), ``text`` their decoding, ``reasoning`` the text
    between ``<think>`` and ``</think>``, ``item_logprobs`` the constrained log-probability of each
    item's SID span (float64, K), ``logprob`` the sum over the whole completion. ``valid`` is always
    True: the automaton makes any other output impossible.
    """

    items: np.ndarray
    text: str
    reasoning: str
    item_logprobs: np.ndarray
    completion_ids: list[int]
    prompt_index: int
    logprob: float
    valid: bool = True
    reasoning_ids: list[int] = field(default_factory=list, repr=False)
    #: constrained log-probability (temperature 1) of each token of ``completion_ids``
    token_logprobs: list[float] = field(default_factory=list, repr=False)


@dataclass
class AllowedTrace:
    """The constraint behind each token of one completion (from :func:`constraint_trace`).

    Token ``t`` was drawn from ``ids[offsets[t]:offsets[t + 1]]`` when ``free[t]`` is False, else
    from the reasoning vocabulary: every id of the model's logits except ``forbidden`` (shared by
    all traces of one token map). A list of one id is a forced token (log-probability 0)."""

    free: np.ndarray  # bool (c,)
    offsets: np.ndarray  # int64 (c + 1,)
    ids: np.ndarray  # int64 (offsets[-1],)
    forbidden: np.ndarray  # int64, sorted

    def __len__(self) -> int:
        return int(self.free.shape[0])


@dataclass
class _Settings:
    do_sample: bool
    temperature: float
    top_p: float
    num_beams: int
    num_return_sequences: int
    seed: int | None  # one seed for the call (sampling)
    seeds: list[int] | None = None  # one seed per prompt (sampling)
    jump_forward: bool = True  # forced tokens ride along with the next decode step

    def row_generators(self, prompt_of_row: np.ndarray) -> list[torch.Generator] | None:
        """One generator per decoded row (None when greedy): row j of prompt p is seeded from
        (``seeds[p]``, j), or from (``seed``, row) with one seed for the call. A row's draws then
        depend only on its own distributions, not on which rows draw beside it: a prompt's samples
        do not depend on the other prompts of the batch, and jump-forward decoding (which moves
        rows through their completions at different speeds) draws exactly what step-by-step draws."""
        if not self.do_sample:
            return None
        out = []
        for row, p in enumerate(prompt_of_row):
            j = row - int(np.searchsorted(prompt_of_row, p))  # rows of a prompt are contiguous
            parts = [self.seeds[int(p)], j] if self.seeds is not None else [int(self.seed or 0), row]
            state = np.random.SeedSequence([int(x) % (2**63) for x in parts]).generate_state(2, dtype=np.uint64)
            out.append(torch.Generator().manual_seed(int(state[0] >> np.uint64(1))))
        return out


# A beam or sample count past this is a typo, not a request: it would only exhaust memory.
MAX_SEQUENCES = 4096


def _check_settings(do_sample, temperature, top_p, num_beams, num_return_sequences, seed) -> _Settings:
    do_sample = checks.flag("do_sample", do_sample)
    num_beams = checks.whole("num_beams", num_beams, 1, MAX_SEQUENCES)
    num_return_sequences = checks.whole("num_return_sequences", num_return_sequences, 1, MAX_SEQUENCES)
    if do_sample and num_beams > 1:
        raise InvalidInputError("beam search with sampling is not supported; use num_beams=1 or do_sample=False")
    if not do_sample and num_beams == 1 and num_return_sequences > 1:
        raise InvalidInputError("greedy decoding returns one sequence; use do_sample=True or num_beams >= num_return_sequences")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise InvalidInputError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    temperature, top_p = checks.finite("temperature", temperature), checks.finite("top_p", top_p)
    if not temperature > 0:
        raise InvalidInputError(f"temperature must be a positive finite number, got {temperature}")
    if not (0 < top_p <= 1):
        raise InvalidInputError(f"top_p must be in (0, 1], got {top_p}")
    one, seeds = None, None
    if do_sample and seed is not None and not isinstance(seed, (int, np.integer)):
        try:
            seeds = [int(x) for x in seed]
        except (TypeError, ValueError, OverflowError):
            raise InvalidInputError(f"seed must be an int, a sequence of ints (one per prompt) or None, got {seed!r:.60}") from None
    elif do_sample:
        one = int(seed) if seed is not None else int(torch.seed() % (2**63))
    return _Settings(do_sample, temperature, top_p, num_beams, num_return_sequences, one, seeds)


def _check_seeds(settings: _Settings, n_prompts: int) -> None:
    if settings.seeds is not None and len(settings.seeds) != n_prompts:
        raise InvalidInputError(f"{len(settings.seeds)} seeds for {n_prompts} prompts; pass one seed per prompt")


def _reasoning_mode(reasoning: Any) -> str:
    if reasoning is True:
        return "think"
    if reasoning is False or reasoning is None:
        return "disabled"
    if isinstance(reasoning, str) and reasoning in ("think", "in_think", "disabled"):
        return reasoning
    raise InvalidInputError(f"reasoning must be True, False, 'think', 'in_think' or 'disabled', got {reasoning!r}")


class _Scorer:
    """Turns one step's model output into log-probabilities over each row's allowed tokens."""

    def __init__(self, step_model: StepModel, forbidden: np.ndarray):
        self.sm = step_model
        self.forbidden = torch.as_tensor(forbidden, dtype=torch.long, device=step_model.device)

    def groups(self, out: torch.Tensor, allowed: tuple[np.ndarray, np.ndarray, np.ndarray]):
        """Yield (positions, ids or None, logprobs, counts or None). ``ids`` is (n, A) for sparse
        rows (padded with -inf log-probs), ``counts`` their list lengths; None for free rows, whose
        logprobs span the whole vocabulary."""
        offsets, ids, free = allowed
        free_pos = np.nonzero(free)[0]
        sparse_pos = np.nonzero(~free)[0]
        if free_pos.size:
            idx = torch.as_tensor(free_pos, device=out.device)
            logits = self.sm.full_logits(out.index_select(0, idx))
            logits[:, self.forbidden] = NEG_INF
            yield free_pos, None, torch.log_softmax(logits, dim=-1), None
        if sparse_pos.size:
            counts = (offsets[1:] - offsets[:-1])[sparse_pos]
            width = int(counts.max())
            padded = np.zeros((sparse_pos.size, width), dtype=np.int64)
            valid = np.arange(width)[None, :] < counts[:, None]
            starts = offsets[:-1][sparse_pos]
            padded[valid] = ids[(starts[:, None] + np.arange(width)[None, :])[valid]]
            id_t = torch.as_tensor(padded, device=out.device)
            idx = torch.as_tensor(sparse_pos, device=out.device)
            logits = self.sm.sparse_logits(out.index_select(0, idx), id_t)
            logits = logits.masked_fill(~torch.as_tensor(valid, device=out.device), NEG_INF)
            yield sparse_pos, id_t, torch.log_softmax(logits, dim=-1), counts


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    # Drop a token when the mass before it already reaches top_p (the first token always stays).
    drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, NEG_INF)


def _draw(probs: torch.Tensor, counts, generators: list[torch.Generator]) -> torch.Tensor:
    """One sampled index per row of ``probs`` (CPU), each row from its own generator over its own
    width; a row with one allowed token (forced) takes it without a draw."""
    choice = torch.zeros(probs.shape[0], dtype=torch.long)
    for i, generator in enumerate(generators):
        width = probs.shape[1] if counts is None else int(counts[i])
        if width > 1:
            choice[i] = torch.multinomial(probs[i, :width], 1, generator=generator)[0]
    return choice


def _choose(scorer: _Scorer, out: torch.Tensor, allowed, settings: _Settings, n_rows: int,
            generators: list[torch.Generator] | None = None):
    """One token per row (greedy or sampled from ``generators``, one per row) and its constrained
    log-probability."""
    tokens = torch.empty(n_rows, dtype=torch.long)
    logprobs = torch.empty(n_rows, dtype=torch.float64)
    for pos, ids, lp, counts in scorer.groups(out, allowed):
        if settings.do_sample:
            assert generators is not None
            scaled = _top_p_filter(lp / settings.temperature, settings.top_p)
            probs = torch.softmax(scaled, dim=-1).cpu()
            choice = _draw(probs, counts, [generators[i] for i in pos]).to(lp.device)
        else:
            choice = lp.argmax(dim=-1)
        chosen_lp = lp.gather(1, choice.view(-1, 1)).view(-1)
        tok = choice if ids is None else ids.gather(1, choice.view(-1, 1)).view(-1)
        pos_t = torch.as_tensor(pos)
        tokens[pos_t] = tok.cpu()
        logprobs[pos_t] = chosen_lp.double().cpu()
    return tokens, logprobs


def _append_forced(batch, active: np.ndarray, runs: list[list[int]], history, logprobs) -> None:
    """Jump forward: while a live row's automaton allows exactly one token, take it (log-prob 0, no
    model call) and append it to the row's run of tokens to feed."""
    pending = np.arange(active.size)
    while pending.size:
        pending = pending[batch.phases()[active[pending]] != 3]
        if not pending.size:
            return
        rows = active[pending].astype(np.int64)
        offsets, ids, free = batch.allowed(rows)
        single = ~np.asarray(free, dtype=bool) & (np.diff(offsets) == 1)
        if not single.any():
            return
        pending, rows = pending[single], rows[single]
        forced = np.asarray(ids)[offsets[:-1][single]].astype(np.int64)
        batch.advance(rows, forced)
        for j, r, t in zip(pending.tolist(), rows.tolist(), forced.tolist()):
            runs[j].append(t)
            history[r].append(t)
            logprobs[r].append(0.0)


def _feed(sm: StepModel, runs: list[list[int]]) -> torch.Tensor:
    """Each row's run of tokens in one forward pass (right-padded)."""
    lengths = torch.as_tensor([len(r) for r in runs], dtype=torch.long)
    tokens = torch.zeros((len(runs), int(lengths.max())), dtype=torch.long)
    for i, run in enumerate(runs):
        tokens[i, : len(run)] = torch.as_tensor(run)
    return sm.extend(tokens, lengths)


def _max_steps(k: int, levels: int, budget: int) -> int:
    return budget + 3 + 1 + k * (levels + 2) + 2 + 1


@torch.inference_mode()
def constrained_decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    candidates: Any,
    index: Any = None,
    sid_tokens: SidTokens | None = None,
    max_reasoning_tokens: int = 128,
    reasoning: bool | str = True,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    seed: int | Sequence[int] | None = None,
    *,
    eos_token_id: int | None = None,
    jump_forward: bool = True,
) -> list[RerankResult]:
    """Rerank ``candidates`` for ``prompts`` (B) with a causal LM; every result is a valid
    permutation of its row's candidates. ``candidates`` is a (B, K) array or B lists of item ids
    of any lengths >= 1 (ragged K: requests with different candidate counts in one batch).

    ``reasoning``: True opens with ``<think>`` and allows up to ``max_reasoning_tokens`` of free text
    before ``</think>`` is forced; ``'in_think'`` when the prompt already ends with ``<think>``; False
    starts at ``<answer>``. Greedy by default; ``do_sample`` (temperature, top_p, ``seed``) or
    ``num_beams > 1`` (beam search on the constrained log-probabilities); ``seed`` is an int or one
    int per prompt (each prompt then samples from its own generator). Returns
    ``num_return_sequences`` results per prompt, prompt by prompt. Beam search returns distinct
    permutations only: when fewer than ``num_return_sequences`` distinct ones survive the beam
    (e.g. K = 2 has two), a prompt gets fewer results (check ``prompt_index``). Duplicate
    candidates in a row raise InvalidInputError; an item the index lacks raises
    UnknownItemError naming the request and the candidate column; an empty row raises
    InvalidInputError. ``jump_forward=False`` spends a decode step on every forced token (same
    results; for comparison and benchmarks).
    """
    settings = _check_settings(do_sample, temperature, top_p, num_beams, num_return_sequences, seed)
    settings.jump_forward = checks.flag("jump_forward", jump_forward)
    max_reasoning_tokens = checks.whole("max_reasoning_tokens", max_reasoning_tokens, 0, MAX_REASONING_TOKENS)
    mode = _reasoning_mode(reasoning)
    model, tokenizer = checks.causal_lm(model), checks.tokenizer(tokenizer)
    texts = prompt_texts(tokenizer, prompts)
    cands = as_candidates(candidates)
    if len(cands) != len(texts):
        raise InvalidInputError(f"{len(texts)} prompts but {len(cands)} candidate rows")
    _check_seeds(settings, len(texts))
    tokens = resolve_sid_tokens(tokenizer, index, sid_tokens)
    codes = candidate_codes(index, cands, tokens.levels)
    eos = eos_id(tokenizer, eos_token_id)

    step_model = StepModel(model)
    token_map = build_token_map(tokens, eos=eos, vocab_size=step_model.vocab_size, tokenizer=tokenizer)
    scorer = _Scorer(step_model, token_map.reasoning_forbidden())
    input_ids, attention_mask = _encode(tokenizer, texts, step_model.device, eos)
    max_steps = _max_steps(cands.width, tokens.levels, int(max_reasoning_tokens))

    def make_batch(repeat: int):
        batch = _gr2.ConstraintBatch(token_map)
        add_rerank_rows(batch, cands, codes, reasoning=mode, max_reasoning_tokens=int(max_reasoning_tokens),
                        repeat=repeat)
        return batch

    return _run(model, tokenizer, tokens, step_model, scorer, make_batch, len(texts), input_ids, attention_mask,
                settings, max_steps, eos, in_think=mode == "in_think", answer_tags=True)


def constraint_trace(
    tokenizer: Any,
    candidates: Any,
    completions: Sequence[Sequence[int]],
    vocab_size: int,
    index: Any = None,
    sid_tokens: SidTokens | None = None,
    max_reasoning_tokens: int = 128,
    reasoning: bool | str = True,
    *,
    codes: Any = None,
    eos_token_id: int | None = None,
) -> list[AllowedTrace]:
    """Replay ``completions`` (one per row of ``candidates``, (N, K) or ragged; token ids as
    :func:`constrained_decode` produced them, optionally ending with EOS) through fresh rerank
    automata and return, per completion, the allowed ids behind each token. ``reasoning`` and
    ``max_reasoning_tokens`` must be those of the decode call; ``vocab_size`` is the number of the
    model's logits. ``codes`` (N, K, L), or (total candidates, L) when ragged, replaces the index lookup. A token the automaton would not
    have allowed raises ConstraintError."""
    mode = _reasoning_mode(reasoning)
    cands = as_candidates(candidates)
    if len(cands) != len(completions):
        raise InvalidInputError(f"{len(completions)} completions but {len(cands)} candidate rows")
    tokens = resolve_sid_tokens(tokenizer, index, sid_tokens)
    if codes is None:
        codes = candidate_codes(index, cands, tokens.levels)
    else:
        codes = np.asarray(codes)
        if codes.size != cands.flat.size * tokens.levels:
            raise InvalidInputError(f"codes hold {codes.size} values, expected {cands.flat.size} candidates x "
                                    f"{tokens.levels} levels")
    codes = np.ascontiguousarray(codes.reshape(-1, tokens.levels), dtype=np.uint16)
    token_map = build_token_map(tokens, eos=eos_id(tokenizer, eos_token_id), vocab_size=int(vocab_size), tokenizer=tokenizer)
    forbidden = np.asarray(token_map.reasoning_forbidden(), dtype=np.int64)
    batch = _gr2.ConstraintBatch(token_map)
    add_rerank_rows(batch, cands, codes, reasoning=mode, max_reasoning_tokens=int(max_reasoning_tokens))
    seqs = [np.asarray(c, dtype=np.int64) for c in completions]
    lengths = np.array([len(c) for c in seqs], dtype=np.int64)
    n = len(seqs)
    free = [np.zeros(int(m), dtype=bool) for m in lengths]
    counts = [np.zeros(int(m), dtype=np.int64) for m in lengths]
    chunks: list[list[np.ndarray]] = [[] for _ in range(n)]
    for t in range(int(lengths.max(initial=0))):
        rows = np.nonzero(lengths > t)[0].astype(np.int64)
        finished = rows[batch.phases()[rows] == 3]
        if finished.size:
            raise ConstraintError(f"completion {int(finished[0])} goes on after the automaton finished (token {t})")
        offsets, ids, row_free = batch.allowed(rows)
        step_tokens = np.array([seqs[r][t] for r in rows], dtype=np.int64)
        batch.advance(rows, step_tokens)  # raises ConstraintError on a token that was not allowed
        for j, r in enumerate(rows):
            free[r][t] = bool(row_free[j])
            counts[r][t] = offsets[j + 1] - offsets[j]
            if not row_free[j]:
                chunks[r].append(ids[offsets[j]:offsets[j + 1]])
    out = []
    for r in range(n):
        offs = np.zeros(int(lengths[r]) + 1, dtype=np.int64)
        np.cumsum(counts[r], out=offs[1:])
        ids_r = np.concatenate(chunks[r]).astype(np.int64) if chunks[r] else np.zeros(0, dtype=np.int64)
        out.append(AllowedTrace(free[r], offs, ids_r, forbidden))
    return out


def _run(model, tokenizer, tokens, step_model, scorer, make_batch, n_prompts, input_ids, attention_mask, settings,
         max_steps, eos, *, in_think: bool, answer_tags: bool) -> list[RerankResult]:
    """Decode with the automata ``make_batch`` builds (beam search or sampling/greedy), in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if settings.num_beams > 1:
            rows = _beam_search(step_model, scorer, make_batch, n_prompts, input_ids, attention_mask, settings,
                                max_steps, eos)
        else:
            rows = _sample_or_greedy(step_model, scorer, make_batch, n_prompts, input_ids, attention_mask,
                                     settings, max_steps, settings.jump_forward)
    finally:
        model.train(was_training)
    return [_result(tokenizer, tokens, eos, in_think, answer_tags, *row) for row in rows]


def _encode(tokenizer: Any, texts: list[str], device: torch.device, eos: int):
    """Left-padded ids and attention mask (prompts are already templated: no special tokens added)."""
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if any(len(e) == 0 for e in encoded):
        raise InvalidInputError("a prompt tokenises to zero tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):] = torch.as_tensor(e)
        mask[i, width - len(e):] = 1
    return ids.to(device), mask.to(device)


def _sample_or_greedy(sm, scorer, make_batch, n_prompts, input_ids, attention_mask, settings, max_steps,
                      jump_forward: bool = True):
    """Greedy or sampled decoding. With ``jump_forward`` a row's forced tokens (the automaton
    allows exactly one: tags, delimiters, SID levels fixed by the code before them) take no decode
    step: they are appended to the next forward pass together with the token chosen before them."""
    nrs = settings.num_return_sequences
    batch = make_batch(nrs)
    n_rows = len(batch)
    prompt_of_row = np.repeat(np.arange(n_prompts), nrs)
    generators = settings.row_generators(prompt_of_row)
    out = sm.prefill(input_ids, attention_mask)
    if nrs > 1:
        expand = torch.as_tensor(prompt_of_row)
        sm.select_rows(expand)
        out = out.index_select(0, expand.to(out.device))
    history: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    active = np.arange(n_rows)
    for _ in range(max_steps):
        allowed = batch.allowed(active.astype(np.int64))
        tok, lp = _choose(scorer, out, allowed, settings, active.size,
                          None if generators is None else [generators[r] for r in active])
        batch.advance(active.astype(np.int64), tok.numpy())
        runs = [[int(t)] for t in tok.tolist()]
        for j, row in enumerate(active):
            history[row].append(runs[j][0])
            logprobs[row].append(float(lp[j]))
        if jump_forward:
            _append_forced(batch, active, runs, history, logprobs)
        live = batch.phases()[active] != 3
        if not live.any():
            break
        if not live.all():
            keep = np.nonzero(live)[0]
            sm.select_rows(torch.as_tensor(keep))
            active, runs = active[keep], [runs[k] for k in keep]
        out = _feed(sm, runs)
    else:
        raise ConstraintError(f"decoding did not finish within {max_steps} steps; this is a gr2 bug")
    return [(int(prompt_of_row[r]), batch.emitted(r), history[r], logprobs[r]) for r in range(n_rows)]


def _beam_search(sm, scorer, make_batch, n_prompts, input_ids, attention_mask, settings, max_steps, eos):
    """Beam search on the sum of constrained log-probabilities. Finished beams keep their score and
    compete with live ones; the search ends when every kept beam has finished."""
    b, nb = n_prompts, settings.num_beams
    batch = make_batch(nb)
    out = sm.prefill(input_ids, attention_mask)
    expand = torch.as_tensor(np.repeat(np.arange(b), nb))
    sm.select_rows(expand)
    out = out.index_select(0, expand.to(out.device))
    n_rows = b * nb
    scores = torch.full((b, nb), NEG_INF, dtype=torch.float64)
    scores[:, 0] = 0.0  # identical beams at the start: only the first one is live
    history: list[list[int]] = [[] for _ in range(n_rows)]
    logprobs: list[list[float]] = [[] for _ in range(n_rows)]
    for _ in range(max_steps):
        done = torch.as_tensor(batch.phases() == 3)
        if bool(done.all()):
            break
        # Candidate (beam, token, score) triples: up to nb per beam.
        cand_token = torch.full((n_rows, nb), eos, dtype=torch.long)
        cand_lp = torch.full((n_rows, nb), NEG_INF, dtype=torch.float64)
        live_rows = np.nonzero(~done.numpy())[0]
        allowed = batch.allowed(live_rows.astype(np.int64))
        live_out = out.index_select(0, torch.as_tensor(live_rows, device=out.device))
        for pos, ids, lp, _ in scorer.groups(live_out, allowed):
            width = min(nb, lp.shape[1])
            top_lp, top_idx = lp.topk(width, dim=-1)
            tok = top_idx if ids is None else ids.gather(1, top_idx)
            rows_t = torch.as_tensor(live_rows[pos])
            cand_lp[rows_t, :width] = top_lp.double().cpu()
            cand_token[rows_t, :width] = tok.cpu()
        # A finished beam carries itself over once, unchanged.
        cand_token[done, 0] = eos
        cand_lp[done, 0] = 0.0
        cand_score = scores.view(-1, 1) + cand_lp
        best, flat_idx = cand_score.view(b, nb * nb).topk(nb, dim=-1)
        src_beam = flat_idx // nb
        src_row = (torch.arange(b).view(-1, 1) * nb + src_beam).view(-1)
        new_token = cand_token.view(b, nb * nb).gather(1, flat_idx).view(-1)
        new_lp = cand_lp.view(b, nb * nb).gather(1, flat_idx).view(-1)
        # Dead candidates (-inf: fewer valid continuations than beams) copy the prompt's best beam.
        dead = ~torch.isfinite(best.view(-1))
        if bool(dead.any()):
            first_row = (torch.arange(b) * nb).repeat_interleave(nb)
            src_row = torch.where(dead, src_row[first_row], src_row)
            new_token = torch.where(dead, new_token[first_row], new_token)
            new_lp = torch.where(dead, new_lp[first_row], new_lp)
        src_done = done[src_row]
        batch = batch.select(src_row.tolist())
        batch.advance(np.arange(n_rows, dtype=np.int64), new_token.numpy())
        history = [list(history[s]) for s in src_row.tolist()]
        logprobs = [list(logprobs[s]) for s in src_row.tolist()]
        for r in range(n_rows):
            if not bool(src_done[r]):
                history[r].append(int(new_token[r]))
                logprobs[r].append(float(new_lp[r]))
        scores = best
        sm.select_rows(src_row)
        if bool(torch.as_tensor(batch.phases() == 3).all()):
            break
        out = sm.step(new_token.to(sm.device))
    else:
        raise ConstraintError(f"beam search did not finish within {max_steps} steps; this is a gr2 bug")
    # Slots whose score is -inf are dead (fewer distinct continuations than beams: they only
    # mirror a live beam) and never returned; beams that reached the same items with different
    # reasoning count once (the best). So a prompt may get fewer than num_return_sequences.
    results = []
    for p in range(b):
        order = torch.argsort(scores[p], descending=True, stable=True)
        seen: set[tuple[int, ...]] = set()
        for beam in order.tolist():
            if len(seen) == settings.num_return_sequences or not bool(torch.isfinite(scores[p, beam])):
                break
            r = p * nb + beam
            items = batch.emitted(r)
            key = tuple(items.tolist())
            if key in seen:
                continue
            seen.add(key)
            results.append((p, items, history[r], logprobs[r]))
    return results


def _completion_parts(tokens: SidTokens, history: list[int], in_think: bool,
                      answer_tags: bool) -> tuple[CompletionParts, list[int]]:
    """The verifier's parse (:func:`gr2.rewards.parse_completion_ids`, the one grammar) of a decoded
    completion, and for each of its positions the index into ``history`` (-1: a tag the prompt or
    the framing implies, added for the parse): ``<think>`` when the prompt ends with it
    (``in_think``), ``<answer>``/``</answer>`` around the SIDs of a catalog output without answer
    tags (right after its ``</think>``: the automaton keeps tags out of the reasoning)."""
    pos = ([-1] if in_think else []) + list(range(len(history)))
    if not answer_tags:
        close = next((i for i, p in enumerate(pos) if p >= 0 and history[p] == tokens.think_close), None)
        at = 0 if close is None else close + 1
        pos = pos[:at] + [-2] + pos[at:] + [-3]
    virtual = {-1: tokens.think_open, -2: tokens.answer_open, -3: tokens.answer_close}
    parts = parse_completion_ids([virtual[p] if p < 0 else history[p] for p in pos], tokens)
    if parts is None:  # the automaton only emits what the verifier accepts: a bug if not
        raise InternalError(f"constrained decoding produced a completion the verifier rejects: {history[:40]}")
    return parts, [max(p, -1) for p in pos]


def _result(tokenizer, tokens: SidTokens, eos: int, in_think: bool, answer_tags: bool, prompt_index, items, history,
            logprobs) -> RerankResult:
    if history and history[-1] == eos:
        history, logprobs = history[:-1], logprobs[:-1]
    parts, pos = _completion_parts(tokens, history, in_think, answer_tags)
    think = range(parts.think[0] + 1, parts.think[1] - 1) if parts.think else range(0)
    reasoning_ids = [history[pos[i]] for i in think if pos[i] >= 0]
    item_lps = []
    for start, end in parts.sids:
        span = 0.0
        for i in range(start, end):
            span += logprobs[pos[i]]
        item_lps.append(span)
    return RerankResult(
        items=np.asarray(items, dtype=np.uint64),
        text=tokenizer.decode(history, skip_special_tokens=False),
        reasoning=tokenizer.decode(reasoning_ids, skip_special_tokens=False),
        item_logprobs=np.asarray(item_lps, dtype=np.float64),
        completion_ids=list(history),
        prompt_index=int(prompt_index),
        logprob=float(sum(logprobs)),
        reasoning_ids=reasoning_ids,
        token_logprobs=[float(x) for x in logprobs],
    )


@torch.inference_mode()
def catalog_decode(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    index: Any,
    n_items: int = 1,
    exclude: Sequence[Any] | None = None,
    sid_tokens: SidTokens | None = None,
    reasoning: bool | str = False,
    max_reasoning_tokens: int = 0,
    answer_tags: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_beams: int = 1,
    num_return_sequences: int = 1,
    seed: int | Sequence[int] | None = None,
    *,
    eos_token_id: int | None = None,
    jump_forward: bool = True,
) -> list[RerankResult]:
    """Generate ``n_items`` distinct catalog items per prompt (next-item generation), never one in
    ``exclude[i]`` (e.g. the user's history). By default the completion is just the SIDs then EOS;
    ``answer_tags`` wraps them in ``<answer>..</answer>`` and ``reasoning`` adds a think span as in
    :func:`constrained_decode`. ``index`` must offer ``item_ids()`` and ``codes()`` (gr2.SidIndex).
    The catalog trie of a gr2.SidIndex is built on the first call and kept with the index
    (``SidTrie.from_index``), so later calls skip that pass over the catalog; any other object
    (an array-backed stand-in, which may change between calls) gets a fresh trie per call.
    Results are :class:`RerankResult` with ``items`` = the generated catalog items. Beam search
    returns distinct item lists only, so a prompt gets fewer than ``num_return_sequences`` results
    when fewer distinct lists exist (e.g. 6 beams over 3 remaining items and ``n_items=1``)."""
    settings = _check_settings(do_sample, temperature, top_p, num_beams, num_return_sequences, seed)
    settings.jump_forward = checks.flag("jump_forward", jump_forward)
    n_items = checks.whole("n_items", n_items, 1)
    max_reasoning_tokens = checks.whole("max_reasoning_tokens", max_reasoning_tokens, 0, MAX_REASONING_TOKENS)
    answer_tags = checks.flag("answer_tags", answer_tags)
    mode = _reasoning_mode(reasoning)
    model, tokenizer = checks.causal_lm(model), checks.tokenizer(tokenizer)
    checks.has_methods("index", index, ("item_ids", "codes"), "a gr2.SidIndex")
    texts = prompt_texts(tokenizer, prompts)
    if exclude is not None and (isinstance(exclude, (str, bytes)) or not isinstance(exclude, Sequence)):
        raise InvalidInputError(f"exclude must be one list of item ids per prompt, got {type(exclude).__name__}")
    if exclude is not None and len(exclude) != len(texts):
        raise InvalidInputError(f"{len(texts)} prompts but {len(exclude)} exclude lists")
    _check_seeds(settings, len(texts))
    excludes = [id_array([] if e is None else e, "exclude", f"[{i}]")
                for i, e in enumerate(exclude if exclude is not None else [None] * len(texts))]
    tokens = resolve_sid_tokens(tokenizer, index, sid_tokens)
    eos = eos_id(tokenizer, eos_token_id)
    step_model = StepModel(model)
    token_map = build_token_map(tokens, eos=eos, vocab_size=step_model.vocab_size, tokenizer=tokenizer)
    if isinstance(index, _gr2.SidIndex):  # read in Rust once per index, no item_ids()/codes() copies
        trie = _gr2.SidTrie.from_index(index)
    else:  # any object with item_ids() and codes() (tests, array-backed stand-ins)
        trie = _gr2.SidTrie(np.ascontiguousarray(index.item_ids(), dtype=np.uint64),
                            np.ascontiguousarray(index.codes(), dtype=np.uint16))
    scorer = _Scorer(step_model, token_map.reasoning_forbidden())
    input_ids, attention_mask = _encode(tokenizer, texts, step_model.device, eos)
    max_steps = _max_steps(int(n_items), tokens.levels, int(max_reasoning_tokens))

    def make_batch(repeat: int):
        batch = _gr2.ConstraintBatch(token_map)
        rows = [e for e in excludes for _ in range(repeat)]
        batch.add_catalog(trie, n_items=int(n_items), exclude=rows, reasoning=mode,
                          max_reasoning_tokens=int(max_reasoning_tokens), answer_tags=answer_tags)
        return batch

    return _run(model, tokenizer, tokens, step_model, scorer, make_batch, len(texts), input_ids, attention_mask,
                settings, max_steps, eos, in_think=mode == "in_think", answer_tags=answer_tags)
