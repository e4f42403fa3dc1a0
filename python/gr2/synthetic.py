"""A planted-signal rerank task: a check that gr2's learning machinery (SFT, DAPO) can learn at all.

The right answer is a simple function of what the prompt shows, and the upstream order carries no
information, so a learner that works climbs from chance to near 1 and one with a broken gradient
stays at chance:

* **catalog** -- ``n_items`` items with distinct 4-level SIDs drawn at random from the code grid
  ``level_sizes`` (level a has at least K codes), indexed by :meth:`gr2.SidIndex.build`; titles are
  uninformative (``item 17``), no categories, no year;
* **lists** -- each user has ``history_len`` random items; the *target* is an item (not in the
  history) that shares the level-a code of the user's **last** history item; the other K - 1
  candidates are one item each of K - 1 other, pairwise distinct level-a codes; the upstream order
  is a uniform random permutation, so the upstream recall@1 is 1/K (0.1 at K = 10);
* **prompts** -- built by the package's one prompt builder :func:`gr2.prompts.build_messages` over
  an :class:`gr2.data.catalog.ItemCatalog`, i.e. exactly the serving prompts;
* **teacher** -- :meth:`PlantedTask.teacher_completion` ranks the target first and the rest in
  upstream order, answer-only (``<answer>SIDs</answer>``) or with a short ``<think>`` trace that
  cites the shared code; :meth:`PlantedTask.format_completion` ranks in upstream order (teaches
  the output format at chance accuracy: the "weak start" for RL).

Because the level-a codes of a list's candidates are distinct, under constrained decoding the
first free choice of the answer (the level-a token of the first SID) decides the top-1 item.

Helpers shared by ``tests/test_planted_signal.py`` and ``benches/bench_planted_signal.py``:
:func:`make_tokenizer` / :func:`make_model` (an offline BPE tokenizer and a tiny Llama built from a
config), :func:`sft_examples` + :func:`sft_train` (the SFT loss of :mod:`gr2.train.losses`),
:func:`rl_data` (the :class:`gr2.train.dapo.RlData` of some lists) and :func:`greedy_recall_at_1`
(greedy ``gr2.constrained_decode`` scored by :func:`gr2.eval.metrics.per_list_metrics`).
Everything is seeded.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from gr2.errors import InvalidInputError
from gr2.tokens import answer_text, code_token, sid_to_text

LEVEL_SIZES = (16, 4, 4, 4)
RULES = ("last_item", "prior", "evidence")


@dataclass
class PlantedTask:
    """Catalog, SID index and rerank lists of the planted-signal task (see the module docstring)."""

    catalog: Any  # gr2.data.catalog.ItemCatalog
    index: Any  # gr2.SidIndex
    codes: np.ndarray  # uint16 (n_items, 4): the SID of item i (item id = item index)
    level_sizes: tuple[int, ...]
    histories: np.ndarray  # int64 (n_lists, history_len), oldest first
    candidates: np.ndarray  # uint64 (n_lists, K), upstream (random) order
    targets: np.ndarray  # uint64 (n_lists,)
    rule: str = "last_item"
    evidence: np.ndarray | None = None  # float (n_lists, K), rule "evidence": the prompt's evidence scores

    @property
    def k(self) -> int:
        return int(self.candidates.shape[1])

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def messages(self, row: int) -> list[dict[str, str]]:
        """The chat messages of list ``row`` (gr2.prompts.build_messages)."""
        from gr2.prompts import build_messages

        evidence = None if self.evidence is None else self.evidence[row]
        return build_messages(self.histories[row], self.candidates[row].astype(np.int64), self.catalog,
                              self.index, evidence=evidence).messages

    def prompt_text(self, tokenizer: Any, row: int) -> str:
        return tokenizer.apply_chat_template(self.messages(row), tokenize=False, add_generation_prompt=True)

    def teacher_ranking(self, row: int) -> np.ndarray:
        """Target first, the other candidates in upstream order."""
        cands = self.candidates[row]
        return np.concatenate([[self.targets[row]], cands[cands != self.targets[row]]]).astype(np.uint64)

    def _completion(self, row: int, ranking: np.ndarray, reasoning: bool) -> str:
        answer = answer_text(self.index.sids(ranking))
        if not reasoning:
            return answer
        last = self.codes[int(self.histories[row, -1])]
        top = self.codes[int(ranking[0])]
        think = f"The candidate that starts with {code_token(0, int(top[0]))} comes first."
        if self.rule == "last_item":
            think = f"The last item starts with {code_token(0, int(last[0]))}; t" + think[1:]
        from gr2.prompts import completion_text

        return completion_text(think, [sid_to_text(s) for s in self.index.sids(ranking)])

    def teacher_completion(self, row: int, reasoning: bool = False) -> str:
        """A trace of the trivial teacher that knows the rule (target first)."""
        return self._completion(row, self.teacher_ranking(row), reasoning)

    def format_completion(self, row: int, reasoning: bool = False) -> str:
        """The upstream order in the output format: teaches the format, at chance recall@1."""
        return self._completion(row, self.candidates[row], reasoning)


def make_planted_task(n_lists: int = 512, *, k: int = 10, history_len: int = 3, n_items: int = 320,
                      level_sizes: Sequence[int] = LEVEL_SIZES, rule: str = "last_item", matching: int = 1,
                      distractors: bool = False, favoured: int = 2, seed: int = 0) -> PlantedTask:
    """Generate the task (catalog, index, ``n_lists`` lists); a pure function of its arguments.

    ``rule``: ``"last_item"`` (the target shares the level-a code of the last history item; the
    contextual task) or ``"prior"`` (the target is the one candidate whose level-a code is among
    the first ``favoured`` codes; a context-free preference, the history is noise -- the
    quickest thing a policy can learn, used by the fast test) or ``"evidence"`` (the target is a
    uniformly random candidate that leads the prompt's evidence line, :func:`gr2.prompts.build_messages`
    ``evidence=``; codes and history are noise: the student must *copy* from its prompt, which is
    what the MovieLens prompts' co-engagement line asks of it).
    ``matching`` (``last_item``): how many of the most recent history items share the target's level-a code (1:
    only the last one; ``history_len``: the whole history -- a stronger, easier signal).
    ``distractors``: the earlier history items may share their level-a code with a negative
    candidate (then only "the *last* item's code" identifies the target); by default they use
    codes no candidate has, so the target is also the only candidate whose code is in the history."""
    import datasets

    import gr2
    from gr2.data.catalog import ItemCatalog

    level_sizes = tuple(int(s) for s in level_sizes)
    if len(level_sizes) != 4:
        raise InvalidInputError(f"the planted task uses 4 SID levels, got level sizes {level_sizes}")
    n_a = level_sizes[0]
    if n_a < k:
        raise InvalidInputError(f"level a needs at least K = {k} codes (distinct codes per list), got {n_a}")
    if not distractors and history_len > 1 and n_a <= k:
        raise InvalidInputError(f"without distractors level a needs more than K = {k} codes, got {n_a}")
    grid = int(np.prod(level_sizes))
    if not 2 * n_a <= n_items <= grid:
        raise InvalidInputError(f"n_items must be in [{2 * n_a}, {grid}] for level sizes {level_sizes}, got {n_items}")
    if rule not in RULES:
        raise InvalidInputError(f"rule must be one of {RULES}, got {rule!r}")
    n_favoured = int(favoured)
    if rule == "prior" and n_favoured < 1:
        raise InvalidInputError(f"favoured must be >= 1, got {favoured}")
    if rule == "prior" and n_a - n_favoured < k - 1:
        raise InvalidInputError(f"rule 'prior' needs at least {n_favoured + k - 1} level-a codes, got {n_a}")
    if not 1 <= matching <= history_len:
        raise InvalidInputError(f"need 1 <= matching <= history_len, got matching={matching}, history_len={history_len}")
    rng = np.random.default_rng(seed)
    # distinct SIDs: n_items cells of the code grid, every level-a code used at least twice
    while True:
        cells = rng.choice(grid, size=n_items, replace=False)
        codes = np.stack(np.unravel_index(cells, level_sizes), axis=1).astype(np.uint16)
        if np.bincount(codes[:, 0], minlength=n_a).min() >= 2 + history_len:
            break
    item_ids = np.arange(n_items, dtype=np.uint64)
    index = gr2.SidIndex.build(item_ids, codes, codebook_size=list(level_sizes))
    items = datasets.Dataset.from_dict({
        "item_idx": list(range(n_items)), "item_id": [str(i) for i in range(n_items)],
        "title": ["item"] * n_items, "categories": [[] for _ in range(n_items)],
        "year": [-1] * n_items, "text": ["item"] * n_items,
    })
    by_code = [np.flatnonzero(codes[:, 0] == a) for a in range(n_a)]
    histories = np.zeros((n_lists, history_len), dtype=np.int64)
    candidates = np.zeros((n_lists, k), dtype=np.uint64)
    targets = np.zeros(n_lists, dtype=np.uint64)
    for row in range(n_lists):
        if rule == "last_item":
            a_star = int(rng.integers(n_a))
            others = rng.choice(np.setdiff1d(np.arange(n_a), [a_star]), size=k - 1, replace=False)
            recent = rng.choice(by_code[a_star], size=matching, replace=False)
            if distractors:  # any other code, the candidates' included
                pool = np.flatnonzero(codes[:, 0] != a_star)
            else:  # codes outside the candidates' (a_star included)
                pool = np.flatnonzero(~np.isin(codes[:, 0], np.append(others, a_star)))
            earlier = rng.choice(pool, size=history_len - matching, replace=False)
            history = np.concatenate([earlier, recent]).astype(np.int64)
        elif rule == "evidence":  # any candidate may be the target; only the evidence line says which
            a_star = int(rng.integers(n_a))
            others = rng.choice(np.setdiff1d(np.arange(n_a), [a_star]), size=k - 1, replace=False)
            history = rng.choice(n_items, size=history_len, replace=False).astype(np.int64)
        else:  # "prior": a favoured level-a code marks the target; the history is noise
            a_star = int(rng.integers(n_favoured))
            others = rng.choice(np.arange(n_favoured, n_a), size=k - 1, replace=False)
            history = rng.choice(n_items, size=history_len, replace=False).astype(np.int64)
        target = int(rng.choice(np.setdiff1d(by_code[a_star], history)))
        negatives = [int(rng.choice(np.setdiff1d(by_code[a], history))) for a in others]
        cands = np.array([target] + negatives, dtype=np.uint64)
        histories[row] = history
        candidates[row] = cands[rng.permutation(k)]
        targets[row] = target
    evidence = None
    if rule == "evidence":  # scores in [0, 1) for the negatives, 2 for the target: it leads the line
        evidence = rng.random((n_lists, k))
        evidence[candidates == targets[:, None]] = 2.0
    return PlantedTask(ItemCatalog(items), index, codes, level_sizes, histories, candidates, targets, rule, evidence)


# --------------------------------------------------------------------------------------------
# tiny model, SFT, RL data, evaluation


def make_tokenizer(task: PlantedTask, vocab_size: int = 600) -> tuple[Any, Any]:
    """A byte-level BPE tokenizer trained offline on the task's prompt text (SIDs stripped: they
    become added tokens), extended with the SID vocabulary. Returns (tokenizer, SidTokens)."""
    from gr2.models import train_demo_tokenizer
    from gr2.tokens import add_sid_tokens

    sid = re.compile(r"<\|sid_begin\|>.*?<\|sid_end\|>|<[a-z_/0-9]+>")
    texts = []
    for row in range(min(len(task), 64)):
        texts += [sid.sub(" ", m["content"]) for m in task.messages(row)]
        texts.append(sid.sub(" ", task.teacher_completion(row, reasoning=True)))
    tokenizer = train_demo_tokenizer(texts, vocab_size=vocab_size)
    sid_tokens = add_sid_tokens(tokenizer, level_sizes=task.level_sizes)
    return tokenizer, sid_tokens


def make_model(tokenizer: Any, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Any:
    """A randomly initialised Llama (``gr2.models.build_demo_model``) over ``tokenizer``."""
    from gr2.models import DemoModelConfig, build_demo_model

    return build_demo_model(tokenizer, DemoModelConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                                                       num_layers=num_layers, num_heads=num_heads,
                                                       max_position_embeddings=1024, seed=seed))


def pretrained_student(task: PlantedTask, base: str = "smollm2") -> tuple[Any, Any, Any]:
    """A pretrained causal LM as the task's student: (model, tokenizer, SidTokens). ``base`` as
    :func:`gr2.models.load_base_model` (``"smollm2"`` or an HF folder); the SID vocabulary is added
    with :func:`gr2.models.extend_with_sids` (rows initialised from the items' text). Unlike the
    from-scratch :func:`make_model`, such a student can already copy text from its prompt -- the
    skill the contextual rules and unconstrained output need. SmolLM2-135M is slow on a CPU (87 s per
    8-example SFT step on a loaded 2-core box, benches/README.md): a GPU run
    (``scripts/gpu_pretrained_student.sh``)."""
    from gr2.models import extend_with_sids, load_base_model

    if base == "demo":
        raise InvalidInputError("pretrained_student needs a pretrained base (smollm2 or an HF folder); "
                                "the from-scratch student is make_model(make_tokenizer(task)[0])")
    model, tokenizer = load_base_model(base)
    sid_tokens = extend_with_sids(model, tokenizer, task.codes, task.level_sizes, list(task.catalog.texts))
    return model, tokenizer, sid_tokens


def sft_examples(task: PlantedTask, tokenizer: Any, rows: Sequence[int], *, reasoning: bool = False,
                 teacher: str = "target", accuracy: float = 1.0, lambda_reasoning: float = 0.5,
                 loss_tokens: str = "all", seed: int = 0) -> list[Any]:
    """SFT examples (:func:`gr2.train.batches.chat_example`): ``teacher="target"`` ranks the target
    first, ``"format"`` keeps the upstream order (format only, chance accuracy). ``accuracy`` < 1
    makes the target teacher a noisy one, like a real teacher: it ranks the target first on that
    share of the lists (drawn with ``seed``) and writes the upstream order on the others.
    ``loss_tokens`` as ``sft.loss_tokens``: "decisions" keeps loss only where constrained decoding
    has a choice (:func:`gr2.train.sft.keep_decisions`)."""
    from gr2.models import sid_tokens_of
    from gr2.train.batches import chat_example
    from gr2.train.sft import LOSS_TOKENS, keep_decisions, split_completion

    if loss_tokens not in LOSS_TOKENS:
        raise InvalidInputError(f"loss_tokens must be one of {LOSS_TOKENS}, got {loss_tokens!r}")
    if teacher not in ("target", "format"):
        raise InvalidInputError(f"teacher must be 'target' or 'format', got {teacher!r}")
    if not 0.0 <= accuracy <= 1.0:
        raise InvalidInputError(f"accuracy must be in [0, 1], got {accuracy}")
    right = np.random.default_rng(seed).random(len(rows)) < (accuracy if teacher == "target" else 0.0)
    out, records = [], []
    for row, knows in zip(rows, right):
        text = task.teacher_completion(row, reasoning) if knows else task.format_completion(row, reasoning)
        segments = [(text, 1.0)]
        if reasoning:
            think, answer = split_completion(text)
            segments = [(think, lambda_reasoning), (answer, 1.0)]
        records.append({"messages": task.messages(row), "candidates": task.candidates[row].tolist(), "reasoning": reasoning})
        out.append(chat_example(tokenizer, records[-1]["messages"], segments))
    if loss_tokens == "decisions":
        out = keep_decisions(tokenizer, records, out, task.index, sid_tokens_of(tokenizer, task.level_sizes))
    return out


def sft_train(model: Any, examples: Sequence[Any], pad_id: int, *, steps: int, batch_size: int = 16,
              lr: float = 3e-3, seed: int = 0, on_step: Any = None) -> list[float]:
    """``steps`` updates of :func:`gr2.train.sft.sft_step` (the SFT stage's step: weighted NLL,
    grad clip 1) with AdamW at a constant lr, in float32 on the model's device; batch ``s`` takes
    :func:`gr2.train.batches.batch_rows` of the seeded epoch order, as the SFT stage does.
    ``on_step(step, loss)`` after each step. Returns the losses."""
    import torch

    from gr2.train.batches import batch_rows
    from gr2.train.distributed import World
    from gr2.train.losses import DataParallel
    from gr2.train.optim import make_optimizer
    from gr2.train.sft import sft_step

    optimizer = make_optimizer(model, lr)
    parallel = DataParallel(model, World(), next(model.parameters()).device, torch.float32, pad_id)
    losses = []
    model.train()
    for step in range(steps):
        _, chosen = batch_rows(step, len(examples), batch_size, seed)
        loss, _ = sft_step(parallel, optimizer, None, [examples[i] for i in chosen], step=step + 1, lr=lr)
        losses.append(loss)
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def rl_data(task: PlantedTask, tokenizer: Any, rows: Sequence[int]) -> Any:
    """:class:`gr2.train.dapo.RlData` of lists ``rows`` (templated prompt texts and their ids)."""
    from gr2.train.dapo import RlData

    texts = [task.prompt_text(tokenizer, r) for r in rows]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    rows = np.asarray(rows, dtype=np.int64)
    return RlData(texts, ids, task.candidates[rows].copy(), task.targets[rows].copy())


def greedy_rankings(model: Any, tokenizer: Any, task: PlantedTask, rows: Sequence[int], *, reasoning: bool = False,
                    max_reasoning_tokens: int = 32, batch: int = 32) -> np.ndarray:
    """Greedy constrained reranking of lists ``rows``: item ids (len(rows), K)."""
    from gr2 import constrained_decode

    rows = list(rows)
    out = []
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        results = constrained_decode(model, tokenizer, [task.prompt_text(tokenizer, r) for r in chunk],
                                     task.candidates[chunk], index=task.index, reasoning=reasoning,
                                     max_reasoning_tokens=max_reasoning_tokens)
        out.extend(r.items for r in results)
    return np.stack(out).astype(np.uint64)


def greedy_recall_at_1(model: Any, tokenizer: Any, task: PlantedTask, rows: Sequence[int], **kw: Any) -> float:
    """Mean recall@1 of greedy constrained decoding on lists ``rows`` (gr2.eval.metrics)."""
    from gr2.eval.metrics import per_list_metrics

    rows = list(rows)
    rankings = greedy_rankings(model, tokenizer, task, rows, **kw)
    metrics = per_list_metrics(rankings, np.ones(len(rows), dtype=bool), task.candidates[rows], task.targets[rows])
    return float(metrics["recall@1"].mean())


def upstream_recall_at_1(task: PlantedTask, rows: Sequence[int]) -> float:
    """Recall@1 of the upstream (random) order on lists ``rows``: about 1/K."""
    from gr2.eval.metrics import per_list_metrics

    rows = list(rows)
    cands = task.candidates[rows]
    return float(per_list_metrics(cands, np.ones(len(rows), dtype=bool), cands, task.targets[rows])["recall@1"].mean())


def copy_examples(task: PlantedTask, sid_tokens: Any, n: int, *, n_sids: int = 6, layout: str = "adjacent",
                  tokenizer: Any = None, seed: int = 0) -> list[Any]:
    """A copy curriculum: ``n`` short examples that show ``n_sids`` random catalog SIDs and train
    the model to write them back in order, the loss on the copy only.

    ``layout="adjacent"``: ``<answer>S1..Sm</answer><answer>S1..Sm</answer>`` (75 tokens at m = 6).
    ``layout="lines"``: the rerank prompt's own candidate lines (``1. S1 item`` ...) in a short
    user message, answered by ``<answer>S1..Sm</answer>`` (needs ``tokenizer``, for its chat template).

    Why: a from-scratch student cannot read a prompt it has no attention circuit to copy from
    (benches/README.md, "a student that reads its prompt"). The 2-layer, hidden-64 Llama learns the
    adjacent layout within a few hundred steps, but that skill does not carry over to the prompt,
    whose SIDs are separated by `` item`` and a line number; the lines layout is the prompt's.
    Pure function of its arguments."""
    from gr2.train.batches import build_example, chat_example

    if layout not in ("adjacent", "lines"):
        raise InvalidInputError(f"layout must be 'adjacent' or 'lines', got {layout!r}")
    if layout == "lines" and tokenizer is None:
        raise InvalidInputError("layout='lines' needs the tokenizer (its chat template renders the prompt)")
    rng = np.random.default_rng(seed)

    def sid_ids(item: int) -> list[int]:
        return ([sid_tokens.sid_begin] + [int(sid_tokens.code_ids[level, c]) for level, c in enumerate(task.codes[item])]
                + [sid_tokens.sid_end])

    out = []
    for _ in range(n):
        items = rng.choice(len(task.codes), size=n_sids, replace=False)
        if layout == "lines":
            sids = [sid_to_text(task.codes[i]) for i in items]
            user = (f"Candidates ({n_sids}):\n" + "".join(f"{j + 1}. {s} item\n" for j, s in enumerate(sids))
                    + "Repeat them in order.")
            out.append(chat_example(tokenizer, [{"role": "user", "content": user}],
                                    [(answer_text([task.codes[i] for i in items]), 1.0)]))
            continue
        block = [sid_tokens.answer_open] + [t for i in items for t in sid_ids(int(i))] + [sid_tokens.answer_close]
        out.append(build_example([(block, 0.0), (block, 1.0)]))
    return out
