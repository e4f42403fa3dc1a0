"""Teacher reasoning traces for reasoning SFT (stage 2 of GR2).

A teacher reads a user's history and the K upstream candidates and writes
``<think>reasoning</think><answer>SID ... SID</answer>``. Two modes (docs/DESIGN.md §1):

* ``targeted``  -- the target is revealed in the prompt; the teacher explains it and ranks it first;
* ``rejection`` -- the target is hidden; sample up to ``attempts`` completions and keep the first
  whose ranking puts the target first (the better mode in the paper). Acceptance rate and attempts
  per kept trace are reported. ``accept_rank`` relaxes "first" to "within the first
  ``accept_rank`` positions": more, noisier traces; ``accept_rank = K`` keeps every valid greedy
  ranking (plain distillation of the teacher, no selection on the label).

Three backends:

* ``openai``    -- any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, a hosted API),
  through :class:`gr2.teacher_client.OpenAIChatClient`: thread-pool concurrency, retries with
  backoff, ``Retry-After`` through one shared rate limiter, a per-request deadline, a disk cache
  keyed by endpoint + request that keeps only replies that parse (a killed run resumes without
  re-asking), vLLM's separate ``reasoning_content``, clean Ctrl-C. A request the endpoint rejects
  for good (e.g. HTTP 400 for one over-long prompt) is recorded as that example's ``failure``
  and the stage goes on; the client's counters go into ``report.json``;
* ``local``     -- a transformers model folder, sampled with ``generate``;
* ``heuristic`` -- an offline stand-in with no LLM: it scores candidates with a transparent formula
  (the upstream order, the prompt's co-engagement evidence, genre overlap with the user's profile,
  optionally co-occurrence, popularity and release year, all from the split's fit data -- the
  interactions the list's upstream ranker saw, never the target or the user's later items),
  samples rankings with Gumbel noise, and writes a structured rationale from those figures. Every
  artefact it produces says "heuristic teacher". Its greedy ranking of the valid/test lists is
  written to ``teacher/rankings_<split>.npz`` and scored by ``gr2 eval`` like any method.

Prompts are the student's (``prompts/<split>`` rendered by :func:`gr2.prompts.request_messages`),
for the reasoning arm or the answer-only arm (:mod:`gr2.arms`: answer-only traces are just the
``<answer>`` block). Completions are parsed by :func:`gr2.verify_rewards`, the one grammar.

The ``traces`` stage that runs a teacher over a run directory is :mod:`gr2.pipeline.traces`.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from gr2.data.catalog import ItemCatalog
from gr2.errors import ConfigError, Gr2Error
from gr2.teacher_client import (  # noqa: F401  (re-exported: gr2.teacher.OpenAIChatClient etc.)
    OpenAIChatClient,
    TeacherCancelled,
    TeacherEndpointError,
    TeacherRequestError,
)
from gr2.tokens import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN, sid_to_text
from gr2.train.devices import choose_device

HEURISTIC_LABEL = "heuristic teacher"
log = logging.getLogger(__name__)


class TeacherAcceptanceError(Gr2Error, RuntimeError):
    """The share of examples with a kept trace fell below ``teacher.min_acceptance``; the message
    counts the reasons (invalid completions, rankings without the target first, failed requests).
    ``summary`` is the stage report (also written to ``report.json``)."""

    def __init__(self, message: str, summary: dict[str, Any]):
        super().__init__(message)
        self.summary = summary


@dataclass
class TeacherConfig:
    backend: str = "heuristic"  # heuristic | openai | local
    mode: str = "rejection"  # rejection | targeted
    split: str = "train"  # which candidates split to write traces for
    max_examples: int = 0  # 0 = every user of the split whose target is among the candidates
    attempts: int = 8  # rejection-sampling budget per example
    # rejection keeps a sample whose ranking puts the target within the first accept_rank
    # positions: 1 is the paper's rule; >= K keeps the first valid sample of every list
    accept_rank: int = 1
    temperature: float = 1.0
    seed: int = 0
    # heuristic teacher: weights of the transparent score (see HeuristicTeacher)
    w_upstream: float = 1.0  # trust in the upstream order: -log(position)
    w_evidence: float = 1.0  # the prompt's co-engagement evidence: -log(evidence rank)
    w_cooccur: float = 0.0
    w_genre: float = 0.5
    w_popularity: float = 0.0
    w_year: float = 0.0
    cooccur_window: int = 5
    noise: float = 0.3  # Gumbel scale of sampled (non-greedy) rankings, times temperature
    # openai backend
    endpoint: str = ""  # e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0
    max_tokens: int = 512
    # the stage fails (TeacherAcceptanceError) when fewer than this share of the examples get a
    # kept trace: a misconfigured teacher (wrong model, chat template, reasoning parser) is caught
    # here, not as "0 kept traces" in SFT. 0 turns the check off.
    min_acceptance: float = 0.05
    # local backend
    local_model: str = ""

    def __post_init__(self) -> None:
        if self.backend not in ("heuristic", "openai", "local"):
            raise ConfigError(f"teacher.backend must be heuristic, openai or local, got {self.backend!r}")
        if self.mode not in ("rejection", "targeted"):
            raise ConfigError(f"teacher.mode must be rejection or targeted, got {self.mode!r}")
        if self.split not in ("train", "valid", "test"):
            raise ConfigError(f"teacher.split must be train, valid or test, got {self.split!r}")
        if isinstance(self.accept_rank, bool) or not isinstance(self.accept_rank, int) or self.accept_rank < 1:
            raise ConfigError(f"teacher.accept_rank must be an integer >= 1 (1: target first), got {self.accept_rank!r}")
        if self.attempts <= 0 or self.concurrency <= 0 or self.max_retries < 0:
            raise ConfigError("teacher.attempts and concurrency must be > 0, max_retries >= 0")
        if (isinstance(self.min_acceptance, bool) or not isinstance(self.min_acceptance, (int, float))
                or not 0.0 <= self.min_acceptance <= 1.0):
            raise ConfigError(f"teacher.min_acceptance must be a share in [0, 1], got {self.min_acceptance!r}")
        if not (self.timeout_s > 0 and math.isfinite(self.timeout_s)) or not self.backoff_s >= 0:
            raise ConfigError(f"teacher.timeout_s must be > 0 seconds and backoff_s >= 0, got "
                              f"{self.timeout_s!r} and {self.backoff_s!r}")
        if self.backend == "openai" and (not self.endpoint or not self.model):
            raise ConfigError("the openai backend needs teacher.endpoint and teacher.model")
        if self.backend == "local" and not self.local_model:
            raise ConfigError("the local backend needs teacher.local_model (an HF model folder)")


@dataclass
class Example:
    """One rerank request of ``prompts/<split>`` (history as shown, candidates in upstream order)."""

    list_id: int
    user_idx: int
    history: list[int]
    candidates: list[int]
    target: int
    evidence: list[float]
    fit_slice: int = 0  # which fit data ranked the list (rolling cutoffs, gr2.splits): the teacher's statistics


# --------------------------------------------------------------------------------------------
# prompts and answers


def rerank_messages(catalog: ItemCatalog, example: Example, prompt: Any, *, reasoning: bool,
                    reveal_target: bool = False) -> list[dict[str, str]]:
    """The chat prompt of one example: the student's prompt (:func:`gr2.prompts.request_messages`,
    the same the SFT, RL and rerank stages show the model), plus, in targeted mode, a line
    revealing the target that only the teacher sees."""
    from gr2.prompts import request_messages

    request = {"history": example.history, "candidates": example.candidates, "evidence": example.evidence}
    messages = request_messages(request, prompt, catalog, catalog.index,
                                reasoning=reasoning).messages
    if reveal_target:
        messages[-1] = dict(messages[-1])
        messages[-1]["content"] += (f"\nThe user's actual next film is {catalog.sid_text(example.target)}. "
                                    "Explain from the history why it fits best, and rank it first.")
    return messages


def parse_completions(completions: list[str], examples: list[Example], catalog: ItemCatalog, *,
                      reasoning: bool) -> Any:
    """Parse and score teacher completions with :func:`gr2.verify_rewards` -- the one completion
    grammar (in Rust) that the RL rewards and the decoders use. In the answer-only arm a
    completion with a ``<think>`` block is rejected (``RewardBatch.valid`` False)."""
    from gr2 import verify_rewards
    from gr2.rewards import parse_completion

    candidates = np.array([e.candidates for e in examples], dtype=np.uint64).reshape(len(examples), -1)
    targets = np.array([e.target for e in examples], dtype=np.uint64)
    rb = verify_rewards(completions, candidates, targets, index=catalog.index)
    if not reasoning:  # the think block where the verifier's own parse finds one
        has_think = np.array([bool(ok) and parse_completion(c).think is not None
                              for c, ok in zip(completions, rb.valid)], dtype=bool)
        rb = dataclasses.replace(rb, valid=rb.valid & ~has_think)
    return rb


# --------------------------------------------------------------------------------------------
# heuristic teacher


class HeuristicTeacher:
    """Offline teacher: a transparent candidate score and a rationale written from its parts.

    score(c) = w_upstream * -log(upstream position of c) + w_evidence * -log(evidence rank of c)
    + w_cooccur * log1p(co-occurrences of c with the recent history)
    + w_genre * (share of the history's genre mentions that c's genres account for)
    + w_popularity * log1p(popularity) / log1p(max popularity)
    + w_year * exp(-|year(c) - median history year| / 10).

    Co-occurrence and popularity come from ``fit_seqs``: the interactions the list's upstream
    ranker saw (``candidates/fit_<split>``), which precede every target of the split, so the
    teacher never counts the target's interaction or the user's later items. The evidence rank is
    the one the prompt shows (no evidence: every candidate gets rank 1).
    """

    label = HEURISTIC_LABEL

    def __init__(self, catalog: ItemCatalog, fit_seqs: Sequence[Sequence[int]], config: TeacherConfig):
        self.catalog, self.config = catalog, config
        self.popularity = np.bincount(np.concatenate([np.asarray(s, np.int64) for s in fit_seqs if len(s)] or
                                                     [np.zeros(0, np.int64)]), minlength=len(catalog))
        self.cooccur: Counter[tuple[int, int]] = Counter()
        w = config.cooccur_window
        if config.w_cooccur:
            for seq in fit_seqs:
                seq = [int(x) for x in seq]
                for i, a in enumerate(seq):
                    for b in seq[i + 1:i + 1 + w]:
                        if a != b:
                            self.cooccur[(a, b)] += 1
                            self.cooccur[(b, a)] += 1

    def features(self, example: Example) -> dict[int, dict[str, Any]]:
        from gr2.prompts import evidence_ranks

        cat, cfg = self.catalog, self.config
        recent = example.history[-cfg.cooccur_window * 2:]
        genres = Counter(g for i in example.history for g in cat.categories[i])
        total = sum(genres.values()) or 1
        years = [int(cat.years[i]) for i in example.history if cat.years[i] >= 0]
        mid_year = float(np.median(years)) if years else None
        max_pop = math.log1p(max(1, int(self.popularity.max())))
        ev = np.asarray(example.evidence, dtype=np.float64)
        ev_rank = evidence_ranks(ev) if ev.any() else np.ones(len(example.candidates), dtype=np.int64)
        out = {}
        for pos, c in enumerate(example.candidates):
            co = {h: self.cooccur[(h, c)] for h in recent if self.cooccur[(h, c)] > 0} if cfg.w_cooccur else {}
            genre_share = sum(genres[g] for g in cat.categories[c]) / total
            year_fit = math.exp(-abs(int(cat.years[c]) - mid_year) / 10) if mid_year and cat.years[c] >= 0 else 0.0
            pop = math.log1p(int(self.popularity[c])) / max_pop
            score = (-cfg.w_upstream * math.log(pos + 1) - cfg.w_evidence * math.log(int(ev_rank[pos]))
                     + cfg.w_cooccur * math.log1p(sum(co.values())) + cfg.w_genre * genre_share
                     + cfg.w_popularity * pop + cfg.w_year * year_fit)
            out[c] = {"score": score, "position": pos + 1, "evidence_rank": int(ev_rank[pos]), "cooccur": co,
                      "genre_share": genre_share, "year_fit": year_fit, "popularity": int(self.popularity[c])}
        return out

    def rank(self, example: Example, attempt: int, targeted: bool) -> tuple[list[int], dict[int, dict]]:
        feats = self.features(example)
        scores = np.array([feats[c]["score"] for c in example.candidates])
        if attempt > 0:  # sampled rankings: Gumbel-perturbed scores (attempt 0 is the greedy ranking)
            rng = np.random.default_rng([self.config.seed, example.list_id, attempt])
            scores = scores + self.config.temperature * self.config.noise * rng.gumbel(size=len(scores))
        order = [example.candidates[i] for i in np.argsort(-scores, kind="stable")]
        if targeted:
            order = [example.target] + [c for c in order if c != example.target]
        return order, feats

    def complete(self, example: Example, attempt: int, targeted: bool, reasoning: bool = True) -> str:
        ranking, feats = self.rank(example, attempt, targeted)
        think = self.rationale(example, ranking, feats, targeted) if reasoning else ""
        return think + answer_block(self.catalog, ranking)

    def rationale(self, example: Example, ranking: list[int], feats: dict[int, dict], targeted: bool) -> str:
        """A short structured rationale (about 70 tokens, so it fits the serving reasoning budget):
        the profile, then the top two candidates with the signals that placed them."""
        cat = self.catalog
        genres = [g for g, _ in Counter(g for i in example.history for g in cat.categories[i]).most_common(2)]
        parts = [f"Likes {' and '.join(genres) or 'varied genres'}; latest {cat.sid_text(example.history[-1])}."
                 if example.history else "No history."]
        picks = []
        for c in ranking[:2]:
            f = feats[c]
            picks.append(f"{cat.sid_text(c)} (upstream {f['position']}, co-watched {f['evidence_rank']})")
        lead = "Target" if targeted else "Best"
        parts.append(f"{lead}: {picks[0]}" + (f", then {picks[1]}." if len(picks) > 1 else "."))
        return THINK_OPEN + " ".join(parts) + THINK_CLOSE


def answer_block(catalog: ItemCatalog, ranking: Sequence[int]) -> str:
    return ANSWER_OPEN + "".join(sid_to_text(catalog.codes[i]) for i in ranking) + ANSWER_CLOSE


class LocalModelTeacher:
    """A transformers causal LM sampled with ``generate`` (chat template applied)."""

    def __init__(self, path: str, config: TeacherConfig):
        import torch

        from gr2.models import load_pretrained

        self.config = config
        self.device = choose_device("auto")
        self.model, self.tokenizer = load_pretrained(path)
        self.model.to(self.device).eval()
        self.torch = torch
        self._lock = threading.Lock()

    def complete(self, messages: list[dict[str, str]], sample_index: int) -> str:
        torch = self.torch
        prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)
        with self._lock, torch.no_grad():
            torch.manual_seed(self.config.seed * 100003 + sample_index)
            out = self.model.generate(**ids, do_sample=sample_index > 0 or self.config.temperature > 0,
                                      temperature=max(self.config.temperature, 1e-3), top_p=1.0,
                                      max_new_tokens=self.config.max_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        return self.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


# --------------------------------------------------------------------------------------------
# sampling, in parallel, and the acceptance floor


def trace_one(example: Example, sample: Callable[[Example, int], str], catalog: ItemCatalog,
              config: TeacherConfig, reasoning: bool) -> dict[str, Any]:
    """Sample until the ranking puts the target within the first ``accept_rank`` positions
    (rejection; 1 = first) or once (targeted). A request
    the endpoint rejects for good (:class:`TeacherRequestError`, e.g. HTTP 400 for an over-long
    prompt) ends this example with ``failure`` = {reason, message}; the stage goes on."""
    from gr2.rewards import REASON_NAMES

    budget = config.attempts if config.mode == "rejection" else 1
    invalid: Counter[str] = Counter()
    completion, ranking, missed = "", None, 0
    for attempt in range(budget):
        try:
            completion = sample(example, attempt)
        except TeacherRequestError as e:
            return {"accepted": False, "attempts": attempt + 1, "completion": "", "ranking": None,
                    "invalid": dict(invalid), "target_not_first": missed,
                    "failure": {"reason": e.reason, "message": str(e)[:500]}}
        rb = parse_completions([completion], [example], catalog, reasoning=reasoning)
        if not rb.valid[0]:
            reason = REASON_NAMES[int(rb.invalid_reason[0])] if rb.invalid_reason[0] else "think block in answer-only arm"
            invalid[reason] += 1
            ranking = None
            continue
        ranking = [int(i) for i in rb.ranking[0]]
        if example.target in ranking[:config.accept_rank]:
            return {"accepted": True, "attempts": attempt + 1, "completion": completion, "ranking": ranking,
                    "invalid": dict(invalid), "target_not_first": missed}
        missed += 1
    return {"accepted": False, "attempts": budget, "completion": completion, "ranking": ranking,
            "invalid": dict(invalid), "target_not_first": missed}


def trace_all(examples: list[Example], trace: Callable[[Example], dict[str, Any]], workers: int,
              client: OpenAIChatClient | None, desc: str) -> list[dict[str, Any]]:
    """``trace`` over the examples on ``workers`` threads, in order. On any exception -- Ctrl-C
    (KeyboardInterrupt) or an unusable endpoint -- pending examples are cancelled, the client's
    waits and in-flight requests are cut (:meth:`OpenAIChatClient.cancel`) and the exception is
    re-raised without waiting for retries; replies already received stay in the disk cache."""
    pool = ThreadPoolExecutor(max_workers=workers)
    futures: list[Any] = []
    results: list[dict[str, Any]] = []
    try:
        futures.extend(pool.submit(trace, ex) for ex in examples)
        for future in tqdm(futures, total=len(futures), desc=desc):
            results.append(future.result())
    except BaseException as e:
        if client is not None:
            client.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        if isinstance(e, KeyboardInterrupt):
            done = sum(f.done() and not f.cancelled() and f.exception() is None for f in futures)
            log.info("traces: interrupted; %d of %d examples finished (their replies are cached: rerun "
                     "to resume)", done, len(futures))
        raise
    pool.shutdown(wait=True)
    return results


def check_acceptance(summary: dict[str, Any], config: TeacherConfig, stage_dir: Path) -> None:
    """Raise :class:`TeacherAcceptanceError` when the acceptance rate is below the floor."""
    if summary["acceptance_rate"] >= config.min_acceptance or config.min_acceptance == 0:
        return
    reasons = {**{f"invalid completion: {k}": v for k, v in summary["invalid_completions"].items()},
               **({"valid ranking without the target first": summary["target_not_first"]}
                  if summary["target_not_first"] else {}),
               **{f"request failed: {k}": v for k, v in summary["failures"].items()}}
    counted = "; ".join(f"{k} x{v}" for k, v in sorted(reasons.items(), key=lambda kv: -kv[1])) or "none"
    raise TeacherAcceptanceError(
        f"traces: {summary['kept']} of {summary['examples']} examples kept (acceptance "
        f"{summary['acceptance_rate']:.1%}), below teacher.min_acceptance = {config.min_acceptance:.1%}. "
        f"Rejections: {counted}. Check the teacher's endpoint, model and chat template (details in "
        f"{stage_dir / 'report.json'}; set min_acceptance = 0 to keep such a run).", summary)
