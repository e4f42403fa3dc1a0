"""Rerank prompts: chat messages that show a user's history and the candidates, and the target
completion format.

A prompt has a system message (an expert-recommender role) and a user message with

1. the history, oldest first: each item as its SID, title, year and genres/categories;
2. optionally a domain-knowledge priming block (e.g. "shampoo -> conditioner -> styling");
3. the K candidates as SID + metadata, in upstream order (or a seeded shuffle of it, to counter
   position bias -- the order used is returned), optionally followed by the *evidence*: the same
   candidates ordered by how strongly each is co-engaged with the history
   (:func:`candidate_evidence`, from the interactions the upstream ranker of the list saw, so never
   from the target or the user's later items);
4. instructions fixing the output format::

       <think>reasoning</think><answer>SID SID ... SID</answer>     (reasoning mode)
       <answer>SID SID ... SID</answer>                             (answer-only mode)

   with every candidate SID exactly once, most likely next item first.

:class:`PromptConfig` (the ``[prompts]`` table of a run) fixes history length, priming and
evidence for every stage: the ``prompts`` stage (:mod:`gr2.pipeline.prompts`) materialises each
split's requests once (read back with :func:`gr2.pipeline.inputs.load_requests` and
:func:`~gr2.pipeline.inputs.load_prompt_config`), and traces, SFT, RL, rerank and serving all render them with
:func:`request_messages`, so a model is trained on exactly the prompts it is served.

Items are cited by SID so the model's answer can be constrained and verified token by token
(gr2.constrained_decode, gr2.verify_rewards). With a tokenizer and ``max_tokens``, the oldest
history items are dropped until the rendered prompt (chat template included) fits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from gr2.data.catalog import ItemCatalog
from gr2.errors import ConfigError, InvalidInputError, UnknownItemError
from gr2.tokens import ANSWER_CLOSE, ANSWER_OPEN, SID_BEGIN, SID_END, TAGS, THINK_CLOSE, THINK_OPEN, sid_to_text

SYSTEM_PROMPT = (
    "You are an expert recommender system. You study what a user has watched or bought, infer "
    "their tastes and what they are likely to want next, and rerank candidate items accordingly. "
    "Items are identified by semantic IDs (SIDs), short sequences of special tokens; items whose "
    "SIDs share a prefix are similar."
)


DEFAULT_PRIMING = (
    "Tastes drift slowly: the most recent items say most about what comes next. People continue "
    "series, franchises and creators they just enjoyed, move between closely related genres, and "
    "follow items that are commonly consumed together; a candidate far from everything in the "
    "history needs a strong reason to rank first."
)


EVIDENCE_KINDS = ("none", "cooccur")


@dataclass
class PromptConfig:
    """What every rerank prompt of a run shows (TOML table ``[prompts]``)."""

    max_history: int = 20  # most recent history items shown
    priming: bool = True  # the domain-knowledge block
    priming_text: str = ""  # "" = DEFAULT_PRIMING
    system_prompt: str = ""  # "" = SYSTEM_PROMPT (small from-scratch tokenizers spend ~120 tokens on it)
    evidence: str = "none"  # per-candidate evidence: "none" | "cooccur" (candidates by co-engagement with the history)
    max_tokens: int = 1024  # token budget of a rendered prompt; oldest history dropped first to fit
    # item-kNN settings of the co-engagement evidence (see gr2.upstream.itemknn)
    evidence_neighbors: int = 100
    evidence_shrink: float = 10.0
    evidence_recency_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.max_history < 1:
            raise ConfigError(f"prompts.max_history must be >= 1, got {self.max_history}")
        if self.evidence not in EVIDENCE_KINDS:
            raise ConfigError(f"prompts.evidence must be one of {EVIDENCE_KINDS}, got {self.evidence!r}")
        if self.max_tokens < 64:
            raise ConfigError(f"prompts.max_tokens must be >= 64, got {self.max_tokens}")


def candidate_evidence(histories: Sequence[np.ndarray], candidates: np.ndarray, fit_sequences: Sequence[np.ndarray],
                       n_items: int, config: PromptConfig) -> np.ndarray:
    """Co-engagement of each candidate with its history, float32 (N, K): the item-kNN score
    (cosine co-occurrence, recency-weighted over the history) fitted on ``fit_sequences`` -- the
    interactions the list's upstream ranker saw, which precede the target by construction."""
    from gr2.upstream.itemknn import ItemKNNRanker

    knn = ItemKNNRanker.fit(fit_sequences, n_items, neighbors=config.evidence_neighbors,
                            shrink=config.evidence_shrink, recency_decay=config.evidence_recency_decay)
    return np.asarray(knn.score_candidates(list(histories), np.asarray(candidates, dtype=np.int64)), dtype=np.float32)


def evidence_order(scores: np.ndarray) -> np.ndarray:
    """Positions of the candidates in the order the prompt's evidence line lists them: most
    evidence first, ties in input order (along the last axis)."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), axis=-1, kind="stable")


def evidence_ranks(scores: np.ndarray) -> np.ndarray:
    """1-based rank of each candidate's evidence within its list (ties: earlier position first)."""
    return np.argsort(evidence_order(scores), axis=-1, kind="stable") + 1


def check_catalog_items(name: str, items: np.ndarray, catalog: ItemCatalog) -> None:
    if items.size and (items.min() < 0 or items.max() >= len(catalog)):
        bad = items[(items < 0) | (items >= len(catalog))][0]
        raise UnknownItemError(f"{name}: item {int(bad)} is not in the catalog (0..{len(catalog) - 1})")


def describe_item(catalog: ItemCatalog, item: int) -> str:
    """``Title (1995) | Animation, Comedy`` -- the text shown after an item's SID."""
    text = catalog.titles[item]
    if catalog.years[item] >= 0:
        text += f" ({catalog.years[item]})"
    if catalog.categories[item]:
        text += " | " + ", ".join(catalog.categories[item])
    return text


@dataclass
class Prompt:
    """A built prompt and what it shows."""

    messages: list[dict[str, str]]
    candidates: np.ndarray  # int64 (K,): the candidates in the order shown
    order: np.ndarray  # int64 (K,): shown[i] = input_candidates[order[i]] (identity unless shuffled)
    history: np.ndarray  # int64: the history items shown, oldest first
    dropped_history: int  # oldest history items removed to fit the token budget
    n_tokens: int | None  # tokens of the rendered prompt (None without a tokenizer)


def _items(name: str, values, catalog: ItemCatalog) -> np.ndarray:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise InvalidInputError(f"{name} must be a 1-D list of item indices, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidInputError(f"{name} must hold integer item indices, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    check_catalog_items(name, arr, catalog)
    return arr


def _sid_texts(index: Any, items: np.ndarray) -> list[str]:
    if len(items) == 0:
        return []
    codes = np.asarray(index.sids(items.astype(np.uint64)))
    return [sid_to_text(row) for row in codes]


def instructions(k: int, reasoning: bool = True) -> str:
    if not reasoning:
        return (
            f"Task: rank all {k} candidates from most to least likely to be the user's next choice.\n"
            f"Output format: {ANSWER_OPEN}SID SID ... SID{ANSWER_CLOSE} -- list the {k} candidate SIDs "
            f"exactly as given, each exactly once, best first, and nothing else."
        )
    return (
        f"Task: think step by step about the user's tastes, how they evolved, and which candidate "
        f"they are most likely to choose next; cite items by their SIDs. Then rank all {k} "
        f"candidates from most to least likely.\n"
        f"Output format: {THINK_OPEN}your reasoning{THINK_CLOSE}{ANSWER_OPEN}SID SID ... SID{ANSWER_CLOSE} "
        f"-- inside {ANSWER_OPEN} list the {k} candidate SIDs exactly as given, each exactly once, "
        f"best first, and nothing else."
    )


def _user_message(
    history: np.ndarray, history_sids: list[str], shown: np.ndarray, shown_sids: list[str],
    catalog: ItemCatalog, priming: str | None, evidence: np.ndarray | None, reasoning: bool,
) -> str:
    parts = [f"The user's history, oldest first ({len(history)} items):"]
    parts += [f"{i + 1}. {sid} {describe_item(catalog, int(item))}" for i, (item, sid) in enumerate(zip(history, history_sids))]
    if priming:
        parts += ["", "Domain knowledge:", priming]
    parts += ["", f"Candidates ({len(shown)}):"]
    parts += [f"{i + 1}. {sid} {describe_item(catalog, int(item))}" for i, (item, sid) in enumerate(zip(shown, shown_sids))]
    parts += ["", instructions(len(shown), reasoning)]
    if evidence is not None:
        # the candidates again, most co-engaged with this history first, as the prompt's last line:
        # an order the model can copy or blend with the upstream order above (last, so it sits at a
        # fixed distance from the answer, which even a small model learns to attend to)
        by_evidence = evidence_order(evidence)
        parts += ["", "Co-watched with this history by other users, most first: "
                  + " ".join(shown_sids[int(j)] for j in by_evidence)]
    return "\n".join(parts)


def count_tokens(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of ``messages`` as the model sees them: the chat template with a generation prompt
    when the tokenizer has one, else the contents joined by newlines."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        if hasattr(ids, "keys"):  # transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)
    text = "\n".join(m["content"] for m in messages)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_messages(
    history: Sequence[int] | np.ndarray,
    candidates: Sequence[int] | np.ndarray,
    catalog: ItemCatalog,
    index: Any,
    *,
    tokenizer: Any = None,
    max_tokens: int | None = None,
    min_history: int = 1,
    shuffle: bool = False,
    seed: int | None = None,
    priming: str | bool | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    evidence: Sequence[float] | np.ndarray | None = None,
    reasoning: bool = True,
) -> Prompt:
    """Chat messages for one rerank request.

    ``history`` and ``candidates`` are item indices (history oldest first, candidates in upstream
    order); ``catalog`` is the item metadata (:class:`gr2.data.ItemCatalog`); ``index`` maps items
    to SIDs (gr2.SidIndex). ``priming`` adds a domain-knowledge block (a string, or True for
    :data:`DEFAULT_PRIMING`). ``evidence`` (K,), one co-engagement score per candidate in input
    order, adds a line listing the candidates' SIDs by decreasing evidence. ``reasoning=False`` asks for
    the answer only (no ``<think>`` block). With ``shuffle`` the candidates are shown
    in a random order drawn from ``seed`` (returned in ``Prompt.order``). With ``max_tokens`` (needs
    ``tokenizer``) the oldest history items are dropped until the prompt fits; InvalidInputError
    if even ``min_history`` items do not fit.
    """
    history = _items("history", history, catalog)
    candidates = _items("candidates", candidates, catalog)
    if len(candidates) == 0:
        raise InvalidInputError("a rerank prompt needs at least one candidate")
    if priming is True:
        priming = DEFAULT_PRIMING
    elif priming is False or priming is None:
        priming = None
    elif isinstance(priming, str):
        priming = priming.strip() or None
    else:
        raise InvalidInputError(f"priming must be a string, True (default block) or None, got {type(priming).__name__}")
    if len(np.unique(candidates)) != len(candidates):
        raise InvalidInputError(f"candidates contain duplicates: {candidates.tolist()}")
    if max_tokens is not None and tokenizer is None:
        raise InvalidInputError("max_tokens needs a tokenizer to count tokens")
    if min_history < 0:
        raise InvalidInputError(f"min_history must be >= 0, got {min_history}")
    order = np.random.default_rng(seed).permutation(len(candidates)) if shuffle else np.arange(len(candidates))
    shown = candidates[order]
    if evidence is not None:
        evidence = np.asarray(evidence, dtype=np.float64)
        if evidence.shape != candidates.shape or not np.isfinite(evidence).all():
            raise InvalidInputError(f"evidence must be {len(candidates)} finite scores (one per candidate), got "
                                    f"shape {evidence.shape}")
        evidence = evidence[order]
    shown_sids = _sid_texts(index, shown)
    history_sids = _sid_texts(index, history)

    def render(keep: int) -> list[dict[str, str]]:
        start = len(history) - keep
        user = _user_message(history[start:], history_sids[start:], shown, shown_sids, catalog, priming, evidence,
                             reasoning)
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]

    keep = len(history)
    n_tokens = count_tokens(tokenizer, render(keep)) if tokenizer is not None else None
    if max_tokens is not None and n_tokens > max_tokens:
        low = min(min_history, len(history))
        low_tokens = count_tokens(tokenizer, render(low))
        if low_tokens > max_tokens:
            raise InvalidInputError(
                f"the prompt needs {low_tokens} tokens with {low} history item(s), over max_tokens={max_tokens}; "
                "raise the budget or show fewer candidates"
            )
        high = keep - 1  # largest count that might fit; low is known to fit
        while low < high:  # token count grows with the history kept: binary search
            mid = (low + high + 1) // 2
            if count_tokens(tokenizer, render(mid)) <= max_tokens:
                low = mid
            else:
                high = mid - 1
        keep = low
        n_tokens = count_tokens(tokenizer, render(keep))
    return Prompt(
        messages=render(keep),
        candidates=shown,
        order=order.astype(np.int64),
        history=history[len(history) - keep :],
        dropped_history=len(history) - keep,
        n_tokens=n_tokens,
    )


def request_messages(request: Mapping[str, Any], config: PromptConfig, catalog: ItemCatalog, index: Any, *,
                     reasoning: bool = True, tokenizer: Any = None) -> Prompt:
    """The prompt of one materialised request (a row of ``prompts/<split>``: ``history``,
    ``candidates`` and, with evidence, ``evidence``), rendered the same way by every stage."""
    evidence = request.get("evidence") if config.evidence != "none" else None
    priming = (config.priming_text or True) if config.priming else None
    return build_messages(request["history"][-config.max_history:], request["candidates"], catalog, index,
                          tokenizer=tokenizer, max_tokens=config.max_tokens if tokenizer is not None else None,
                          priming=priming, evidence=evidence, reasoning=reasoning,
                          system_prompt=config.system_prompt or SYSTEM_PROMPT)


def completion_text(reasoning: str | None, ordered_sids: Sequence[Any] | np.ndarray) -> str:
    """The target completion ``<think>reasoning</think><answer>SID...SID</answer>``, or only the
    ``<answer>`` block when ``reasoning`` is None (answer-only mode).

    ``ordered_sids`` is the ranking as SID codes (K, L) or as SID strings.
    """
    for tag in TAGS:
        if reasoning is not None and tag in reasoning:
            raise InvalidInputError(f"reasoning must not contain the tag {tag!r}")
    texts = []
    for sid in ordered_sids:
        if isinstance(sid, str):
            if not (sid.startswith(SID_BEGIN) and sid.endswith(SID_END)):
                raise InvalidInputError(f"not a SID string: {sid!r}")
            texts.append(sid)
        else:
            texts.append(sid_to_text(np.asarray(sid)))
    if not texts:
        raise InvalidInputError("a completion needs at least one SID")
    if len(set(texts)) != len(texts):
        raise InvalidInputError("the ranking repeats a SID")
    answer = f"{ANSWER_OPEN}{''.join(texts)}{ANSWER_CLOSE}"
    return answer if reasoning is None else f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}{answer}"


def answer_to_json(
    ranking: Sequence[int] | np.ndarray,
    catalog: ItemCatalog,
    index: Any = None,
    *,
    reasoning: str | None = None,
    valid: bool = True,
) -> str:
    """A reranked answer as JSON for APIs: ``{"valid", "reasoning", "ranking": [{"rank",
    "item_idx", "item_id", "title", "year", "categories", "sid"}]}`` (``sid`` only with an index)."""
    items = _items("ranking", ranking, catalog)
    sids = _sid_texts(index, items) if index is not None else [None] * len(items)
    entries = []
    for rank, (item, sid) in enumerate(zip(items, sids), start=1):
        entry = {
            "rank": rank,
            "item_idx": int(item),
            "item_id": catalog.item_ids[item],
            "title": catalog.titles[item],
            "year": catalog.years[item] if catalog.years[item] >= 0 else None,
            "categories": catalog.categories[item],
        }
        if sid is not None:
            entry["sid"] = sid
        entries.append(entry)
    return json.dumps({"valid": bool(valid), "reasoning": reasoning, "ranking": entries}, ensure_ascii=False)


