"""Teacher traces: heuristic teacher, the OpenAI-compatible client against a real loopback HTTP
server (timeouts, 5xx, malformed answers, cache/resume), the local-model backend."""

from __future__ import annotations

import http.server
import json
import re
import threading
import time

import numpy as np
import pytest
from test_midtrain_fixtures import make_run_dir, tiny_midtrain_config

from gr2.data.catalog import ItemCatalog
from gr2.errors import ConfigError, DataError
from gr2.pipeline.traces import load_examples, run_traces
from gr2.teacher import (
    HEURISTIC_LABEL,
    OpenAIChatClient,
    TeacherConfig,
    TeacherEndpointError,
    parse_completions,
)
from gr2.tokens import answer_text

SID_RE = re.compile(r"<\|sid_begin\|>(?:<s_[a-z]_\d+>)+<\|sid_end\|>")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("tr"), n_users=30)


# --------------------------------------------------------------------------------------------
# a real OpenAI-compatible server on loopback


class Handler(http.server.BaseHTTPRequestHandler):
    """Answers /v1/chat/completions. ``server.script`` is a list of behaviours consumed one per
    request ("500", "slow", "garbage", "nochoices", "400"); when empty it answers properly: a
    computed ranking of the candidate SIDs found in the prompt, rotated by the request's seed."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests += 1
            action = srv.script.pop(0) if srv.script else "ok"
        if self.path != "/v1/chat/completions":
            action = "404"
        if action in ("500", "503", "400", "404"):
            self.send_response(int(action))
            self.end_headers()
            self.wfile.write(b'{"error": "scripted"}')
            return
        if action == "slow":
            time.sleep(srv.slow_s)
        if action == "garbage":
            payload = b"this is not json"
        elif action == "nochoices":
            payload = json.dumps({"choices": []}).encode()
        else:
            prompt = body["messages"][-1]["content"]
            # the candidate block of gr2.prompts.build_messages ("Candidates (K):" ... "Task:")
            block = re.split(r"Candidates(?: \(\d+\))?:", prompt)[-1].split("Task:")[0] if "Candidates" in prompt else ""
            cands = SID_RE.findall(block)
            shift = int(body.get("seed", 0)) % max(1, len(cands))
            order = cands[shift:] + cands[:shift]
            content = f"<think>Looking at {cands[0] if cands else 'nothing'} first.</think><answer>{''.join(order)}</answer>"
            if action == "badanswer":
                content = "I think the first one."
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and went away


@pytest.fixture()
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.script, srv.requests, srv.lock, srv.slow_s = [], 0, threading.Lock(), 1.5
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


MESSAGES = [{"role": "user", "content": "Candidates:\n<|sid_begin|><s_a_1><|sid_end|>\n<|sid_begin|><s_a_2><|sid_end|>"}]


def test_client_retries_timeouts_5xx_and_malformed_then_succeeds(server):
    server.script = ["500", "slow", "garbage", "nochoices", "503"]
    sleeps = []
    client = OpenAIChatClient(url(server), "m", timeout_s=0.5, max_retries=5, backoff_s=0.01, sleep=sleeps.append)
    text = client.complete(MESSAGES, sample_index=1)
    assert text.endswith("<answer><|sid_begin|><s_a_2><|sid_end|><|sid_begin|><s_a_1><|sid_end|></answer>")
    assert client.stats["timeouts"] == 1 and client.stats["malformed"] == 2
    assert client.stats["http_500"] == 1 and client.stats["http_503"] == 1 and client.stats["ok"] == 1
    assert sleeps == [0.01, 0.02, 0.04, 0.08, 0.16]  # exponential backoff


def test_client_gives_up_and_does_not_retry_4xx(server):
    server.script = ["500"] * 3
    client = OpenAIChatClient(url(server), "m", max_retries=2, backoff_s=0.0, sleep=lambda s: None)
    with pytest.raises(TeacherEndpointError, match="giving up after 3 tries; last error: HTTP 500"):
        client.complete(MESSAGES)
    server.script = ["400"]
    before = server.requests
    with pytest.raises(TeacherEndpointError, match="HTTP 400"):
        client.complete(MESSAGES)
    assert server.requests == before + 1
    dead = OpenAIChatClient("http://127.0.0.1:9/v1", "m", max_retries=1, backoff_s=0.0, sleep=lambda s: None)
    with pytest.raises(TeacherEndpointError, match="connection error"):
        dead.complete(MESSAGES)
    with pytest.raises(ConfigError):
        OpenAIChatClient("localhost:8000", "m")


def test_client_disk_cache(server, tmp_path):
    client = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)
    first = client.complete(MESSAGES, sample_index=0)
    n = server.requests
    again = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)  # a new process, same cache
    assert again.complete(MESSAGES, sample_index=0) == first and server.requests == n
    assert again.stats["cache_hits"] == 1
    again.complete(MESSAGES, sample_index=1)  # another sample is another request
    assert server.requests == n + 1


def test_run_traces_openai_rejection_sampling_and_resume(server, run_dir):
    server.script = ["500", "badanswer"]
    config = TeacherConfig(backend="openai", endpoint=url(server), model="m", mode="rejection", attempts=6,
                           max_examples=12, concurrency=3, backoff_s=0.0)
    summary = run_traces(run_dir, config, force=True)
    # the server rotates the candidates by the sample's seed: attempt a puts candidate a first, so a
    # target at position p < 6 is reachable (unless the one scripted bad answer hit that very attempt)
    records = [json.loads(x) for x in (run_dir / "traces" / "traces.jsonl").read_text().splitlines()]
    reachable = sum(r["candidates"].index(r["target"]) < 6 for r in records)
    assert reachable - 1 <= summary["kept"] <= reachable and summary["kept"] > 0
    for r in records:
        if r["accepted"]:
            assert r["ranking"][0] == r["target"]
            assert r["attempts"] == r["candidates"].index(r["target"]) + 1
        else:
            assert r["attempts"] == 6
    assert summary["kept"] == sum(r["accepted"] for r in records)
    assert summary["acceptance_rate"] == pytest.approx(summary["kept"] / 12)
    kept_attempts = [r["attempts"] for r in records if r["accepted"]]
    assert summary["attempts_per_kept_trace"] == pytest.approx(np.mean(kept_attempts))
    assert summary["invalid_completions"] == {"malformed": 1}
    # resume: a rerun is served from the disk cache; only the one reply that did not parse was not
    # cached, so it is asked again (and now answered properly)
    n = server.requests
    assert run_traces(run_dir, config, force=True)["kept"] in (summary["kept"], summary["kept"] + 1)
    assert server.requests == n + 1


def test_heuristic_rejection_and_targeted(run_dir):
    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    rej = run_traces(run_dir, TeacherConfig(mode="rejection", attempts=6), force=True)
    records = [json.loads(x) for x in (run_dir / "traces" / "traces.jsonl").read_text().splitlines()]
    assert rej["teacher"] == HEURISTIC_LABEL and all(r["teacher"] == HEURISTIC_LABEL for r in records)
    assert 0 < rej["kept"] < rej["examples"] == len(records) == 30
    assert 1 <= rej["attempts_per_kept_trace"] <= 6
    report = json.loads((run_dir / "traces" / "report.json").read_text())
    assert report["teacher"] == "heuristic teacher"
    assert report["parsed_with"] == "gr2.verify_rewards"  # the one grammar, in Rust
    examples = {e.list_id: e for e in load_examples(run_dir, "train", 0, 0)}
    for r in records:
        if r["accepted"]:
            rb = parse_completions([r["completion"]], [examples[r["list_id"]]], catalog, reasoning=True)
            assert rb.valid[0] and rb.ranking[0].tolist() == r["ranking"] and r["ranking"][0] == r["target"]
            think = r["completion"].split("</think>")[0]
            assert SID_RE.search(think)  # the reasoning cites items by SID
    tgt = run_traces(run_dir, TeacherConfig(mode="targeted"), force=True)
    assert tgt["acceptance_rate"] == 1.0 and tgt["attempts_per_kept_trace"] == 1.0
    # the teacher's greedy ranking of the held-out lists is written for `gr2 eval`
    assert (run_dir / "teacher" / "rankings_test.npz").exists()


def test_accept_rank_relaxes_rejection_to_the_top_positions(run_dir):
    """accept_rank = 3 keeps every sample with the target in the first 3 positions (more traces
    than target-first, each still meeting its rule); accept_rank = K keeps every list's greedy
    ranking (plain distillation: one attempt each)."""
    strict = run_traces(run_dir, TeacherConfig(attempts=2), force=True)
    top3 = run_traces(run_dir, TeacherConfig(attempts=2, accept_rank=3), force=True)
    records = [json.loads(x) for x in (run_dir / "traces" / "traces.jsonl").read_text().splitlines()]
    assert strict["kept"] < top3["kept"] and top3["accept_rank"] == 3
    assert all(r["target"] in r["ranking"][:3] for r in records if r["accepted"])
    assert any(r["ranking"][0] != r["target"] for r in records if r["accepted"])
    k = len(records[0]["candidates"])
    distill = run_traces(run_dir, TeacherConfig(attempts=4, accept_rank=k), force=True)
    assert distill["acceptance_rate"] == 1.0 and distill["attempts_per_kept_trace"] == 1.0
    with pytest.raises(ConfigError, match="accept_rank"):
        TeacherConfig(accept_rank=0)


def test_answer_only_arm(run_dir):
    summary = run_traces(run_dir, TeacherConfig(mode="rejection", attempts=6), arm="answer", force=True)
    records = [json.loads(x) for x in (run_dir / "traces_answer" / "traces.jsonl").read_text().splitlines()]
    assert summary["arm"] == "answer" and summary["kept"] > 0
    for r in records:
        assert r["reasoning"] is False and "<think>" not in r["completion"]
        assert "<think>" not in r["messages"][-1]["content"]  # the prompt asks for the answer only
        if r["accepted"]:
            assert r["completion"].startswith("<answer>")


def test_teacher_statistics_exclude_the_target(run_dir):
    """Co-occurrence and popularity come from the split's fit data: a list's target interaction
    and the user's later items are not in it."""
    from gr2.pipeline.inputs import load_fit_sequences
    from gr2.teacher import HeuristicTeacher

    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    fit = load_fit_sequences(run_dir, "train")
    teacher = HeuristicTeacher(catalog, fit, TeacherConfig(w_cooccur=1.0))
    for e in load_examples(run_dir, "train", 0, 0):
        own = fit[e.user_idx].tolist()
        assert e.target not in own  # the user's own fit prefix stops before the target
    assert teacher.popularity.sum() == sum(len(s) for s in fit)


def test_parse_completions_rejects_malformed(run_dir):
    from gr2.teacher import Example

    catalog = ItemCatalog.from_run_dir(run_dir, sids=True)
    ex = Example(0, 0, [3], [0, 1, 2], 2, [0.0, 0.0, 0.0])
    good = "<think>x</think>" + answer_text(catalog.codes[[2, 0, 1]])
    rb = parse_completions([good], [ex], catalog, reasoning=True)
    assert rb.valid[0] and rb.ranking[0].tolist() == [2, 0, 1]
    assert parse_completions([answer_text(catalog.codes[[2, 0, 1]])], [ex], catalog, reasoning=False).valid[0]
    assert not parse_completions([good], [ex], catalog, reasoning=False).valid[0]  # think in answer-only arm
    bad = {
        "duplicate": "<think>x</think>" + answer_text(catalog.codes[[2, 0, 0]]),
        "missing": "<think>x</think>" + answer_text(catalog.codes[[2, 0]]),
        "foreign": "<think>x</think>" + answer_text(catalog.codes[[2, 0, 5]]),
        "trailing": good + " thanks",
        "words": "<think>x</think><answer>first " + answer_text(catalog.codes[[2, 0, 1]])[8:],
        "unknown sid": "<think>x</think><answer><|sid_begin|><s_a_999><s_b_0><s_c_0><|sid_end|></answer>",
    }
    for name, text in bad.items():
        assert not parse_completions([text], [ex], catalog, reasoning=True).valid[0], name


def test_local_backend_with_tiny_model(tmp_path_factory):
    from gr2.pipeline.midtrain import run_midtrain

    run_dir = make_run_dir(tmp_path_factory.mktemp("lo"), n_users=30)
    run_midtrain(run_dir, tiny_midtrain_config(steps=2))
    config = TeacherConfig(backend="local", local_model=str(run_dir / "midtrain" / "model"), attempts=2,
                           max_examples=2, max_tokens=8, min_acceptance=0.0)  # no floor: 0 kept is expected
    summary = run_traces(run_dir, config)
    # an untrained 1-layer model cannot write a valid answer: every attempt is counted as invalid
    assert summary["teacher"].startswith("local model")
    assert summary["kept"] == 0 and sum(summary["invalid_completions"].values()) == 4


def test_teacher_bad_inputs(tmp_path, run_dir):
    with pytest.raises(ConfigError):
        TeacherConfig(backend="gpt")
    with pytest.raises(ConfigError):
        TeacherConfig(backend="openai")  # no endpoint
    with pytest.raises(ConfigError):
        TeacherConfig(attempts=0)
    with pytest.raises(DataError, match="`data`"):
        run_traces(tmp_path, TeacherConfig())


def test_cli_traces_stage(run_dir, tmp_path, capsys):
    from gr2.cli import main

    config = tmp_path / "run.toml"
    config.write_text('[traces]\nmode = "targeted"\n')
    assert main(["traces", "--run-dir", str(run_dir), "--config", str(config), "--set", "attempts=2",
                 "--force"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "targeted" and out["teacher"] == HEURISTIC_LABEL
    assert main(["traces", "--run-dir", str(run_dir), "--set", "atempts=3"]) == 2  # unknown key
    assert "unknown key" in capsys.readouterr().err
