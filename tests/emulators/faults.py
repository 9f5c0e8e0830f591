"""Fault injection and request accounting shared by the provider emulators.

A *policy* is a callable ``policy(ctx) -> Fault | str | None`` that the emulator
asks once per request; ``None`` (or ``"ok"``) means answer normally. ``ctx`` is a
`RequestContext`: the global request number, the attempt number for the same
prompt (the first user message, so a re-ask after bad JSON counts as attempt 2),
the prompt, the parsed body and so on. Helpers below build common policies:

    sequence("429", "503", "ok")                     # by global request number
    by_attempt({"p1": ["429", "ok"], "p2": ["drop"]}) # per prompt, by attempt
    first_attempt("malformed")                        # every prompt's first try
    random_faults({"429": 0.1, "drop": 0.05}, seed=1)

Every request is recorded (`Recorder`): arrival and answer times
(`time.monotonic()`), the fault served and the status sent, so a test can count
requests (total, per fault, per prompt) and check requests per minute.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Union


@dataclass(frozen=True)
class Fault:
    """What to do with one request instead of (or on top of) a normal answer.

    kind:
      ok          normal answer
      status      an HTTP error `status` (429, 500, 503, 529, 401, 400 ...) with an
                  optional `retry_after` header value (seconds, or an HTTP date string)
      slow        answer normally after `delay` seconds (past the client's timeout)
      drop        close the socket without sending any response
      cut         send the status line, headers and half the body of a normal answer, then close
      malformed   200, but the reply text is not valid JSON
      truncated   200, but the reply text is cut in half (truncated JSON)
      empty       200, but no choices / content blocks / candidates
      at_limit    200, the reply cut where the request's token limit fell (finish_reason "length", usage = the
                  limit): JSON cut at the token limit because max_tokens is too small
      length      200, an empty answer cut at the token limit (finish_reason "length": a reasoning
                  model that spent the budget thinking)
      quota       429 "insufficient_quota": the account has no credit (no retry helps)
    """

    kind: str = "ok"
    status: Optional[int] = None
    retry_after: Optional[Union[float, str]] = None
    delay: float = 0.0

    @property
    def label(self) -> str:
        return str(self.status) if self.kind == "status" else self.kind

    # -- constructors ---------------------------------------------------
    @staticmethod
    def ok() -> "Fault":
        return Fault("ok")

    @staticmethod
    def error(status: int, retry_after: Optional[Union[float, str]] = None) -> "Fault":
        return Fault("status", status=status, retry_after=retry_after)

    @staticmethod
    def rate_limit(retry_after: Optional[Union[float, str]] = 1) -> "Fault":
        return Fault("status", status=429, retry_after=retry_after)

    @staticmethod
    def slow(delay: float = 5.0) -> "Fault":
        return Fault("slow", delay=delay)

    @staticmethod
    def drop() -> "Fault":
        return Fault("drop")

    @staticmethod
    def cut() -> "Fault":
        return Fault("cut")

    @staticmethod
    def malformed() -> "Fault":
        return Fault("malformed")

    @staticmethod
    def truncated() -> "Fault":
        return Fault("truncated")

    @staticmethod
    def at_limit() -> "Fault":
        return Fault("at_limit")

    @staticmethod
    def empty() -> "Fault":
        return Fault("empty")

    @staticmethod
    def length() -> "Fault":
        return Fault("length")

    @staticmethod
    def quota() -> "Fault":
        return Fault("quota")


_SHORTHANDS = {"ok", "slow", "drop", "cut", "malformed", "truncated", "at_limit", "empty", "length", "quota"}


def as_fault(value: Union[Fault, str, int, None]) -> Fault:
    """`Fault`, None, "ok", "429", 503, "slow", "drop", "malformed", "truncated", "empty", "length", "quota"."""
    if value is None:
        return Fault()
    if isinstance(value, Fault):
        return value
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        status = int(value)
        return Fault.error(status, retry_after=1 if status == 429 else None)
    if value in _SHORTHANDS:
        return getattr(Fault, value)()
    raise ValueError(f"unknown fault {value!r}")


@dataclass
class RequestContext:
    """One request as the emulator saw it (what policies and reply scripts get)."""

    provider: str
    index: int  # 0-based, over every request the emulator received
    attempt: int  # 1-based, over requests with the same `prompt`
    prompt: str  # the first user message (stable across re-asks)
    last_user: str  # the last user message (a re-ask's correction)
    system: str
    messages: list  # [{"role", "content"}] in OpenAI shape, system excluded
    model: str
    wants_json: bool  # the request asked for JSON (response_format / mime type / schema)
    schema: Optional[dict]
    body: dict
    path: str
    headers: dict
    arrived: float  # time.monotonic()


Policy = Callable[[RequestContext], Union[Fault, str, int, None]]
Reply = Callable[[RequestContext], str]


def sequence(*faults: Union[Fault, str, int, None]) -> Policy:
    """The n-th request received gets faults[n]; later ones are answered normally."""
    items = [as_fault(f) for f in faults]

    def policy(ctx: RequestContext) -> Fault:
        return items[ctx.index] if ctx.index < len(items) else Fault()

    return policy


def by_attempt(script: dict) -> Policy:
    """``{prompt: [fault for attempt 1, fault for attempt 2, ...]}``; unlisted: ok.

    A key matches when it equals the prompt or is a substring of it.
    """
    table = {k: [as_fault(f) for f in v] for k, v in script.items()}

    def policy(ctx: RequestContext) -> Fault:
        for key, faults in table.items():
            if key == ctx.prompt or key in ctx.prompt:
                return faults[ctx.attempt - 1] if ctx.attempt <= len(faults) else Fault()
        return Fault()

    return policy


def first_attempt(fault: Union[Fault, str, int]) -> Policy:
    """Every prompt's first request gets `fault`; its later requests are answered."""
    f = as_fault(fault)
    return lambda ctx: f if ctx.attempt == 1 else Fault()


def random_faults(rates: dict, seed: int = 0, max_attempt: Optional[int] = None) -> Policy:
    """Each request independently draws a fault with the given probabilities.

    `max_attempt`: from that attempt on a prompt is always answered (so a test with
    a retry budget above it can expect every item to end ok).
    """
    rng = random.Random(seed)
    lock = threading.Lock()
    choices = [(as_fault(k), float(p)) for k, p in rates.items()]

    def policy(ctx: RequestContext) -> Fault:
        if max_attempt is not None and ctx.attempt >= max_attempt:
            return Fault()
        with lock:
            x = rng.random()
        acc = 0.0
        for f, p in choices:
            acc += p
            if x < acc:
                return f
        return Fault()

    return policy


def combine(*policies: Policy) -> Policy:
    """The first policy that returns a fault other than ok wins."""

    def policy(ctx: RequestContext) -> Fault:
        for p in policies:
            f = as_fault(p(ctx))
            if f.kind != "ok":
                return f
        return Fault()

    return policy


@dataclass
class RequestRecord:
    index: int
    arrived: float  # time.monotonic() when the request body had been read
    prompt: str
    attempt: int
    fault: str  # Fault.label, or "limited" when the emulator's own rate limit refused it
    status: Optional[int] = None  # HTTP status sent (None: dropped / client gone)
    answered: Optional[float] = None  # time.monotonic() when the response was written
    wall: float = field(default_factory=time.time)
    batch_id: Optional[str] = None  # set for a request that came as one line of a provider batch
    client_gone: bool = False  # the client had hung up (killed) before the answer was ready: not delivered


class Recorder:
    """Thread-safe log of every request an emulator received."""

    def __init__(self):
        self._lock = threading.Lock()
        self.records: list[RequestRecord] = []
        self._attempts: Counter = Counter()
        self._next_index = 0

    def start(self, prompt: str) -> tuple[int, int]:
        """Index and attempt number for a request that just arrived."""
        with self._lock:
            self._attempts[prompt] += 1
            index = self._next_index
            self._next_index += 1
            return index, self._attempts[prompt]

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self.records.append(record)

    def reset(self) -> None:
        with self._lock:
            self.records = []
            self._attempts = Counter()
            self._next_index = 0

    # -- queries --------------------------------------------------------
    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return sorted(self.records, key=lambda r: r.arrived)

    @property
    def total(self) -> int:
        with self._lock:
            return len(self.records)

    @property
    def by_fault(self) -> Counter:
        with self._lock:
            return Counter(r.fault for r in self.records)

    def count(self, fault: Optional[str] = None) -> int:
        return self.total if fault is None else self.by_fault.get(fault, 0)

    def successes(self) -> list[RequestRecord]:
        """Requests answered 200 and delivered (what a provider bills and the client received)."""
        with self._lock:
            return [r for r in self.records if r.status == 200 and not r.client_gone]

    @property
    def undelivered(self) -> int:
        """Requests whose client hung up (was killed) before the answer could be sent."""
        with self._lock:
            return sum(r.client_gone for r in self.records)

    def times(self) -> list[float]:
        return [r.arrived for r in self.snapshot()]

    def for_prompt(self, prompt: str) -> list[RequestRecord]:
        return [r for r in self.snapshot() if r.prompt == prompt]

    def max_in_window(self, seconds: float = 1.0) -> int:
        """Most requests that arrived within any sliding window of `seconds`."""
        ts = self.times()
        best, j = 0, 0
        for i, t in enumerate(ts):
            while ts[j] <= t - seconds:
                j += 1
            best = max(best, i - j + 1)
        return best

    def rate_per_minute(self) -> float:
        """Arrivals per minute over the span from the first to the last arrival."""
        ts = self.times()
        if len(ts) < 2 or ts[-1] == ts[0]:
            return float("nan")
        return (len(ts) - 1) / (ts[-1] - ts[0]) * 60.0


class TokenBucket:
    """The emulator's own requests/min limit, enforced like a provider does.

    Capacity `rpm/60 * burst_s` requests, refilled continuously at rpm/60 per second
    (burst_s=1: the per-second quantisation providers document; 60: a per-minute budget).
    """

    def __init__(self, rpm: float, burst_s: float = 1.0):
        self.rate = rpm / 60.0
        self.capacity = max(self.rate * burst_s, 1.0)
        self.tokens = self.capacity
        self.last = time.monotonic()
        self._lock = threading.Lock()

    def state(self) -> tuple[float, float, float]:
        """(limit per minute, remaining now, seconds until full): what a provider's rate-limit headers say."""
        with self._lock:
            now = time.monotonic()
            tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            return self.rate * 60.0, tokens, (self.capacity - tokens) / self.rate

    def take(self) -> Optional[float]:
        """None when admitted, else seconds until a request would be."""
        with self._lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
            self.last = now
            if self.tokens >= 1.0:
                self.tokens -= 1.0
                return None
            return (1.0 - self.tokens) / self.rate


__all__ = [
    "Fault", "as_fault", "RequestContext", "Policy", "Reply", "sequence", "by_attempt", "first_attempt",
    "random_faults", "combine", "RequestRecord", "Recorder", "TokenBucket",
]
