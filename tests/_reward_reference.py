"""Pure-Python reference of gr2.verify_rewards (rust/src/reward.rs), written for clarity, not speed.

Same grammar, validation order and reward formulas as the Rust core; the tests compare every field
on random and adversarial completions, and benches/bench_rewards.py times it as the baseline.
"""

from __future__ import annotations

import math
import re

LETTERS = "abcdefghijklmnopqrstuvwxyz"
WS = " \t\n\r"
CODE_RE = re.compile(r"<s_([a-z])_(0|[1-9][0-9]{0,4})>")
NO_ITEM = 2**64 - 1
REASONS = ["ok", "malformed", "wrong_count", "repeat", "not_candidate", "unknown_sid"]


def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in WS:
        i += 1
    return i


def parse_text(s: str, levels: int, trailers: list[str]) -> list[tuple[int, ...]] | None:
    """The SIDs of the answer, or None when the completion is malformed."""
    # The answer block is the last "<answer>"; before it only whitespace or a think block (whose
    # body is free text, tag-like text included).
    at = s.rfind("<answer>")
    if at < 0:
        return None
    prefix = s[:at].strip(WS)
    if prefix and not (len(prefix) >= 15 and prefix.startswith("<think>") and prefix.endswith("</think>")):
        return None
    i = at + len("<answer>")
    sids = []
    while True:
        i = _skip_ws(s, i)
        if s.startswith("</answer>", i):
            i += len("</answer>")
            break
        if not s.startswith("<|sid_begin|>", i):
            return None
        i += len("<|sid_begin|>")
        sid = []
        for level in range(levels):
            i = _skip_ws(s, i)
            m = CODE_RE.match(s, i)
            if m is None or m.group(1) != LETTERS[level] or int(m.group(2)) > 65535:
                return None
            sid.append(int(m.group(2)))
            i = m.end()
        i = _skip_ws(s, i)
        if not s.startswith("<|sid_end|>", i):
            return None
        i += len("<|sid_end|>")
        sids.append(tuple(sid))
    while True:
        i = _skip_ws(s, i)
        if i == len(s):
            return sids
        for t in trailers:
            if s.startswith(t, i):
                i += len(t)
                break
        else:
            return None


def parse_tokens(ids, levels: int, tags: dict[str, int], code_of: dict[int, tuple[int, int]], ws_ids=(), trailer_ids=()):
    """Token-id version: ``tags`` maps think_open.. sid_end to ids; ``code_of`` id -> (level, code)."""
    role = {v: k for k, v in tags.items()}
    ids = [int(t) for t in ids]
    i = 0

    def next_sym(after: bool):
        nonlocal i
        while i < len(ids) and ids[i] in ws_ids and ids[i] not in role and ids[i] not in code_of:
            i += 1
        if i == len(ids):
            return ("end",)
        t = ids[i]
        i += 1
        if t in role:
            return (role[t],)
        if t in code_of:
            return ("code", *code_of[t])
        if after and t in trailer_ids:
            return ("trailer",)
        return ("other",)

    # The answer block is the last answer_open; before it only whitespace or a think block.
    opens = [j for j, t in enumerate(ids) if role.get(t) == "answer_open"]
    if not opens:
        return None

    def is_ws(t):
        return t in ws_ids and t not in role and t not in code_of

    lo, hi = 0, opens[-1]
    while lo < hi and is_ws(ids[lo]):
        lo += 1
    while hi > lo and is_ws(ids[hi - 1]):
        hi -= 1
    if hi > lo and not (hi - lo >= 2 and role.get(ids[lo]) == "think_open" and role.get(ids[hi - 1]) == "think_close"):
        return None
    i = opens[-1] + 1
    sids = []
    while True:
        sym = next_sym(False)
        if sym == ("answer_close",):
            break
        if sym != ("sid_begin",):
            return None
        sid = []
        for level in range(levels):
            sym = next_sym(False)
            if sym[0] != "code" or sym[1] != level:
                return None
            sid.append(sym[2])
        if next_sym(False) != ("sid_end",):
            return None
        sids.append(tuple(sid))
    while True:
        sym = next_sym(True)
        if sym == ("end",):
            return sids
        if sym != ("trailer",):
            return None


def _graded_ndcg(order, rel, cut):
    dcg = sum(rel[c] / math.log2(i + 2) for i, c in enumerate(order[:cut]))
    ideal = sorted(rel, reverse=True)
    idcg = sum(r / math.log2(i + 2) for i, r in enumerate(ideal[:cut]))
    return dcg / idcg if idcg > 0 else 0.0


def _auc(order, rel):
    good = pairs = 0
    for a in range(len(order)):
        for b in range(a + 1, len(order)):
            ra, rb = rel[order[a]], rel[order[b]]
            if ra != rb:
                pairs += 1
                good += ra > rb
    return good / pairs if pairs else 0.0


def verify_row(
    sids,
    items,
    cand_sids,
    target,
    *,
    catalog=None,
    relevance=None,
    alpha=0.2,
    conditional=True,
    invalid_reward=-1.0,
    metric_ks=(1, 3, 5),
    graded_k=None,
    kind="rank",
):
    """Rewards of one row; ``sids`` is parse_text/parse_tokens output (None = malformed)."""
    k = len(items)
    rank_pre = list(items).index(target) + 1
    out = dict(
        reward=invalid_reward, valid=False, reason="malformed", rank_pre=rank_pre, rank_re=0, r_rank=0.0,
        r_fmt=0.0, copied_order=False, top1_input_pos=0, n_sids=0, ranking=[NO_ITEM] * k,
        recall=[0.0] * len(metric_ks), ndcg=[0.0] * len(metric_ks), graded_ndcg=0.0, auc=0.0,
    )
    if sids is None:
        return out
    out["n_sids"] = len(sids)
    col_of = {tuple(s): c for c, s in enumerate(cand_sids)}
    order, reason = [], "ok"
    for sid in sids:
        if sid not in col_of:
            reason = "not_candidate" if catalog is not None and sid in catalog else "unknown_sid"
            break
        if col_of[sid] in order:
            reason = "repeat"
            break
        order.append(col_of[sid])
    if reason == "ok" and len(order) != k:
        reason = "wrong_count"
    out["reason"] = reason
    if reason != "ok":
        return out
    rank_re = order.index(rank_pre - 1) + 1
    r_rank = (rank_pre - rank_re) / k
    earns = (not conditional) or r_rank > 0 or (rank_pre == 1 and rank_re == 1)
    copied = order == list(range(k))
    out.update(
        valid=True, rank_re=rank_re, r_rank=r_rank, r_fmt=1.0, copied_order=copied, top1_input_pos=order[0] + 1,
        ranking=[int(items[c]) for c in order],
        recall=[1.0 if rank_re <= m else 0.0 for m in metric_ks],
        ndcg=[1.0 / math.log2(rank_re + 1) if rank_re <= m else 0.0 for m in metric_ks],
    )
    rank_reward = r_rank + alpha * 1.0 if earns else r_rank
    if relevance is not None:
        rel = [float(r) for r in relevance]
        input_optimal = all(rel[i] >= rel[i + 1] for i in range(k - 1))
        if not (copied and not input_optimal):
            out["graded_ndcg"] = _graded_ndcg(order, rel, graded_k or k)
            out["auc"] = _auc(order, rel)
    out["reward"] = {"rank": rank_reward, "ndcg": out["graded_ndcg"], "auc": out["auc"]}[kind]
    return out


def verify_texts(texts, items, cand_sids, targets, *, trailers=(), catalog=None, relevance=None, **kw):
    """Reference for a whole batch of text completions: a list of per-row dicts."""
    levels = len(cand_sids[0][0])
    cat = None if catalog is None else {tuple(int(c) for c in row) for row in catalog}
    rows = []
    for b, text in enumerate(texts):
        sids = parse_text(text, levels, list(trailers))
        cs = [tuple(int(c) for c in s) for s in cand_sids[b]]
        rel = None if relevance is None else relevance[b]
        rows.append(verify_row(sids, [int(x) for x in items[b]], cs, int(targets[b]), catalog=cat, relevance=rel, **kw))
    return rows
