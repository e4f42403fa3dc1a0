"""Planted-signal check of the learning machinery (gr2.synthetic): SFT on teacher traces and DAPO
from a weak start must lift greedy recall@1 on held-out lists far above chance, and the same RL run
with the advantage sign flipped must not -- so these tests can fail when the gradient is wrong.

Task: ``rule="prior"`` (the target is the one candidate whose level-a code is one of 2 favoured
codes; upstream order random, recall@1 = 0.1), the quickest signal a policy can pick up. Weak
start: a tiny Llama (2 layers, hidden 64) trained from scratch for a few SFT steps on *format*
traces (the upstream order in the output format), which leaves it at chance. The contextual
``evidence`` rule (the target leads the prompt's evidence line) is learnt by SFT on decision tokens
and by RL from a noisy teacher's student (the last tests); benches/bench_planted_signal.py measures
the curves. Answer-only mode throughout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gr2 import synthetic as S
from gr2.errors import InvalidInputError
from gr2.train.dapo import DapoConfig, DapoTrainer, trainer as dapo_trainer

torch.set_num_threads(1)

TRAIN, HELDOUT = range(0, 240), range(240, 304)
RL_STEPS = 12


@pytest.fixture(scope="module")
def weak_start():
    task = S.make_planted_task(304, rule="prior", favoured=2, seed=0)
    tokenizer, sid_tokens = S.make_tokenizer(task)
    model = S.make_model(tokenizer, seed=0)
    S.sft_train(model, S.sft_examples(task, tokenizer, TRAIN, teacher="format"), tokenizer.pad_token_id,
                steps=20, batch_size=8, lr=3e-3)
    start = S.greedy_recall_at_1(model, tokenizer, task, HELDOUT)
    return task, tokenizer, sid_tokens, {k: v.clone() for k, v in model.state_dict().items()}, start


def _model(tokenizer, state):
    model = S.make_model(tokenizer, seed=0)
    model.load_state_dict(state)
    return model


def _rl(weak_start, steps: int = RL_STEPS) -> tuple[float, float, list[float]]:
    task, tokenizer, sid_tokens, state, start = weak_start
    model = _model(tokenizer, state)
    config = DapoConfig(group_size=8, prompts_per_step=4, steps=steps, lr=3e-3, reasoning=False, max_reasoning_tokens=0, device="cpu",
                        tensorboard=False, rollout_batch=4, max_generation_rounds=1, seed=0)
    trainer = DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, TRAIN), config, index=task.index,
                          sid_tokens=sid_tokens, device=torch.device("cpu"))
    rewards = [trainer.step()["reward_mean"] for _ in range(steps)]
    return start, S.greedy_recall_at_1(model, tokenizer, task, HELDOUT), rewards


@pytest.mark.parametrize("rule", S.RULES)
def test_task_plants_the_signal_and_nothing_else(rule):
    task = S.make_planted_task(400, rule=rule, seed=3)
    again = S.make_planted_task(400, rule=rule, seed=3)
    np.testing.assert_array_equal(task.candidates, again.candidates)  # seeded
    a = task.codes[:, 0]
    cand_codes = a[task.candidates.astype(np.int64)]
    assert all(len(set(row)) == task.k for row in cand_codes)  # distinct level-a codes per list
    target_codes = a[task.targets.astype(np.int64)]
    if rule == "last_item":
        np.testing.assert_array_equal(target_codes, a[task.histories[:, -1]])
    elif rule == "prior":
        assert (target_codes < 2).all() and ((cand_codes < 2).sum(axis=1) == 1).all()
    else:  # the evidence line leads with the target; its code is uniform, so only the line tells
        assert task.evidence.shape == task.candidates.shape
        np.testing.assert_array_equal(task.candidates[np.arange(400), task.evidence.argmax(1)], task.targets)
        assert abs((target_codes < 2).mean() - 2 / 16) < 0.06
    assert not (task.histories == task.targets[:, None].astype(np.int64)).any()
    position = np.argmax(task.candidates == task.targets[:, None], axis=1)  # upstream position of the target
    assert np.bincount(position, minlength=task.k).min() > 400 / task.k / 2  # roughly uniform
    assert abs(S.upstream_recall_at_1(task, range(400)) - 0.1) < 0.05
    text = task.messages(0)[1]["content"]  # the package's prompt: history then candidates, by SID
    shown = task.histories.shape[1] + task.k * (2 if rule == "evidence" else 1)  # + the evidence line
    assert text.count("<|sid_begin|>") == shown


def test_weak_start_is_at_chance(weak_start):
    task, *_, start = weak_start
    assert S.upstream_recall_at_1(task, HELDOUT) <= 0.25
    assert start <= 0.3, start


def test_sft_on_teacher_traces_learns(weak_start):
    task, tokenizer, _, state, start = weak_start
    model = _model(tokenizer, state)
    S.sft_train(model, S.sft_examples(task, tokenizer, TRAIN), tokenizer.pad_token_id, steps=60, batch_size=8, lr=1e-2)
    after = S.greedy_recall_at_1(model, tokenizer, task, HELDOUT)
    assert after >= 0.6 and after >= start + 0.3, (start, after)


def test_sft_on_decision_tokens_learns_to_read_the_evidence_line():
    """The contextual skill the MovieLens student lacked: the target leads the prompt's evidence
    line and nothing else tells it apart, so greedy recall@1 stays at chance (0.1) until the model
    copies from its prompt. With the loss on decision tokens (sft.loss_tokens = "decisions") the
    tiny from-scratch model learns it within 250 steps (benches/README.md: with the loss on every
    token it is still at chance after 600). Seeded; about a minute and a half on one core."""
    task = S.make_planted_task(2100, rule="evidence", seed=0)
    tokenizer, _ = S.make_tokenizer(task)
    train, heldout = range(2000), range(2000, 2100)
    model = S.make_model(tokenizer, seed=0)
    before = S.greedy_recall_at_1(model, tokenizer, task, heldout)
    examples = S.sft_examples(task, tokenizer, train, loss_tokens="decisions")
    S.sft_train(model, examples, tokenizer.pad_token_id, steps=250, batch_size=16, lr=3e-3)
    after = S.greedy_recall_at_1(model, tokenizer, task, heldout)
    assert before <= 0.25 and after >= 0.6, (before, after)


def test_dapo_from_weak_start_learns(weak_start):
    start, after, rewards = _rl(weak_start)
    assert after >= 0.6 and after >= start + 0.3, (start, after)
    assert np.mean(rewards[-4:]) > np.mean(rewards[:4]) + 0.2, rewards


def test_dapo_with_flipped_advantages_does_not_learn(weak_start, monkeypatch):
    """The same run with A -> -A: recall@1 must stay at chance or fall (the test above can fail)."""
    honest = dapo_trainer.group_advantages  # patched where DapoTrainer looks it up
    monkeypatch.setattr(dapo_trainer, "group_advantages", lambda rewards, std_eps=1e-6: -honest(rewards, std_eps))
    start, after, rewards = _rl(weak_start)
    assert after <= max(start, 0.2), (start, after)
    assert np.mean(rewards[-4:]) <= np.mean(rewards[:4]) + 0.05, rewards


@pytest.fixture(scope="module")
def noisy_evidence_start():
    """The MovieLens situation in miniature: a student distilled from an *imperfect* teacher. On the
    planted ``evidence`` task (only the prompt's evidence line marks the target) the teacher ranks
    the target first on 30% of the lists and writes the upstream order on the rest; 300 decision-
    token SFT steps on its traces leave greedy decoding at chance (it follows the majority), while
    sampling sometimes copies the evidence line -- the variance RL needs."""
    task = S.make_planted_task(2100, rule="evidence", seed=0)
    tokenizer, sid_tokens = S.make_tokenizer(task)
    train, heldout = range(2000), range(2000, 2100)
    model = S.make_model(tokenizer, seed=0)
    examples = S.sft_examples(task, tokenizer, train, accuracy=0.3, loss_tokens="decisions", seed=0)
    S.sft_train(model, examples, tokenizer.pad_token_id, steps=300, batch_size=16, lr=3e-3)
    start = S.greedy_recall_at_1(model, tokenizer, task, heldout)
    return task, tokenizer, sid_tokens, {k: v.clone() for k, v in model.state_dict().items()}, start


def _rl_evidence(noisy_evidence_start, steps: int = 200) -> tuple[float, float]:
    task, tokenizer, sid_tokens, state, start = noisy_evidence_start
    model = _model(tokenizer, state)
    config = DapoConfig(group_size=8, prompts_per_step=4, steps=steps, lr=1e-3, reasoning=False, max_reasoning_tokens=0,
                        device="cpu", tensorboard=False, rollout_batch=4, max_generation_rounds=1, seed=0)
    trainer = DapoTrainer(model, tokenizer, S.rl_data(task, tokenizer, range(2000)), config, index=task.index,
                          sid_tokens=sid_tokens, device=torch.device("cpu"))
    for _ in range(steps):
        trainer.step()
    return start, S.greedy_recall_at_1(model, tokenizer, task, range(2000, 2100))


def test_dapo_learns_to_read_the_evidence_line_from_a_noisy_teachers_student(noisy_evidence_start):
    """RL passes what SFT reached, on a rule that needs the prompt: from the noisy teacher's
    student (greedy recall@1 at chance), 200 DAPO steps (4 prompts x G = 8) reach >= 0.6
    (benches/README.md: 0.97; the same start under more SFT on the same traces stays far lower).
    About a minute and a half on one core."""
    start, after = _rl_evidence(noisy_evidence_start)
    assert start <= 0.2 and after >= 0.6, (start, after)


def test_dapo_with_zeroed_advantages_does_not_read_the_evidence_line(noisy_evidence_start, monkeypatch):
    """The control: the same rollouts, rewards and steps with every advantage 0 leave recall@1 at
    the start -- what the test above measures is the reward's signal, not drift."""
    honest = dapo_trainer.group_advantages
    monkeypatch.setattr(dapo_trainer, "group_advantages", lambda rewards, std_eps=1e-6: 0.0 * honest(rewards, std_eps))
    start, after = _rl_evidence(noisy_evidence_start)
    assert after <= start + 0.1, (start, after)


def test_copy_examples_repeat_a_block_of_catalog_sids_with_loss_on_the_repeat():
    task = S.make_planted_task(20, rule="last_item")
    _, sid_tokens = S.make_tokenizer(task)
    examples = S.copy_examples(task, sid_tokens, 5, n_sids=3, seed=1)
    assert examples == S.copy_examples(task, sid_tokens, 5, n_sids=3, seed=1)  # seeded
    for ex in examples:
        half = len(ex.input_ids) // 2
        block = ex.input_ids[:half]
        assert ex.input_ids[half:] == block and ex.weights == [0.0] * half + [1.0] * half
        assert block[0] == sid_tokens.answer_open and block[-1] == sid_tokens.answer_close
        sids = np.asarray(block[1:-1]).reshape(3, -1)  # <|sid_begin|> codes <|sid_end|> per item
        assert (sids[:, 0] == sid_tokens.sid_begin).all() and (sids[:, -1] == sid_tokens.sid_end).all()
        codes = [[int(np.nonzero(sid_tokens.code_ids[level] == t)[0][0]) for level, t in enumerate(row[1:-1])]
                 for row in sids]
        rows = [int(np.nonzero((task.codes == c).all(axis=1))[0][0]) for c in codes]
        assert len(set(rows)) == 3  # three distinct catalog items


def test_copy_examples_in_the_prompts_line_layout_answer_the_lines_in_order():
    import re

    task = S.make_planted_task(20, rule="last_item")
    tokenizer, sid_tokens = S.make_tokenizer(task)
    for ex in S.copy_examples(task, sid_tokens, 4, n_sids=5, layout="lines", tokenizer=tokenizer, seed=2):
        text = tokenizer.decode(ex.input_ids)
        shown = re.findall(r"\d+\. (<\|sid_begin\|>.*?<\|sid_end\|>) item", text)
        trained = tokenizer.decode([t for t, w in zip(ex.input_ids, ex.weights) if w > 0])
        assert len(shown) == 5 and len(set(shown)) == 5
        assert trained.startswith("<answer>" + "".join(shown) + "</answer>")  # then the end-of-turn token
    with pytest.raises(InvalidInputError, match="tokenizer"):
        S.copy_examples(task, sid_tokens, 1, layout="lines")
    with pytest.raises(InvalidInputError, match="layout"):
        S.copy_examples(task, sid_tokens, 1, layout="rows", tokenizer=tokenizer)


def _plain_sft_train(model, examples, pad_id, *, steps, batch_size, lr, seed=0):
    """The plain computation synthetic.sft_train must equal: AdamW steps on weighted_nll (grad clip
    1) over the SFT stage's batches -- epochs of ceil(n / b) steps over the order of
    ``epoch_order(n, seed, epoch)``, the last batch of an epoch short."""
    from gr2.train.batches import collate, epoch_order
    from gr2.train.losses import weighted_nll
    from gr2.train.optim import make_optimizer

    n, optimizer, out = len(examples), make_optimizer(model, lr), []
    batches = [(epoch, epoch_order(n, seed, epoch)[first:first + batch_size])
               for epoch in range(steps) for first in range(0, n, batch_size)][:steps]
    model.train()
    for _, rows in batches:
        loss, _ = weighted_nll(model, collate([examples[i] for i in rows], pad_id))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        out.append(loss.item())
    model.eval()
    return out


def test_sft_train_is_the_sft_stage_loop():
    """synthetic.sft_train trains with the stage's step (gr2.train.sft.sft_step) and batch order
    (gr2.train.batches.batch_rows: 40 examples in batches of 16 are 16, 16, 8 per epoch) and gives
    the plain loop's weights bit for bit; a diverged loss stops it like the stage."""
    from gr2.errors import TrainingError

    task = S.make_planted_task(40, rule="prior", favoured=2, seed=1)
    tokenizer, _ = S.make_tokenizer(task)
    examples = S.sft_examples(task, tokenizer, range(40), teacher="format")
    new, old = S.make_model(tokenizer, seed=0), S.make_model(tokenizer, seed=0)
    got = S.sft_train(new, examples, tokenizer.pad_token_id, steps=7, batch_size=16, lr=3e-3, seed=2)
    want = _plain_sft_train(old, examples, tokenizer.pad_token_id, steps=7, batch_size=16, lr=3e-3, seed=2)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for (name, a), b in zip(new.state_dict().items(), old.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        next(new.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingError, match="sft diverged"):
        S.sft_train(new, examples, tokenizer.pad_token_id, steps=1, batch_size=4, lr=3e-3)


def test_pretrained_student_extends_any_hf_folder_with_the_task_sids(tmp_path):
    """synthetic.pretrained_student (the GPU script's student) loads an HF folder, adds the task's SID
    vocabulary and decodes valid rankings; "demo" is refused (it names the from-scratch path)."""
    from gr2.models import save_pretrained_atomic, train_demo_tokenizer

    task = S.make_planted_task(40, rule="evidence", seed=2)
    base_tokenizer = train_demo_tokenizer(["item", "user history candidates rank"], vocab_size=300)
    save_pretrained_atomic(S.make_model(base_tokenizer), base_tokenizer, tmp_path / "base")
    model, tokenizer, sid_tokens = S.pretrained_student(task, str(tmp_path / "base"))
    assert len(tokenizer) == len(base_tokenizer) + int(sum(task.level_sizes)) + 6  # codes + the six tags
    assert model.get_input_embeddings().weight.shape[0] >= len(tokenizer)
    rankings = S.greedy_rankings(model, tokenizer, task, range(4))
    for row, ranking in enumerate(rankings):
        assert sorted(ranking.tolist()) == sorted(task.candidates[row].tolist())
    with pytest.raises(InvalidInputError, match="pretrained"):
        S.pretrained_student(task, "demo")
