"""One call path for every service-LLM request.

`ServiceLLM.run(requests)` gives, for any backend: bounded concurrency, a pacer for
requests/min that follows the provider's `x-ratelimit-*` / `anthropic-ratelimit-*` headers
(down to what it says, up to the configured ceiling) and a tokens/min limiter (aiolimiter),
retries with exponential backoff and jitter that honour `Retry-After` for transient errors
only (tenacity), the strongest JSON mode the server takes, JSON extraction and schema
validation with bounded re-asks, a persistent SQLite response cache and per-stage accounting
of calls, tokens and cost.

A circuit breaker guards the spend: permanent errors (bad key, unknown model, invalid
request, no quota) are never retried; after `BREAKER_IN_A_ROW` failed requests in a row, or
a failure share of `BREAKER_SHARE` over the last `BREAKER_WINDOW`, or when the next request
could pass a spend cap, nothing more is sent and `run` raises `ServiceStopped` with the
provider's own message. The caps, each checked before every request against the spend so far
plus the worst case of the requests in flight: `service.max_cost_usd`, this service's calls in
one stage; `run_max_cost_usd` (the params' `cycle.max_cost_usd`), the whole run, counting what
earlier stages, cycles and runs paid (the response cache's spend ledger).

Unusable answers have a breaker of their own: a call whose answer is still invalid after its re-asks (JSON cut
at the token limit, prose, a refusal, an empty list) cost up to `max_reasks + 1` paid requests though every
one came back HTTP 200. After `UNUSABLE_IN_A_ROW` such calls in a row, or a share of `UNUSABLE_SHARE` over the
last `UNUSABLE_WINDOW` (at least `UNUSABLE_MIN`), nothing more is sent (until one answer is usable, calls
go one at a time between the first answer and the first usable one, so a provider that only returns unusable
answers costs a few dozen requests), and the message says what the provider
returned and which setting to change (`unusable_kind`).

Until the first answer arrives requests go one at a time, so a bad key or model costs
`BREAKER_IN_A_ROW` requests, not `max_concurrency`. Otherwise every request ends `ok` or
failed with a reason, and answers already received stay in the cache.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from llamaduo_nb.core.progress import tqdm

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import Backend, ChatRequest, ChatResult, Completion, PermanentError, TransientError
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.common import (Accounting, ServiceStopped, describe_error, reask_request, unusable_kind,
                                    validate_output)

BREAKER_IN_A_ROW = 3  # failed requests in a row (after their retries) that stop the call path
BREAKER_WINDOW = 20  # ... or this share of failures among the last WINDOW requests (at least MIN of them)
BREAKER_MIN = 10
BREAKER_SHARE = 0.5
UNUSABLE_IN_A_ROW = 5  # calls in a row whose answers stayed unusable after their re-asks
UNUSABLE_WINDOW = 40  # ... or this share of unusable answers among the last WINDOW calls (at least MIN of them):
UNUSABLE_MIN = 20  # a provider that is mostly unusable costs tens of calls, one that is sometimes unusable is
UNUSABLE_SHARE = 0.8  # not stopped (the local stand-in's answers are invalid about one time in five)
PACER_TOLERANCE_S = 0.5  # a request sent late keeps its slot up to this long (and a quarter interval at most)


_LOCAL_BACKENDS: dict = {}  # one in-process model per process: the judge and pairwise share its loaded weights and memo


def make_backend(cfg) -> Backend:
    # Each backend is imported when chosen: each pulls in its provider's SDK (or torch), optional and heavy.
    if cfg.backend == "local":
        from llamaduo_nb.llm.local import LocalBackend

        if cfg.model not in _LOCAL_BACKENDS:
            _LOCAL_BACKENDS[cfg.model] = LocalBackend(cfg)
        return _LOCAL_BACKENDS[cfg.model]
    if cfg.backend == "openai":
        from llamaduo_nb.llm.openai_backend import OpenAIBackend

        return OpenAIBackend(cfg)
    if cfg.backend == "anthropic":
        from llamaduo_nb.llm.anthropic_backend import AnthropicBackend

        return AnthropicBackend(cfg)
    if cfg.backend == "gemini":
        from llamaduo_nb.llm.gemini_backend import GeminiBackend

        return GeminiBackend(cfg)
    raise UserError(f"service.backend: unknown backend '{cfg.backend}'")


class _Failed(Exception):
    pass


class _NotSent(Exception):
    """The call path has stopped (breaker or cost cap): the request was not sent."""


class Pacer:
    """At most `rate` requests a minute, on a schedule (GCRA): a caller up to a quarter interval late (at
    most `PACER_TOLERANCE_S`) takes its slot without shifting the later ones, so the event loop's late
    wake-ups lose no allowance, while no burst forms. `pause`
    holds every request until a time the provider named (remaining 0 until the reset)."""

    def __init__(self, per_minute: Optional[float]):
        self.ceiling = per_minute  # the configured limit: never exceeded, whatever the provider allows
        self.rate = per_minute
        self.provider_rate: Optional[float] = None
        self.next_at = 0.0
        self.paused_until = 0.0

    def adapt(self, provider_per_minute: Optional[float], short_term: Optional[float] = None) -> None:
        """Follow the provider: its per-minute limit, and while little remains, remaining/reset."""
        if provider_per_minute:
            self.provider_rate = provider_per_minute
        rates = [r for r in (self.ceiling, self.provider_rate, short_term) if r]
        self.rate = min(rates) if rates else None

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    async def wait(self) -> None:
        while True:
            now = time.monotonic()
            if self.paused_until > now:
                await asyncio.sleep(self.paused_until - now)
                continue
            if not self.rate:
                return
            interval = 60.0 / self.rate
            slot = max(self.next_at, now - min(PACER_TOLERANCE_S, interval / 4))
            if slot <= now:
                self.next_at = slot + interval
                return
            await asyncio.sleep(slot - now)


def _wait_honouring_retry_after(retry_state) -> float:
    exc = retry_state.outcome.exception() if retry_state.outcome else None
    backoff = wait_exponential_jitter(initial=0.5, max=60, jitter=1.0)(retry_state)
    if isinstance(exc, TransientError) and exc.retry_after is not None:
        return max(float(exc.retry_after), 0.0) + 0.05 * backoff
    return backoff


class _Batcher:
    """Groups concurrent requests for in-process backends that generate in batches."""

    def __init__(self, backend: Backend, batch_size: int):
        self.backend = backend
        self.batch_size = batch_size
        self.queue: asyncio.Queue = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._work())

    async def submit(self, request: ChatRequest) -> Completion:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((request, future))
        return await future

    async def _work(self):
        while True:
            items = [await self.queue.get()]
            await asyncio.sleep(0)  # let every ready coroutine enqueue first
            while len(items) < self.batch_size and not self.queue.empty():
                items.append(self.queue.get_nowait())
            try:
                outs = await asyncio.to_thread(self.backend.complete_batch, [r for r, _ in items])
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, fut in items:
                    if not fut.done():
                        fut.set_exception(exc)
            else:
                for (_, fut), out in zip(items, outs):
                    if not fut.done():
                        fut.set_result(out)

    def close(self):
        self.task.cancel()


@dataclass
class StageLedger:
    """What one service has paid, and has in flight, in one execution of a stage: shared by every client the
    stage builds for it (a judge scores answers, people's labels and pairs), so `max_cost_usd` caps the stage."""

    cost_usd: float = 0.0
    in_flight: float = 0.0


class ServiceLLM:
    """A service LLM (or the local stand-in) behind the one call path."""

    def __init__(self, cfg, cache: ResponseCache, backend: Optional[Backend] = None, sleep=asyncio.sleep,
                 run_max_cost_usd: Optional[float] = None, ledger: Optional[StageLedger] = None):
        self.cfg = cfg
        self.cache = cache
        self.run_max_cost_usd = run_max_cost_usd
        self.ledger = ledger or StageLedger()
        self.backend = backend
        self.accounting = Accounting()
        self._sleep = sleep
        # the breaker and what was learned about the server outlive one run() (synthesis calls run per round)
        self.stopped: Optional[str] = None
        self._in_a_row = 0
        self._answered = 0  # requests the API answered (after their retries)
        self._window: deque = deque(maxlen=BREAKER_WINDOW)
        self._unusable_in_a_row = 0
        self._unusable_window: deque = deque(maxlen=UNUSABLE_WINDOW)
        self._usable_seen = False  # an answer (to a request with a schema) was usable: calls go out concurrently
        self.token_field = "max_new_tokens"  # the setting that bounds an answer's tokens, named in the breaker's message
        self._proven = False  # an answer has come back: the key, model and request shape work
        self._pacer = Pacer(cfg.requests_per_minute)
        self._json_mode_checked = False
        self.last_limits: Optional[dict] = None  # the provider's rate-limit headers, as last seen

    @property
    def _inflight_cost(self) -> float:
        return self.ledger.in_flight

    @_inflight_cost.setter
    def _inflight_cost(self, value: float) -> None:
        self.ledger.in_flight = value

    # -- public -----------------------------------------------------------
    def run(self, requests: list[ChatRequest], desc: str = "requests", progress: bool = True,
            token_field: Optional[str] = None) -> list[ChatResult]:
        """Answer every request; blocks. Safe inside Jupyter (runs its own loop in a thread). `token_field`: the
        params field the requests' `max_tokens` comes from (e.g. `synthesize.max_new_tokens`), named when answers
        are cut at the token limit.

        Raises `ServiceStopped` (a UserError) when the call path stopped (see the module docstring)."""
        if not requests:
            return []
        if token_field:
            self.token_field = token_field
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.arun(requests, desc, progress))
        box: dict = {}

        def target():
            try:
                box["out"] = asyncio.run(self.arun(requests, desc, progress))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                box["err"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "err" in box:
            raise box["err"]
        return box["out"]

    async def arun(self, requests: list[ChatRequest], desc: str = "requests", progress: bool = True) -> list[ChatResult]:
        if self.stopped:
            raise ServiceStopped(self.stopped)
        if self.backend is None:
            self.backend = make_backend(self.cfg)
        cfg = self.cfg
        self._load_json_mode()
        if getattr(cfg, "batch_api", False):  # the provider's batch API instead of live calls (llm/batch.py)
            from llamaduo_nb.llm.batch import run_batch_api  # the providers' batch SDK calls, only when asked for

            results = await run_batch_api(self, requests, desc, progress)
            if self.stopped:
                raise ServiceStopped(self.stopped)
            return results
        self._sem = asyncio.Semaphore(cfg.max_concurrency if not self.backend.supports_batch else 10**6)
        self._probe = asyncio.Lock()
        self._first_calls = asyncio.Lock()
        if cfg.tokens_per_minute:
            self._tpm_capacity = max(cfg.tokens_per_minute / 6.0, 1.0)
            self._tpm = AsyncLimiter(self._tpm_capacity, 10.0)
        else:
            self._tpm = None
        self._batcher = _Batcher(self.backend, cfg.batch_size) if self.backend.supports_batch else None
        bar = tqdm(total=len(requests), desc=f"{desc} [{cfg.label}]", disable=not progress, leave=True)

        async def one(req):
            res = await self._one(req)
            bar.update(1)
            return res

        try:
            results = await asyncio.gather(*(one(r) for r in requests))
        finally:
            bar.close()
            if self._batcher:
                self._batcher.close()
            await self.backend.aclose()
        if self.stopped:
            raise ServiceStopped(self.stopped)
        return list(results)

    # -- internals --------------------------------------------------------
    async def _one(self, request: ChatRequest) -> ChatResult:
        if self._probing(request):
            # after the first answer, one call (with its re-asks) at a time until one is usable: a provider that
            # only returns unusable answers is stopped after UNUSABLE_IN_A_ROW calls, not a whole round in flight
            async with self._first_calls:
                if self._probing(request):
                    return await self._one_call(request)
        return await self._one_call(request)

    def _probing(self, request: ChatRequest) -> bool:
        # HTTP failures are probed per attempt (`_attempt`): a storm of 429s then 5xx must not fail whole calls
        return request.json_schema is not None and self._proven and not self._usable_seen

    async def _one_call(self, request: ChatRequest) -> ChatResult:
        acc = self.accounting
        acc.requests += 1
        result = ChatResult(ok=False, cached=True)
        current = request
        problem = ""
        for ask in range(self.cfg.max_reasks + 1):
            try:
                completion = await self._call(current, result)
            except _Failed as exc:
                return self._fail(result, str(exc))
            except _NotSent:
                acc.not_sent += 1
                return self._fail(result, f"not sent: {self.stopped}")
            try:
                parsed = validate_output(completion.text, current.json_schema)
            except ValueError as exc:
                problem = str(exc)
                if ask < self.cfg.max_reasks:
                    result.reasks += 1
                    acc.reasks += 1
                    current = reask_request(current, completion.text, problem)
                continue
            result.ok, result.text, result.parsed = True, completion.text, parsed
            result.finish_reason = completion.finish_reason
            if request.json_schema is not None:
                self._usable(True)
            return result
        self._usable(False, unusable_kind(completion, problem, current.max_tokens, self.token_field))
        return self._fail(result, f"invalid output after {self.cfg.max_reasks + 1} tries: {problem}")

    def _fail(self, result: ChatResult, reason: str) -> ChatResult:
        result.ok = False
        result.error = reason
        self.accounting.failures += 1
        kind = reason.split(":")[0][:80]
        self.accounting.failure_reasons[kind] = self.accounting.failure_reasons.get(kind, 0) + 1
        return result

    async def _call(self, request: ChatRequest, result: ChatResult) -> Completion:
        """One completion: from the cache, else from the backend with retries."""
        cfg = self.cfg
        key = request.key(cfg.backend, cfg.model, cfg.base_url)
        hit = self.cache.get(key)
        if hit is not None:
            self.accounting.cache_hits += 1
            result.input_tokens += hit.input_tokens
            result.output_tokens += hit.output_tokens
            return hit
        if self.stopped:
            raise _NotSent()
        result.cached = False
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(cfg.max_retries + 1),
                wait=_wait_honouring_retry_after,
                retry=retry_if_exception_type(TransientError),
                sleep=self._sleep,
                reraise=False,
            ):
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        self.accounting.retries += 1
                        result.retries += 1
                    result.api_calls += 1
                    completion = await self._attempt(request)
        except RetryError as exc:
            last = exc.last_attempt.exception()
            self._outcome(False, f"{describe_error(last)} (after {cfg.max_retries + 1} tries)")
            raise _Failed(f"gave up after {cfg.max_retries + 1} tries: {describe_error(last)}") from None
        except PermanentError as exc:
            # a refusal of one prompt's content says nothing about the service; an HTTP error does
            if exc.status is not None or exc.code is not None:
                self._outcome(False, f"{exc.status} {exc.provider_message}" if exc.status else exc.provider_message)
            else:  # an answer came back, but one that cannot be used (a refusal, an empty answer cut at the limit)
                self._usable(False, describe_error(exc))
            raise _Failed(f"refused: {describe_error(exc)}") from None
        self._outcome(True)
        cost = self._cost(completion.input_tokens, completion.output_tokens)
        try:
            self.cache.put(key, cfg.backend, cfg.model, completion, cost_usd=cost)
        except Exception as exc:  # a full disk or a read-only cache: any further answer would be paid and lost
            self.stopped = self.stopped or f"the run's response cache could not be written ({exc})"
            raise
        acc = self.accounting
        acc.input_tokens += completion.input_tokens
        acc.output_tokens += completion.output_tokens
        acc.cost_usd += cost
        self.ledger.cost_usd += cost
        result.input_tokens += completion.input_tokens
        result.output_tokens += completion.output_tokens
        return completion

    def _cost(self, input_tokens: float, output_tokens: float) -> float:
        return (input_tokens * self.cfg.price_input_per_mtok + output_tokens * self.cfg.price_output_per_mtok) / 1e6

    # -- the circuit breaker -------------------------------------------------
    def _outcome(self, ok: bool, message: str = "") -> None:
        """Record how one request ended at the API (after its retries); trip the breaker if due."""
        self._window.append(ok)
        if ok:
            self._in_a_row = 0
            self._answered += 1
            return
        self._in_a_row += 1
        failed = self._window.count(False)
        if self._in_a_row >= BREAKER_IN_A_ROW:
            self._trip(f"{self._in_a_row} requests in a row failed", message)
        elif len(self._window) >= BREAKER_MIN and failed / len(self._window) >= BREAKER_SHARE:
            self._trip(f"{failed} of the last {len(self._window)} requests failed", message)

    def _usable(self, ok: bool, kind: str = "") -> None:
        """Record whether one call's answer was usable (after its re-asks); stop the call path when the answers
        are unusable too often: each such call was paid up to max_reasks + 1 times."""
        self._unusable_window.append(ok)
        if ok:
            self._unusable_in_a_row = 0
            self._usable_seen = True
            return
        self._unusable_in_a_row += 1
        bad = self._unusable_window.count(False)
        # "in a row" only while calls go one at a time: in flight, calls that are re-asked finish last and bunch up
        if self._unusable_in_a_row >= UNUSABLE_IN_A_ROW and not self._usable_seen:
            self._trip(f"{self._unusable_in_a_row} answers in a row were unusable", kind)
        elif len(self._unusable_window) >= UNUSABLE_MIN and bad / len(self._unusable_window) >= UNUSABLE_SHARE:
            self._trip(f"{bad} of the last {len(self._unusable_window)} answers were unusable", kind)

    def _trip(self, why: str, message: str) -> None:
        if self.stopped:
            return
        url = getattr(self.cfg, "base_url", None)
        if url and message.startswith("connection error"):  # a server the user started: say that it is gone, and the likely why
            answered = self._answered
            why = (f"the server at {url} stopped answering after {answered} answered request{'s' if answered != 1 else ''}"
                   if self._proven else f"no server answers at {url}")
            message += (" — if it is llama.cpp on an Intel CPU with AMX (Sapphire Rapids and later), start it with "
                        "`llama-server --no-repack` or `llamaduo serve`: the repacked weights crash it on its first request")
        sent = self.accounting.api_calls
        self.stopped = (
            f"service '{self.cfg.label}' stopped: {why}: {' '.join(message.split())[:300]} "
            f"({sent} request{'s' if sent != 1 else ''} sent; answers already received are kept in the run's "
            f"response cache, so a re-run resumes)"
        )

    async def _check_open(self, request: ChatRequest) -> float:
        """Raise _NotSent when the call path has stopped or this request could pass the cost cap;
        else the request's worst-case cost, counted as in flight until it returns. While it could pass a cap
        only with the worst case of the requests in flight, it waits for them (they usually cost less than
        their bound): the cap stops the stage near the cap, not a concurrency's worth of bounds before it."""
        while True:
            if self.stopped:
                raise _NotSent()
            estimate = self._cost(request.max_input_tokens(), request.max_tokens)
            problem = self.over_cap(estimate)
            if not problem:
                return estimate
            if self._inflight_cost > 1e-12:
                await asyncio.sleep(0.02)  # a real pause (not self._sleep, which tests replace): the answers in flight arrive
                continue
            self.stopped = f"service '{self.cfg.label}' stopped: {problem}"
            raise _NotSent()

    def over_cap(self, estimate: float) -> Optional[str]:
        """Why spending up to `estimate` more (on top of what is in flight) could pass a cap, or None."""
        in_flight = self._inflight_cost + estimate
        kept = "answers already received are kept in the run's response cache, so a re-run with a higher cap resumes"
        cap = getattr(self.cfg, "max_cost_usd", None)
        if cap is not None and self.ledger.cost_usd + in_flight > cap:
            return (f"the next request could pass service.max_cost_usd = ${cap:g} (spent ${self.ledger.cost_usd:.4f} "
                    f"in this stage, ${self._inflight_cost:.4f} in flight, the next up to ${estimate:.4f}); {kept}")
        run_cap = self.run_max_cost_usd
        if run_cap is not None and self.cache.spent_usd + in_flight > run_cap:
            return (f"the next request could pass cycle.max_cost_usd = ${run_cap:g}, the run's cap (spent "
                    f"${self.cache.spent_usd:.4f} in this run so far, ${self._inflight_cost:.4f} in flight, the next up "
                    f"to ${estimate:.4f}); {kept}")
        return None

    # -- one HTTP request ----------------------------------------------------
    async def _attempt(self, request: ChatRequest) -> Completion:
        if self._batcher is not None:
            self.accounting.api_calls += 1
            completion = await self._batcher.submit(request)
            self._proven = True
            return completion
        async with self._sem:
            if not self._proven:  # one at a time until the first answer: a bad key costs a few requests
                async with self._probe:
                    if not self._proven:
                        return await self._send(request)
            return await self._send(request)

    async def _send(self, request: ChatRequest) -> Completion:
        while True:
            await self._pacer.wait()
            if self._tpm is not None:
                await self._tpm.acquire(min(request.estimated_tokens(), self._tpm_capacity))
            estimate = await self._check_open(request)
            mode = getattr(self.backend, "json_mode", None)
            self.accounting.api_calls += 1
            self._inflight_cost += estimate
            try:
                completion = await asyncio.wait_for(self.backend.complete(request), timeout=self.cfg.timeout_s * 1.5)
            except asyncio.TimeoutError:
                raise TransientError(f"no answer within {self.cfg.timeout_s * 1.5:.0f} s") from None
            except PermanentError as exc:
                if exc.response_format and request.json_schema is not None and self._step_down(mode, exc):
                    continue  # the same request again, in the weaker JSON mode
                raise
            finally:
                self._inflight_cost -= estimate
            self._proven = True
            self._learn_limits(completion.limits, request)
            return completion

    # -- the server's JSON mode ----------------------------------------------
    def _mode_key(self) -> str:
        return f"json_mode {self.cfg.backend} {self.cfg.base_url or ''} {self.cfg.model}"

    def _load_json_mode(self) -> None:
        """A mode learned earlier in this run (the cache's settings table) is used from the start."""
        modes = getattr(self.backend, "json_modes", None)
        if self._json_mode_checked or not modes:
            return
        self._json_mode_checked = True
        known = self.cache.setting(self._mode_key())
        if known in modes:
            self.backend.json_mode = known
        self.accounting.json_mode = self.backend.json_mode

    def _step_down(self, mode_sent: Optional[str], exc: PermanentError) -> bool:
        """The server refused `mode_sent`: use the next weaker mode (once per run); False when none is left."""
        modes = getattr(self.backend, "json_modes", None)
        if not modes or mode_sent not in modes:
            return False
        current = self.backend.json_mode
        if modes.index(current) > modes.index(mode_sent):
            return True  # another request already stepped down
        if modes.index(current) + 1 >= len(modes):
            return False
        self.backend.json_mode = modes[modes.index(current) + 1]
        self.accounting.json_mode = self.backend.json_mode
        self.cache.set_setting(self._mode_key(), self.backend.json_mode)
        print(f"service '{self.cfg.label}': the server refused response_format {current} "
              f"({' '.join(str(exc.provider_message).split())[:160]}); using {self.backend.json_mode} from now on",
              file=sys.stderr, flush=True)
        return True

    # -- the provider's limits -----------------------------------------------
    def _learn_limits(self, limits: Optional[dict], request: ChatRequest) -> None:
        """Pace to what the provider says (never above the configured ceiling); hold every request
        until the reset when nothing remains."""
        if not limits:
            return
        self.last_limits = limits
        req, tok = limits.get("requests"), limits.get("tokens")
        if req:
            limit, remaining, reset_s = req.get("limit"), req.get("remaining"), req.get("reset_s")
            if remaining is not None and remaining < 1 and reset_s:
                self._pacer.pause(reset_s)
            short_term = None
            if limit and remaining is not None and reset_s and remaining < limit / 2:
                # little left: the rate the bucket refills at, (used) / (time to full), is what gets through
                short_term = max((limit - remaining) * 60.0 / reset_s, 1e-3)
            self._pacer.adapt(limit, short_term)
        if tok:
            remaining, reset_s = tok.get("remaining"), tok.get("reset_s")
            if remaining is not None and reset_s and remaining < request.estimated_tokens():
                self._pacer.pause(reset_s)
