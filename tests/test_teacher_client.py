"""The LLM-teacher client (gr2.teacher_client) against a local fault-injecting HTTP server: junk
replies are not cached, the cache is keyed on the endpoint, an all-rejected run fails with a typed
error, vLLM's reasoning_content is read, one HTTP 400 is recorded while the stage goes on,
Retry-After goes through one shared limiter (fake clock, no real waits), the timeout is a
per-request deadline, cancellation and Ctrl-C are clean, and the counters reach report.json.
No network: everything is on 127.0.0.1."""

from __future__ import annotations

import http.server
import json
import re
import signal
import threading
import time
from email.utils import formatdate

import pytest
from test_midtrain_fixtures import make_run_dir

from gr2.errors import ConfigError, Gr2Error
from gr2.rundir import read_stage
from gr2.pipeline.traces import run_traces
from gr2.teacher import TeacherAcceptanceError, TeacherConfig
from gr2.teacher_client import (
    OpenAIChatClient,
    TeacherCancelled,
    TeacherEndpointError,
    TeacherRequestError,
    completion_text,
    parse_reply,
    parse_retry_after,
)

SID_RE = re.compile(r"<\|sid_begin\|>(?:<s_[a-z]_\d+>)+<\|sid_end\|>")
MESSAGES = [{"role": "user", "content": "Candidates:\n<|sid_begin|><s_a_1><|sid_end|>\n<|sid_begin|><s_a_2><|sid_end|>"}]
THINKING = "The history leans to the second one."


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("tc"), n_users=30)


class Handler(http.server.BaseHTTPRequestHandler):
    """``server.script`` (one action per request, then ``server.default``). Actions: ok, badanswer,
    reasoning (vLLM --reasoning-parser: thinking in ``reasoning_content``), reasoning_new (in
    ``reasoning``), 400, 401, 500, 429, 429ra=S (with Retry-After: S), slow, drip (the body one
    byte every 50 ms), interrupt (SIGINT to the main thread, then slow), echo400 / echo401 /
    echo200 (a body quoting the request headers, Authorization included)."""

    def log_message(self, *args):
        pass

    def _send(self, status, payload=b"", headers=()):
        try:
            self.send_response(status)
            for k, v in headers:
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (deadline, cancel)

    def do_POST(self):
        srv = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with srv.lock:
            srv.requests += 1
            action = srv.script.pop(0) if srv.script else srv.default
        srv.seen.set()
        if action == "interrupt":
            if srv.before_interrupt is not None:  # e.g. wait until earlier replies are cached
                srv.before_interrupt()
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)
            action = "slow"
        if action.startswith("echo"):  # a misbehaving proxy that quotes the request's credentials back
            quoted = json.dumps({"error": f"bad request, headers: {dict(self.headers)}"}).encode()
            return self._send(200 if action == "echo200" else int(action[4:]), quoted)
        if action in ("400", "401", "500", "429"):
            detail = b'{"error": "This model\'s maximum context length is 64 tokens"}' if action == "400" else b"{}"
            return self._send(int(action), detail)
        if action.startswith("429ra="):
            return self._send(429, b"{}", [("Retry-After", action.split("=", 1)[1])])
        if action == "slow":
            srv.release.wait(srv.slow_s)
        prompt = body["messages"][-1]["content"]
        block = re.split(r"Candidates(?: \(\d+\))?:", prompt)[-1].split("Task:")[0]
        cands = SID_RE.findall(block)
        shift = int(body.get("seed", 0)) % max(1, len(cands))
        order = cands[shift:] + cands[:shift]
        revealed = re.search(r"actual next film is (" + SID_RE.pattern + ")", prompt)  # targeted mode
        if revealed and revealed.group(1) in order:
            order.remove(revealed.group(1))
            order.insert(0, revealed.group(1))
        answer = f"<answer>{''.join(order)}</answer>"
        message = {"role": "assistant", "content": f"<think>Looking at the list.</think>{answer}"}
        if action == "badanswer":
            message["content"] = "Sure! Here is my ranking: the first one."
        elif action == "reasoning":
            message = {"role": "assistant", "content": "\n\n" + answer, "reasoning_content": THINKING}
        elif action == "reasoning_new":
            message = {"role": "assistant", "content": answer, "reasoning": THINKING}
        payload = json.dumps({"choices": [{"message": message, "finish_reason": "stop"}]}).encode()
        if action == "drip":
            try:
                self.send_response(200)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                for i in range(len(payload)):
                    self.wfile.write(payload[i:i + 1])
                    self.wfile.flush()
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return
        self._send(200, payload)


def start_server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.daemon_threads = True
    srv.script, srv.default, srv.requests, srv.lock, srv.slow_s = [], "ok", 0, threading.Lock(), 5.0
    srv.seen, srv.release = threading.Event(), threading.Event()
    srv.before_interrupt = None  # a callable the "interrupt" action runs before it sends SIGINT
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture()
def server():
    srv = start_server()
    yield srv
    srv.release.set()
    srv.shutdown()
    srv.server_close()


def url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/v1"


def has_answer(text):
    return "</answer>" in text


class FakeClock:
    """A clock that only moves when slept on: Retry-After waits are measured, not waited."""

    def __init__(self):
        self.now, self.sleeps, self.lock = 0.0, [], threading.Lock()

    def __call__(self):
        with self.lock:
            return self.now

    def sleep(self, seconds):
        with self.lock:
            self.sleeps.append(round(seconds, 6))
            self.now += seconds


def traces_config(srv, **kw):
    base = dict(backend="openai", endpoint=url(srv), model="m", mode="rejection", attempts=10, max_examples=6,
                concurrency=2, backoff_s=0.0, max_retries=1)
    return TeacherConfig(**{**base, **kw})


# --------------------------------------------------------------------------------------------
# (1) the cache


def test_junk_is_not_cached_and_cache_is_keyed_on_endpoint(server, tmp_path):
    server.default = "badanswer"
    junk = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)
    assert junk.complete(MESSAGES, accept=has_answer).startswith("Sure!")
    assert junk.stats["not_cached_invalid"] == 1 and not list(tmp_path.glob("*.json"))
    server.default = "ok"  # the endpoint is fixed: the junk is not replayed
    good = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)
    text = good.complete(MESSAGES, accept=has_answer)
    assert has_answer(text) and server.requests == 2 and len(list(tmp_path.glob("*.json"))) == 1
    again = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)
    assert again.complete(MESSAGES, accept=has_answer) == text and again.stats["cache_hits"] == 1
    assert server.requests == 2
    # another endpoint, same model and request: its own cache entry
    other = start_server()
    try:
        OpenAIChatClient(url(other), "m", cache_dir=tmp_path).complete(MESSAGES, accept=has_answer)
        assert other.requests == 1 and len(list(tmp_path.glob("*.json"))) == 2
    finally:
        other.shutdown()
        other.server_close()
    # another model is another request
    OpenAIChatClient(url(server), "m2", cache_dir=tmp_path).complete(MESSAGES)
    assert server.requests == 3
    # a cached reply the check now rejects is dropped and asked again
    strict = OpenAIChatClient(url(server), "m", cache_dir=tmp_path)
    strict.complete(MESSAGES, accept=lambda t: False)
    assert strict.stats["cache_dropped_invalid"] == 1 and server.requests == 4
    # purge (--force): unreadable files and entries of the old format (keyed without the endpoint)
    (tmp_path / ("0" * 32 + ".json")).write_text(json.dumps({"request": {}, "content": "junk"}))
    (tmp_path / "broken.json").write_text("{")
    assert good.purge_cache() == 2 and len(list(tmp_path.glob("*.json"))) == 2  # other endpoint's, m2's


def test_stage_all_rejected_fails_typed_and_junk_is_not_replayed(server, run_dir, tmp_path, capsys):
    from gr2.cli import main

    server.default = "badanswer"
    toml = tmp_path / "run.toml"
    toml.write_text(f'[traces]\nbackend = "openai"\nendpoint = "{url(server)}"\nmodel = "m"\nattempts = 10\n'
                    'max_examples = 6\nconcurrency = 2\nbackoff_s = 0.0\n')
    assert main(["traces", "--run-dir", str(run_dir), "--config", str(toml), "--force"]) == 2
    err = capsys.readouterr().err
    assert "0 of 6 examples kept" in err and "min_acceptance" in err and "malformed x60" in err
    report = json.loads((run_dir / "traces" / "report.json").read_text())
    assert report["status"] == "below min_acceptance" and report["invalid_completions"] == {"malformed": 60}
    assert report["client"]["counters"]["not_cached_invalid"] == 60
    config = traces_config(server)
    with pytest.raises(TeacherAcceptanceError, match="0 of 6") as info:
        run_traces(run_dir, config)
    assert isinstance(info.value, Gr2Error) and info.value.summary["kept"] == 0
    # the endpoint is fixed: nothing junk was cached and the stage was not marked done
    server.default = "ok"
    n = server.requests
    summary = run_traces(run_dir, config)
    assert summary["kept"] > 0 and summary["status"] == "ok" and server.requests > n
    assert read_stage(run_dir / "traces")["summary"]["kept"] == summary["kept"]
    # a floor of 0 keeps such a run
    server.default = "badanswer"
    kept_nothing = run_traces(run_dir, traces_config(server, mode="targeted", min_acceptance=0.0))
    assert kept_nothing["kept"] == 0 and kept_nothing["status"] == "ok"


def test_min_acceptance_is_validated():
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="min_acceptance"):
            TeacherConfig(min_acceptance=bad)
    with pytest.raises(ConfigError, match="timeout_s"):
        TeacherConfig(timeout_s=0)
    assert TeacherConfig().min_acceptance == 0.05


# --------------------------------------------------------------------------------------------
# (2) reasoning fields


def test_reasoning_content_is_read(server, run_dir):
    for action in ("reasoning", "reasoning_new"):
        server.script = [action]
        client = OpenAIChatClient(url(server), "m")
        text = client.complete(MESSAGES)
        assert text.startswith(f"<think>{THINKING}</think><answer>") and client.stats["reasoning_field"] == 1
    server.script = ["reasoning"]
    assert OpenAIChatClient(url(server), "m").complete(MESSAGES, keep_reasoning=False).lstrip().startswith("<answer>")
    assert parse_reply(b'{"choices": [{"message": {"content": null, "reasoning_content": "hm"}}]}')[:2] == ("", "hm")
    assert completion_text("<think>own</think><answer></answer>", "x") == "<think>own</think><answer></answer>"
    with pytest.raises(ValueError):
        parse_reply(b'{"choices": [{"message": {"content": null}}]}')
    # the stage: a vLLM server with --reasoning-parser gives kept traces with their reasoning
    server.default = "reasoning"
    summary = run_traces(run_dir, traces_config(server, mode="targeted", seed=2), force=True)
    records = [json.loads(x) for x in (run_dir / "traces" / "traces.jsonl").read_text().splitlines()]
    assert summary["kept"] > 0 and summary["invalid_completions"] == {}
    assert all(r["completion"].startswith(f"<think>{THINKING}</think>") for r in records if r["accepted"])
    # the answer-only arm drops the separate reasoning instead of failing on it
    summary = run_traces(run_dir, traces_config(server, mode="targeted", seed=2), arm="answer", force=True)
    assert summary["kept"] > 0 and summary["invalid_completions"] == {}


# --------------------------------------------------------------------------------------------
# (3) failures, Retry-After, deadline, cancel, counters


def test_one_400_is_recorded_the_stage_goes_on_and_counters_reach_the_report(server, run_dir):
    server.script = ["400"]
    config = traces_config(server, mode="targeted", max_examples=8, seed=3)
    summary = run_traces(run_dir, config, force=True)
    records = [json.loads(x) for x in (run_dir / "traces" / "traces.jsonl").read_text().splitlines()]
    failed = [r for r in records if "failure" in r]
    assert len(records) == 8 and len(failed) == 1 and not failed[0]["accepted"]
    assert failed[0]["failure"]["reason"] == "http_400" and "maximum context length" in failed[0]["failure"]["message"]
    assert summary["failed_examples"] == 1 and summary["failures"] == {"http_400": 1}
    assert summary["kept"] == sum(r["accepted"] for r in records) > 0
    assert read_stage(run_dir / "traces")["summary"]["kept"] == summary["kept"]  # the stage finished
    report = json.loads((run_dir / "traces" / "report.json").read_text())
    client = report["client"]
    assert client["endpoint"] == url(server) + "/chat/completions" and client["failures"] == {"http_400": 1}
    assert client["http_status"] == {"400": 1} and client["counters"]["requests"] == server.requests == 8
    assert client["counters"]["ok"] == 7 and client["counters"]["cache_misses"] == 8
    # a resume asks again only for the failed example (the others are cached)
    summary = run_traces(run_dir, config, force=True)
    assert server.requests == 9 and summary["failed_examples"] == 0
    assert json.loads((run_dir / "traces" / "report.json").read_text())["client"]["counters"]["cache_hits"] == 7


def test_client_status_classes(server):
    server.script = ["401"]
    client = OpenAIChatClient(url(server), "m", max_retries=3, backoff_s=0.0)
    with pytest.raises(TeacherEndpointError, match="HTTP 401") as info:
        client.complete(MESSAGES)
    assert not isinstance(info.value, TeacherRequestError) and server.requests == 1  # fatal, not retried
    server.script = ["400"]
    with pytest.raises(TeacherRequestError) as info:
        client.complete(MESSAGES)
    assert info.value.reason == "http_400" and info.value.status == 400 and server.requests == 2
    # every request rejected and none ever succeeded: the endpoint is declared misconfigured
    server.default = "400"
    fast = OpenAIChatClient(url(server), "m", fail_fast_after=3)
    for _ in range(2):
        with pytest.raises(TeacherRequestError):
            fast.complete(MESSAGES)
    with pytest.raises(TeacherEndpointError, match="none succeeded"):
        fast.complete(MESSAGES)


def test_retry_after_is_honoured_through_one_shared_limiter(server):
    clock = FakeClock()
    server.script = ["429ra=7"]
    client = OpenAIChatClient(url(server), "m", backoff_s=0.01, max_retries=2, sleep=clock.sleep, clock=clock)
    assert has_answer(client.complete(MESSAGES))
    assert clock.now == pytest.approx(7.0) and clock.sleeps == [0.01, 6.99]  # backoff, then the rest
    assert client.stats["retry_after_honoured"] == 1 and client.stats["http_429"] == 1
    # a Retry-After seen by one thread holds back the next request of every other thread
    clock = FakeClock()
    server.script = ["429ra=5"]
    client = OpenAIChatClient(url(server), "m", backoff_s=0.0, max_retries=0, sleep=clock.sleep, clock=clock)
    with pytest.raises(TeacherEndpointError, match="HTTP 429"):
        client.complete(MESSAGES)
    out = []
    worker = threading.Thread(target=lambda: out.append(client.complete(MESSAGES, sample_index=1)))
    worker.start()
    worker.join()
    assert has_answer(out[0]) and clock.sleeps == [5.0] and client.stats["rate_limited_waits"] == 1
    # a 429 without Retry-After holds everyone back by its backoff; an absurd Retry-After is capped
    clock = FakeClock()
    server.script = ["429", "429ra=99999"]
    client = OpenAIChatClient(url(server), "m", backoff_s=0.5, max_retries=2, sleep=clock.sleep, clock=clock,
                              max_retry_after_s=30)
    client.complete(MESSAGES)
    assert clock.now == pytest.approx(0.5 + 30.0)
    assert parse_retry_after("3") == 3.0 and parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after("inf") is None and parse_retry_after(None) is None
    assert parse_retry_after(formatdate(1000.0 + 20, usegmt=True), now=lambda: 1000.0) == pytest.approx(20.0)


def test_timeout_is_a_per_request_deadline(server):
    server.script = ["drip"]  # every read gets a byte within 50 ms; the whole body takes seconds
    client = OpenAIChatClient(url(server), "m", timeout_s=0.4, max_retries=0)
    with pytest.raises(TeacherEndpointError, match="request deadline"):
        client.complete(MESSAGES)
    assert client.stats["timeouts"] == 1 and client.stats["ok"] == 0


def test_cancel_cuts_inflight_requests_and_waits(server):
    for script in (["slow"], ["429ra=60"]):
        server.script, server.seen = list(script), threading.Event()
        client = OpenAIChatClient(url(server), "m", timeout_s=30, max_retries=2)
        raised = []

        def call():
            try:
                client.complete(MESSAGES)
            except BaseException as e:  # noqa: BLE001
                raised.append(e)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        assert server.seen.wait(5)
        time.sleep(0.05)  # let the client reach its read / its Retry-After wait
        client.cancel()
        worker.join(5)
        assert not worker.is_alive() and len(raised) == 1 and isinstance(raised[0], TeacherCancelled), script
    with pytest.raises(TeacherCancelled):
        client.complete(MESSAGES)


@pytest.fixture
def deliverable_sigint():
    """SIGINT reaches this process's main thread as a KeyboardInterrupt for the test: the default
    handler installed and the signal unblocked in the main thread, both restored afterwards. In the
    full suite (not alone, not in any subset tried) the test failed twice with the stage running to
    the end, i.e. the pthread_kill'd SIGINT was never acted on; a probe showed the handler was still
    Python's default there, so the suspect is a SIGINT left blocked in the thread mask by an earlier
    test's library (multiprocessing blocks it while spawning helpers). With this fixture the prefix
    of the suite + this module passes.
    """
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    blocked = signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    yield signal.SIGINT in blocked
    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    signal.signal(signal.SIGINT, handler)


def test_ctrl_c_stops_the_stage_cleanly(server, run_dir, tmp_path, capsys, deliverable_sigint):
    from gr2.cli import main

    print(f"SIGINT was blocked before the test: {deliverable_sigint}")

    server.script = ["ok", "ok", "interrupt"]
    server.default = "slow"
    toml = tmp_path / "run.toml"
    toml.write_text(f'[traces]\nbackend = "openai"\nendpoint = "{url(server)}"\nmodel = "m"\nmode = "targeted"\n'
                    'max_examples = 12\nconcurrency = 2\nseed = 4\n')
    cache = run_dir / "traces" / "cache"
    before = set(cache.glob("*.json"))

    def both_replies_cached(timeout_s: float = 60.0) -> None:
        """The interrupt lands only after the two "ok" replies are in the cache: under load the second
        could still be in flight when the third request arrives, which made this test flaky."""
        deadline = time.monotonic() + timeout_s
        while len(set(cache.glob("*.json")) - before) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)

    server.before_interrupt = both_replies_cached
    try:
        assert main(["traces", "--run-dir", str(run_dir), "--config", str(toml), "--force"]) == 130
    finally:
        server.before_interrupt = None
    assert "interrupted" in capsys.readouterr().err
    assert server.requests <= 4  # pending examples were cancelled, not sent
    assert len(set(cache.glob("*.json")) - before) >= 2  # what finished is kept for the resume
    # the resume asks only for what had not finished
    server.script, server.default = [], "ok"
    n = server.requests
    summary = run_traces(run_dir, TeacherConfig(backend="openai", endpoint=url(server), model="m", mode="targeted",
                                                max_examples=12, concurrency=2, seed=4))
    assert summary["examples"] == 12 and server.requests - n <= 10
    assert summary["client"]["counters"]["cache_hits"] >= 2


SECRET = "sk-PLANTED-7f3a9c"


@pytest.mark.parametrize("key", [SECRET + "\n", " " + SECRET, SECRET + "\t", SECRET[:4] + "\x00" + SECRET[4:],
                                 SECRET + "é"])
def test_a_malformed_api_key_is_a_config_error_that_never_shows_it(key):
    with pytest.raises(ConfigError, match="API key .* contains .* at position") as info:
        OpenAIChatClient("http://127.0.0.1:9/v1", "m", api_key=key)
    assert "PLANTED" not in str(info.value) and "7f3a9c" not in repr(info.value)


def test_credentials_in_the_endpoint_are_refused_without_echoing_them():
    with pytest.raises(ConfigError, match="must not carry credentials") as info:
        OpenAIChatClient(f"https://user:{SECRET}@example.invalid/v1", "m")
    assert "PLANTED" not in str(info.value)
    with pytest.raises(ConfigError, match="http\\(s\\) URL, got scheme 'ftp'") as info:
        OpenAIChatClient(f"ftp://user:{SECRET}@example.invalid/v1", "m")
    assert "PLANTED" not in str(info.value)


def test_an_endpoint_port_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match="invalid port"):
        OpenAIChatClient("http://127.0.0.1:99999/v1", "m")


def test_an_api_key_echoed_by_the_server_never_reaches_a_message_log_or_file(server, run_dir, tmp_path, capsys,
                                                                           caplog, monkeypatch):
    """Issue 32: a planted key, a server that quotes the Authorization header back (as HTTP 400, 401
    and a malformed 200): no exception message, log line, printed output or file written by the
    traces stage contains it."""
    import logging
    import shutil

    key = "sk-planted-" + "7" * 24
    monkeypatch.setenv("GR2_TEST_TEACHER_KEY", key)
    messages = []
    client = OpenAIChatClient(url(server), "m", api_key=key, max_retries=0, backoff_s=0.0)
    for action in ("echo400", "echo401", "echo200"):
        server.script = [action]
        with pytest.raises(Gr2Error) as err:
            client.complete(MESSAGES, accept=has_answer)
        messages.append(str(err.value))
    assert any("[redacted]" in m for m in messages), messages  # the body was quoted, the key blanked
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    server.default = "echo400"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(Gr2Error) as err:
            run_traces(run, traces_config(server, api_key_env="GR2_TEST_TEACHER_KEY"), force=True)
    messages.append(str(err.value))
    out = capsys.readouterr()
    seen = "\n".join([*messages, out.out, out.err, *(r.getMessage() for r in caplog.records)])
    assert key not in seen
    for path in run.rglob("*"):  # the run's records, reports and the teacher's reply cache
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path
