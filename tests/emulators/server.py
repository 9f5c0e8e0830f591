"""The HTTP server the three provider emulators share.

A `ProviderEmulator` is a threaded `http.server` on 127.0.0.1 (a free port), one
thread per connection, HTTP/1.1 keep-alive. A provider subclass says which path
it serves, how to read the request (key, messages, JSON schema) and how its
answers and errors look. The base class does the rest: authentication against
the expected key, the optional provider-side rate limit, latency, fault
injection (see `faults.py`) and the request log (`emu.stats`).

Provider batch APIs (OpenAI Files + Batch, Anthropic Message Batches) are routes of
the subclasses (`route`); each line of a batch goes through the same validation, fault
policy and reply script as a live request and is logged in `emu.stats` with its
`batch_id`; the control calls (upload, create, poll, download) are counted in
`emu.control` and can be faulted with `control_policy`. A request whose client hung up
(was killed) before the answer was ready is logged `client_gone` and not delivered;
`emu.stats.successes()` are the answers delivered.

    with OpenAIEmulator(reply=lambda ctx: '{"score": 3}', policy=first_attempt("429")) as emu:
        ... base_url=emu.url ...
        assert emu.stats.count("429") == n
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import math
import random
import select
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Optional, Union

from .faults import Fault, Policy, Recorder, Reply, RequestContext, RequestRecord, TokenBucket, as_fault


def default_reply(ctx: RequestContext) -> str:
    if ctx.wants_json:
        return json.dumps({"answer": f"echo: {ctx.prompt[:60]}"})
    return f"echo: {ctx.prompt[:200]}"


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: about four characters a token, at least one."""
    return max(1, len(text) // 4)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024  # a burst of new connections must not overflow the listen backlog
    emulator: "ProviderEmulator"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out at once (no 40 ms delayed-ACK stall)
    server: _Server

    def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
        return

    def do_POST(self):  # noqa: N802
        try:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            self.server.emulator._handle(self, raw)
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True

    def do_GET(self):  # noqa: N802
        try:
            self.server.emulator._handle(self, b"")
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout):
            self.close_connection = True


class ProviderEmulator:
    provider = "base"
    #: what the SDK's base_url should end with (the emulator's `url` includes it)
    url_suffix = ""

    def __init__(
        self,
        reply: Optional[Reply] = None,
        policy: Optional[Policy] = None,
        api_key: Optional[str] = None,
        latency: Union[float, tuple] = 0.0,
        enforce_rpm: Optional[float] = None,
        burst_s: float = 1.0,
        echo_key_in_errors: bool = True,
        seed: int = 0,
        batch_polls: int = 0,
        control_policy: Optional[Callable[[str, int], Union[Fault, str, int, None]]] = None,
    ):
        """
        reply: ctx -> the reply text (default: an echo, JSON when JSON was asked for)
        policy: ctx -> Fault | "429" | ... | None (see faults.py); None: always answer
        api_key: the key a request must carry (None: any key, or none, is accepted)
        latency: seconds before every answer, a number or (low, high) for uniform random
        enforce_rpm: refuse requests over this many per minute with 429 + Retry-After,
            as a provider does (token bucket of `burst_s` seconds' worth)
        echo_key_in_errors: a 401 repeats the key received (worst case for leaks)
        batch_polls: a provider batch (where the provider has batch endpoints) reports
            "in progress" to this many status polls, then ended (0: ended when created)
        control_policy: (operation, n) -> a fault for the n-th (1-based) call of a batch
            control operation ("files.create", "batches.create", "batches.retrieve",
            "files.content", "batches.results"); only status faults apply
        """
        self.reply = reply or default_reply
        self.policy = policy
        self.api_key = api_key
        self.latency = latency
        self.bucket = TokenBucket(enforce_rpm, burst_s) if enforce_rpm else None
        self.echo_key_in_errors = echo_key_in_errors
        self.stats = Recorder()
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None
        self._ids = 0
        # provider batch APIs (see the subclasses' `route`)
        self.batch_polls = batch_polls
        self.control_policy = control_policy
        self.control: Counter = Counter()  # batch control calls by operation, auth failures included
        self.batches: dict = {}
        self._batch_lock = threading.RLock()  # held while a batch runs, so it runs once

    # -- lifecycle --------------------------------------------------------
    def start(self) -> "ProviderEmulator":
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.emulator = self
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name=f"{self.provider}-emulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> "ProviderEmulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "emulator not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The base_url to give the provider's SDK."""
        return f"http://127.0.0.1:{self.port}{self.url_suffix}"

    # -- provider hooks -----------------------------------------------------
    def matches(self, path: str) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def received_key(self, headers) -> Optional[str]:  # pragma: no cover - abstract
        raise NotImplementedError

    def parse(self, path: str, body: dict) -> dict:  # pragma: no cover - abstract
        """-> {"model", "system", "messages" [{"role","content"}], "wants_json", "schema"}"""
        raise NotImplementedError

    def validate(self, body: dict):
        """A reason to answer 400 (the request is not what the real API accepts), or None; or
        (status, payload) for a refusal with another status or body."""
        return None

    def route(self, handler: "_Handler", method: str, path: str, raw: bytes) -> bool:
        """Serve an endpoint other than the completion one (batch APIs); True when answered."""
        return False

    def ok_body(self, ctx: RequestContext, text: str, input_tokens: int, output_tokens: int) -> dict:
        raise NotImplementedError  # pragma: no cover

    def empty_body(self, ctx: RequestContext, input_tokens: int) -> dict:
        raise NotImplementedError  # pragma: no cover

    def error_body(self, status: int, message: str, retry_after: Optional[float] = None) -> dict:
        raise NotImplementedError  # pragma: no cover

    def error_headers(self, status: int, retry_after) -> dict:
        return {"Retry-After": str(retry_after)} if retry_after is not None else {}

    def length_body(self, ctx: RequestContext, input_tokens: int) -> dict:
        return self.empty_body(ctx, input_tokens)

    def at_limit_body(self, ctx: RequestContext, text: str, input_tokens: int, limit: int) -> dict:
        return self.ok_body(ctx, text, input_tokens, limit)

    def quota_body(self) -> dict:
        return self.error_body(429, "You exceeded your current quota, please check your plan and billing details.")

    def limit_headers(self) -> dict:
        """Rate-limit headers on a successful answer (the provider's names), when it sends them."""
        return {}

    # -- helpers ------------------------------------------------------------
    def next_id(self) -> int:
        with self._rng_lock:
            self._ids += 1
            return self._ids

    def _latency(self) -> float:
        if isinstance(self.latency, (tuple, list)):
            with self._rng_lock:
                return self._rng.uniform(*self.latency)
        return float(self.latency or 0.0)

    def _send(self, handler: _Handler, status: int, payload, headers: Optional[dict] = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data)
        handler.wfile.flush()

    def _send_cut(self, handler: _Handler, status: int, payload, headers: Optional[dict] = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(data[: len(data) // 2])
        handler.wfile.flush()
        self._drop(handler)

    @staticmethod
    def _drop(handler: _Handler) -> None:
        handler.close_connection = True
        try:
            handler.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    @staticmethod
    def _client_gone(handler: _Handler) -> bool:
        """The client closed its end (it was killed, or gave up) while we prepared the answer."""
        try:
            readable, _, _ = select.select([handler.connection], [], [], 0)
            if not readable:
                return False
            return handler.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    # -- one request --------------------------------------------------------
    def _handle(self, handler: _Handler, raw: bytes) -> None:
        path = handler.path.split("?", 1)[0]
        if self.route(handler, handler.command, path, raw):
            return
        if handler.command != "POST" or not self.matches(path):
            self._send(handler, 404, self.error_body(404, f"no route for {handler.command} {path}"))
            return
        body = self._json_body(handler, raw)
        if body is None:
            return
        record, outcome = self._process(path, body, dict(handler.headers.items()), self.received_key(handler.headers))
        if outcome is None:  # fault "drop"
            self._drop(handler)
            record.answered = time.monotonic()
            return
        if self._client_gone(handler):
            record.client_gone = True
            handler.close_connection = True
            return
        status, payload, headers = outcome
        if record.fault == "cut":  # the connection dies mid-response: headers promise a body that never completes
            self._send_cut(handler, status, payload, headers)
            record.status = 0
            record.answered = time.monotonic()
            return
        self._send(handler, status, payload, headers)  # raises when the client has gone
        record.status = status
        record.answered = time.monotonic()

    def _process(self, path: str, body, headers: dict, key: Optional[str], batch_id: Optional[str] = None):
        """One completion request -> (record, (status, payload, headers)) or (record, None) to drop.

        `batch_id`: the request is one line of a provider batch: no authentication (the batch
        call had it), no provider rate limit and no latency (the batch has its own clock); the
        caller sets `record.status` and `record.answered`.
        """
        arrived = time.monotonic()
        try:
            problem = self.validate(body) if isinstance(body, dict) else "request body must be a JSON object"
            parsed = self.parse(path, body) if not problem else None
        except Exception as exc:  # noqa: BLE001 - a request the real API would refuse
            problem, parsed = f"invalid request: {type(exc).__name__}: {exc}", None
        if parsed is None:
            parsed = {"model": "", "system": "", "messages": [], "wants_json": False, "schema": None}
        users = [m["content"] for m in parsed["messages"] if m["role"] == "user"]
        prompt = users[0] if users else ""
        index, attempt = self.stats.start(prompt)
        ctx = RequestContext(
            provider=self.provider, index=index, attempt=attempt, prompt=prompt,
            last_user=users[-1] if users else "", system=parsed["system"], messages=parsed["messages"],
            model=parsed["model"], wants_json=parsed["wants_json"], schema=parsed["schema"],
            body=body if isinstance(body, dict) else {}, path=path, headers=headers, arrived=arrived,
        )
        record = RequestRecord(index=index, arrived=arrived, prompt=prompt, attempt=attempt, fault="ok", batch_id=batch_id)
        self.stats.add(record)

        if batch_id is None and self.api_key is not None and key != self.api_key:
            record.fault = "unauthorized"
            shown = key if self.echo_key_in_errors else "***"
            return record, (401, self.error_body(401, f"Incorrect API key provided: {shown}"), {})
        if problem:
            record.fault = "invalid"
            if isinstance(problem, tuple):  # (status, payload): a refusal with the provider's own status and body
                return record, (problem[0], problem[1], {})
            return record, (400, self.error_body(400, problem), {})
        if self.bucket is not None and batch_id is None:
            wait = self.bucket.take()
            if wait is not None:
                record.fault = "limited"
                seconds = max(1, math.ceil(wait))
                return record, (429, self.error_body(429, "Rate limit reached for requests", seconds),
                                self.error_headers(429, seconds))

        fault = as_fault(self.policy(ctx)) if self.policy else Fault()
        record.fault = fault.label
        delay = self._latency() + (fault.delay if fault.kind == "slow" else 0.0)
        if delay and batch_id is None:
            time.sleep(delay)

        if fault.kind == "drop":
            return record, None
        if fault.kind == "status":
            return record, (fault.status, self.error_body(fault.status, _status_message(fault.status), fault.retry_after),
                            self.error_headers(fault.status, fault.retry_after))
        in_tokens = count_tokens(parsed["system"] + "".join(m["content"] for m in parsed["messages"]))
        if fault.kind == "empty":
            return record, (200, self.empty_body(ctx, in_tokens), {})
        if fault.kind == "length":
            return record, (200, self.length_body(ctx, in_tokens), self.limit_headers())
        if fault.kind == "quota":
            return record, (429, self.quota_body(), {})
        text = self.reply(ctx)
        if fault.kind == "malformed":
            text = "Sure! Here is the JSON you asked for: {'answer': oops, trailing,}"
        elif fault.kind == "truncated":
            text = text[: max(1, len(text) // 2)]
        elif fault.kind == "at_limit":
            limit = int(ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens") or 16)
            return record, (200, self.at_limit_body(ctx, text[: max(1, len(text) // 2)], in_tokens, limit), self.limit_headers())
        return record, (200, self.ok_body(ctx, text, in_tokens, count_tokens(text)), self.limit_headers())

    # -- batch control calls ------------------------------------------------------
    def _control(self, handler: _Handler, op: str) -> bool:
        """Count a batch control call, check its key, apply `control_policy`; True when it was
        answered with an error (the caller stops there)."""
        with self._batch_lock:
            self.control[op] += 1
            n = self.control[op]
        key = self.received_key(handler.headers)
        if self.api_key is not None and key != self.api_key:
            shown = key if self.echo_key_in_errors else "***"
            self._send(handler, 401, self.error_body(401, f"Incorrect API key provided: {shown}"))
            return True
        fault = as_fault(self.control_policy(op, n)) if self.control_policy else Fault()
        if fault.kind == "status":
            self._send(handler, fault.status, self.error_body(fault.status, _status_message(fault.status), fault.retry_after),
                       self.error_headers(fault.status, fault.retry_after))
            return True
        if fault.kind == "drop":
            self._drop(handler)
            return True
        return False

    def batch_line(self, path: str, body, batch_id: str) -> tuple[int, dict, Optional[RequestRecord]]:
        """Answer one request of a batch as the provider would: (status, payload, record);
        status 0 for a request the provider could not run (fault "drop": expired)."""
        record, outcome = self._process(path, body, {}, None, batch_id=batch_id)
        record.answered = time.monotonic()
        if outcome is None:
            return 0, {}, record
        status, payload, _ = outcome
        record.status = status
        return status, payload, record

    def _json_body(self, handler: _Handler, raw: bytes):
        """The request body as JSON, or None after answering 400."""
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError:
            self._send(handler, 400, self.error_body(400, "request body is not JSON"))
            return None

    def _retrieve_batch(self, handler: _Handler, batch_id: str, status_key: str, not_found: str) -> None:
        """GET a batch: one status poll; a batch polled often enough runs (once) and reports its results."""
        if self._control(handler, "batches.retrieve"):
            return
        state = self.batches.get(batch_id)
        if state is None:
            self._send(handler, 404, self.error_body(404, not_found))
            return
        with self._batch_lock:
            if state["object"][status_key] == "in_progress" and self._poll_ready(state):
                self._run_batch(state)
            batch = json.loads(json.dumps(state["object"]))
        self._send(handler, 200, batch)

    def _poll_ready(self, batch: dict) -> bool:
        """One status poll of a batch: True once it has been polled `batch_polls` times."""
        with self._batch_lock:
            batch["polls"] += 1
            return batch["polls"] >= self.batch_polls


def parse_multipart(content_type: str, raw: bytes) -> dict:
    """multipart/form-data -> {name: (filename or None, bytes)}."""
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + raw)
    out = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        out[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return out


def _status_message(status: int) -> str:
    return {
        429: "Rate limit reached. Please try again later.",
        500: "The server had an error while processing your request.",
        502: "Bad gateway.",
        503: "The service is temporarily unavailable.",
        529: "Overloaded.",
        400: "Invalid request.",
        401: "Invalid authentication.",
        403: "Permission denied.",
        404: "The model does not exist.",
    }.get(status, f"HTTP {status}")


def text_of(content) -> str:
    """A message's text, whether a string or a list of typed blocks/parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return content.get("text", "") or ""
    return "".join(text_of(part) for part in content)
