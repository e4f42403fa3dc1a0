"""The LLM teacher's client: any OpenAI-compatible ``/chat/completions`` endpoint (vLLM, TGI, a
hosted API), standard library only (``http.client``).

What it guarantees, so that a long trace run survives a real endpoint:

* **Retries** with exponential backoff on timeouts, refused/reset connections, 408/409/425/429/5xx
  and malformed JSON; ``Retry-After`` (seconds or an HTTP date) is honoured through one
  :class:`RateLimiter` shared by every worker thread of the client, so a 429 to one thread holds
  back all of them. A 429 without ``Retry-After`` holds them back for its backoff delay.
* **A per-request deadline**: ``timeout_s`` bounds the whole request (connect, send, headers and
  body), not each socket read -- a server that drips bytes cannot hold a worker forever.
* **Typed failures**: 401/403/404/405 (wrong key, URL or model) and exhausted retries raise
  :class:`TeacherEndpointError` (the endpoint is unusable: the stage stops); any other 4xx (e.g. a
  400 for one over-long prompt) raises :class:`TeacherRequestError`, which the stage records as a
  failure of that one example and goes on. If the first ``fail_fast_after`` requests are all
  rejected that way and none ever succeeded, the endpoint is declared unusable.
* **A disk cache keyed by endpoint URL + request** (model, messages, sampling parameters, seed),
  written only for replies the caller's ``accept`` check passes (the stage passes "parses with
  gr2's completion grammar"), and re-checked on every read: junk from a misconfigured endpoint
  is never replayed, and a killed run resumes without re-asking for the good replies.
* **Reasoning fields**: a vLLM server started with ``--reasoning-parser`` returns the thinking in
  ``message.reasoning_content`` (``message.reasoning`` in newer vLLM) and only the answer in
  ``content``; the client rebuilds gr2's grammar ``<think>reasoning</think>content`` (or drops the
  reasoning for the answer-only arm).
* **Clean cancellation**: :meth:`OpenAIChatClient.cancel` wakes every backoff/rate-limit wait and
  shuts down every in-flight socket; the calls end with :class:`TeacherCancelled`.
* **Counters** (:meth:`OpenAIChatClient.report`): requests, retries, HTTP codes, timeouts,
  connection errors, malformed replies, cache hits/misses/drops, Retry-After waits, failures by
  reason -- the stage writes them into ``traces/report.json``.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import math
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any, Callable

from gr2.errors import ConfigError, Gr2Error, Gr2IOError
from gr2.rundir import atomic_write_json
from gr2.tokens import THINK_CLOSE, THINK_OPEN

CACHE_VERSION = 2
MAX_RESPONSE_BYTES = 16 << 20


class TeacherEndpointError(Gr2IOError):
    """The endpoint is unusable: it kept failing (timeouts, 5xx, malformed JSON) after every retry,
    or it refused the client itself (401/403/404/405: wrong key, URL or model)."""


class TeacherRequestError(TeacherEndpointError):
    """The endpoint rejected one request for good (a 4xx such as 400 for an over-long prompt).
    ``reason`` is a short key (``http_400``) the stage counts; the rest of the run goes on."""

    def __init__(self, message: str, *, reason: str, status: int | None = None):
        super().__init__(message)
        self.reason, self.status = reason, status


class TeacherCancelled(Gr2Error, RuntimeError):
    """The client was cancelled (Ctrl-C) while this request was waiting or in flight."""


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date); None when
    absent or unreadable, never negative."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None:
            return None
        seconds = when.timestamp() - now()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


class RateLimiter:
    """One gate shared by the worker threads of a client: no request starts before ``not_before``.

    ``defer(s)`` pushes the gate to at least ``clock() + s`` (a ``Retry-After`` or a 429);
    ``wait()`` blocks until the gate is open. ``clock`` and ``sleep`` are injectable (tests use a
    fake clock whose ``sleep`` advances it)."""

    def __init__(self, clock: Callable[[], float], sleep: Callable[[float], Any], cancelled: threading.Event):
        self.clock, self.sleep, self.cancelled = clock, sleep, cancelled
        self._not_before = -math.inf
        self._lock = threading.Lock()

    def defer(self, seconds: float) -> None:
        with self._lock:
            self._not_before = max(self._not_before, self.clock() + seconds)

    def wait(self) -> float:
        """Block until the gate is open; the seconds waited."""
        waited = 0.0
        while True:
            if self.cancelled.is_set():
                raise TeacherCancelled("cancelled while waiting for the endpoint's Retry-After")
            with self._lock:
                delay = self._not_before - self.clock()
            if delay <= 0:
                return waited
            before = self.clock()
            self.sleep(delay)
            waited += delay
            if self.clock() <= before:  # an injected sleep that does not move this clock
                return waited


class _Deadline(Exception):
    pass


def _check_api_key(key: Any) -> None:
    """An API key must be one printable ASCII word: a newline or space would make the HTTP library
    raise an error that prints the whole header, key included. The key itself is never shown."""
    if key is None:
        return
    if not isinstance(key, str):
        raise ConfigError(f"the teacher API key (teacher.api_key_env) must be a string, got {type(key).__name__}")
    for i, ch in enumerate(key):
        if ch.isspace() or not ch.isprintable() or not ch.isascii():
            what = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab", " ": "a space"}.get(
                ch, "a non-printable or non-ASCII character")
            raise ConfigError(f"the teacher API key (teacher.api_key_env) contains {what} at position {i + 1} of "
                              f"{len(key)} (the key is not shown); a key read from a file often ends with a newline: "
                              "strip it")


class OpenAIChatClient:
    """OpenAI-compatible chat client with retries, a shared rate limiter, a per-request deadline,
    a validated disk cache and counters (see the module docstring)."""

    RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
    FATAL_STATUS = {401, 403, 404, 405}

    def __init__(self, endpoint: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 4, backoff_s: float = 1.0, cache_dir: str | Path | None = None,
                 sleep: Callable[[float], Any] | None = None, clock: Callable[[], float] = time.monotonic,
                 max_retry_after_s: float = 300.0, fail_fast_after: int = 16):
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            scheme = endpoint.split("://", 1)[0] if isinstance(endpoint, str) and "://" in endpoint else "none"
            raise ConfigError(f"endpoint must be an http(s) URL, got scheme {scheme!r}")
        _check_api_key(api_key)
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ConfigError(f"timeout_s must be a positive number of seconds, got {timeout_s!r}")
        if max_retries < 0 or not backoff_s >= 0:
            raise ConfigError("max_retries and backoff_s must be >= 0")
        self.url = endpoint.rstrip("/") + "/chat/completions"
        self._parts = urllib.parse.urlsplit(self.url)
        if self._parts.username is not None or self._parts.password is not None:  # never echoed: it is a secret
            raise ConfigError("teacher.endpoint must not carry credentials (user:password@host); give the key "
                              "through teacher.api_key_env")
        if not self._parts.hostname:
            raise ConfigError(f"endpoint has no host: {endpoint!r}")
        try:
            self._parts.port
        except ValueError:
            raise ConfigError(f"endpoint {endpoint!r} has an invalid port (1-65535)") from None
        self.model, self.api_key, self.timeout_s = model, api_key, float(timeout_s)
        self.max_retries, self.backoff_s = max_retries, backoff_s
        self.max_retry_after_s, self.fail_fast_after = max_retry_after_s, fail_fast_after
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self._cancelled = threading.Event()
        self.sleep = sleep if sleep is not None else self._cancelled.wait
        self.limiter = RateLimiter(clock, self.sleep, self._cancelled)
        self.stats: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._inflight: set[socket.socket] = set()

    # ---------------------------------------------------------------- counters, cancellation

    def _count(self, key: str, n: float = 1) -> None:
        with self._lock:
            self.stats[key] += n

    def report(self) -> dict[str, Any]:
        """The counters, for ``traces/report.json``."""
        with self._lock:
            stats = dict(sorted(self.stats.items()))
            failures = dict(sorted(self.failures.items()))
        http_codes = {k[5:]: v for k, v in stats.items() if k.startswith("http_")}
        counters = {k: v for k, v in stats.items() if not k.startswith("http_")}
        for key in ("retry_after_s", "rate_limited_s"):
            if key in counters:
                counters[key] = round(float(counters[key]), 3)
        return {"endpoint": self.url, "model": self.model, "counters": counters, "http_status": http_codes,
                "failures": failures}

    def cancel(self) -> None:
        """Stop: wake every wait and shut down every in-flight connection; calls in progress and
        later calls raise :class:`TeacherCancelled`."""
        self._cancelled.set()
        with self._lock:
            sockets = list(self._inflight)
        for sock in sockets:
            _shutdown(sock)

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _check_cancelled(self) -> None:
        if self._cancelled.is_set():
            raise TeacherCancelled(f"{self.url}: cancelled")

    # ---------------------------------------------------------------- cache

    def request_key(self, payload: dict[str, Any]) -> str:
        """Cache key: the endpoint URL plus the whole request (model, messages, sampling, seed)."""
        blob = json.dumps({"v": CACHE_VERSION, "endpoint": self.url, "request": payload}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:40]

    def _read_cache(self, path: Path) -> dict[str, Any] | None:
        try:
            entry = json.loads(path.read_text())
            if entry.get("endpoint") != self.url or not isinstance(entry.get("content"), str):
                raise ValueError("not an entry of this endpoint")
            return entry
        except FileNotFoundError:
            return None
        except (OSError, ValueError, AttributeError):
            self._count("cache_corrupt")
            path.unlink(missing_ok=True)
            return None

    def purge_cache(self) -> int:
        """Delete cache entries this client would never trust: unreadable files and entries of
        an older format (keyed without the endpoint). The number deleted."""
        if self.cache_dir is None or not self.cache_dir.is_dir():
            return 0
        removed = 0
        for path in self.cache_dir.glob("*.json"):
            try:
                ok = json.loads(path.read_text()).get("v") == CACHE_VERSION
            except (OSError, ValueError, AttributeError):
                ok = False
            if not ok:
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            self._count("cache_purged", removed)
        return removed

    # ---------------------------------------------------------------- completions

    def complete(self, messages: list[dict[str, str]], *, temperature: float = 1.0, max_tokens: int = 512,
                 sample_index: int = 0, keep_reasoning: bool = True,
                 accept: Callable[[str], bool] | None = None) -> str:
        """The completion text of one chat request. ``sample_index`` makes repeated samples of the
        same prompt distinct requests (sent as ``seed``). A separate reasoning field is rebuilt as
        ``<think>...</think>`` before the content (dropped when ``keep_reasoning`` is False).
        The reply is cached only when ``accept(text)`` is true (or ``accept`` is None); a cached
        reply that ``accept`` now rejects is deleted and asked again."""
        self._check_cancelled()
        payload = {"model": self.model, "messages": messages, "temperature": temperature,
                   "max_tokens": max_tokens, "seed": sample_index}
        path = self.cache_dir / f"{self.request_key(payload)}.json" if self.cache_dir else None
        if path is not None:
            entry = self._read_cache(path)
            if entry is not None:
                text = completion_text(entry["content"], entry.get("reasoning"), keep_reasoning)
                if accept is None or accept(text):
                    self._count("cache_hits")
                    return text
                self._count("cache_dropped_invalid")
                path.unlink(missing_ok=True)
            self._count("cache_misses")
        content, reasoning = self._post_with_retries(payload)
        text = completion_text(content, reasoning, keep_reasoning)
        if accept is not None and not accept(text):
            self._count("not_cached_invalid")
        elif path is not None:
            atomic_write_json(path, {"v": CACHE_VERSION, "endpoint": self.url, "request": payload,
                                     "content": content, "reasoning": reasoning})
        return text

    def _scrub(self, text: str) -> str:
        """``text`` (a reply body quoted in an error) with the API key blanked: a proxy or a server
        that echoes the request's Authorization header must not put the key in a message or log."""
        return text.replace(self.api_key, "[redacted]") if self.api_key else text

    def _backoff(self, attempt: int) -> float:
        return self.backoff_s * 2 ** (attempt - 1)

    def _post_with_retries(self, payload: dict[str, Any]) -> tuple[str, str | None]:
        body = json.dumps(payload).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json", "Connection": "close"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        last_error = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._count("retries")
                self.sleep(self._backoff(attempt))
                self._check_cancelled()
            waited = self.limiter.wait()
            if waited:
                self._count("rate_limited_waits")
                self._count("rate_limited_s", waited)
            self._check_cancelled()
            self._count("requests")
            try:
                status, reply_headers, raw = self._post(body, headers)
            except _Deadline:
                self._check_cancelled()
                last_error = f"no complete reply within the {self.timeout_s:g}s request deadline"
                self._count("timeouts")
                continue
            except (OSError, http.client.HTTPException) as e:
                self._check_cancelled()
                last_error = f"connection error: {e}"
                self._count("connection_errors")
                continue
            if status != 200:
                last_error = f"HTTP {status}"
                self._count(f"http_{status}")
                retry_after = parse_retry_after(reply_headers.get("Retry-After"))
                if retry_after is not None:
                    retry_after = min(retry_after, self.max_retry_after_s)
                    self._count("retry_after_honoured")
                    self._count("retry_after_s", retry_after)
                    self.limiter.defer(retry_after)
                elif status == 429:
                    self.limiter.defer(self._backoff(attempt + 1))
                if status in self.RETRY_STATUS:
                    continue
                detail = self._scrub(raw[:300].decode("utf-8", "replace"))
                if status in self.FATAL_STATUS or not 400 <= status < 500:
                    raise TeacherEndpointError(f"{self.url} answered HTTP {status} (check teacher.endpoint, "
                                               f"teacher.model and the API key): {detail}")
                self._request_failed(f"http_{status}")
                raise TeacherRequestError(f"{self.url} rejected the request: HTTP {status}: {detail}",
                                          reason=f"http_{status}", status=status)
            try:
                content, reasoning, finish = parse_reply(raw)
            except ValueError as e:
                last_error = self._scrub(f"malformed response ({e}): {raw[:120]!r}")
                self._count("malformed")
                continue
            self._count("ok")
            if reasoning is not None:
                self._count("reasoning_field")
            if finish == "length":
                self._count("finish_length")
            return content, reasoning
        with self._lock:
            self.failures["gave_up"] += 1
        raise TeacherEndpointError(f"{self.url}: giving up after {self.max_retries + 1} tries; last error: {last_error}")

    def _request_failed(self, reason: str) -> None:
        with self._lock:
            self.failures[reason] += 1
            n_failed = sum(self.failures.values())
            never_ok = self.stats["ok"] == 0 and self.stats["cache_hits"] == 0
        if self.fail_fast_after and never_ok and n_failed >= self.fail_fast_after:
            raise TeacherEndpointError(f"{self.url}: the first {n_failed} requests were all rejected "
                                       f"({dict(self.failures)}) and none succeeded: the endpoint or "
                                       "teacher.model is misconfigured")

    # ---------------------------------------------------------------- one HTTP request

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, str]:
        parts = self._parts
        host, https = parts.hostname, parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        path = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and not urllib.request.proxy_bypass(host):
            p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
            if https:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    p.hostname, p.port or 8080, timeout=timeout, context=ssl.create_default_context())
                conn.set_tunnel(host, port)
                return conn, path
            return http.client.HTTPConnection(p.hostname, p.port or 8080, timeout=timeout), self.url
        if https:
            return http.client.HTTPSConnection(host, port, timeout=timeout,
                                               context=ssl.create_default_context()), path
        return http.client.HTTPConnection(host, port, timeout=timeout), path

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, Any, bytes]:
        """(status, headers, body) of one POST, all of it within ``timeout_s`` (a deadline for the
        whole request: a watchdog shuts the socket down when it passes)."""
        deadline = time.monotonic() + self.timeout_s
        expired = threading.Event()

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Deadline()
            return left

        conn, path = self._connection(self.timeout_s)
        sock = None
        timer = None
        try:
            try:
                conn.connect()
                sock = conn.sock
                with self._lock:
                    self._inflight.add(sock)
                if self._cancelled.is_set():
                    _shutdown(sock)
                timer = threading.Timer(remaining(), lambda: (expired.set(), _shutdown(sock)))
                timer.daemon = True
                timer.start()
                sock.settimeout(remaining())
                conn.request("POST", path, body=body, headers=headers)
                sock.settimeout(remaining())
                response = conn.getresponse()
                chunks, size = [], 0
                while True:
                    sock.settimeout(remaining())
                    chunk = response.read1(65536)
                    if not chunk:
                        break
                    size += len(chunk)
                    if size > MAX_RESPONSE_BYTES:
                        return 200, response.headers, b"response larger than 16 MiB"
                    chunks.append(chunk)
                if expired.is_set():  # the watchdog cut the body short
                    raise _Deadline()
                self._check_cancelled()
                return response.status, response.headers, b"".join(chunks)
            except (TimeoutError, socket.timeout) as e:
                raise _Deadline() from e
            except (OSError, http.client.HTTPException):
                if expired.is_set() or time.monotonic() >= deadline:
                    raise _Deadline() from None
                raise
        finally:
            if timer is not None:
                timer.cancel()
            if sock is not None:
                with self._lock:
                    self._inflight.discard(sock)
            conn.close()


def _shutdown(sock: socket.socket | None) -> None:
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def parse_reply(raw: bytes) -> tuple[str, str | None, str | None]:
    """(content, reasoning, finish_reason) of a chat-completion JSON body; ValueError when it is
    not one. ``reasoning`` comes from ``reasoning_content`` or ``reasoning`` (vLLM's reasoning
    parsers); a null content is allowed only next to a reasoning field (the budget ran out while
    thinking)."""
    try:
        choice = json.loads(raw)["choices"][0]
        message = choice["message"]
        content = message.get("content")
        reasoning = message.get("reasoning_content")
        if reasoning is None:
            reasoning = message.get("reasoning")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    if reasoning is not None and not isinstance(reasoning, str):
        raise ValueError("reasoning is not a string")
    if content is None and reasoning is not None:
        content = ""
    if not isinstance(content, str):
        raise ValueError("content is not a string")
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    return content, (reasoning if reasoning else None), finish if isinstance(finish, str) else None


def completion_text(content: str, reasoning: str | None, keep_reasoning: bool = True) -> str:
    """The completion in gr2's grammar: ``<think>reasoning</think>`` + content when the server
    returned the reasoning separately (unless the content already has its own think block);
    the content alone when ``keep_reasoning`` is False or there is no reasoning."""
    if not reasoning or not keep_reasoning or content.lstrip().startswith(THINK_OPEN):
        return content
    return f"{THINK_OPEN}{reasoning.strip()}{THINK_CLOSE}{content.strip()}"
