"""One call path for every service-LLM request.

`ServiceLLM.run(requests)` gives, for any backend: bounded concurrency, a rate
limiter for requests/min and tokens/min (aiolimiter), retries with exponential
backoff and jitter that honour `Retry-After` (tenacity), JSON extraction and
schema validation with bounded re-asks, a persistent SQLite response cache and
per-stage accounting of calls, tokens and cost. Every request ends `ok` or failed
with a reason; none is lost and none raises out of `run`.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Optional

from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from llamaduo_nb.progress import tqdm

from llamaduo_nb.errors import UserError
from llamaduo_nb.llm.base import Backend, ChatRequest, ChatResult, Completion, PermanentError, TransientError
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.common import Accounting, describe_error, reask_request, validate_output


_LOCAL_BACKENDS: dict = {}  # one in-process model per process: the judge and pairwise share its loaded weights and memo


def make_backend(cfg) -> Backend:
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


class ServiceLLM:
    """A service LLM (or the local stand-in) behind the one call path."""

    def __init__(self, cfg, cache: ResponseCache, backend: Optional[Backend] = None, sleep=asyncio.sleep):
        self.cfg = cfg
        self.cache = cache
        self.backend = backend
        self.accounting = Accounting()
        self._sleep = sleep

    # -- public -----------------------------------------------------------
    def run(self, requests: list[ChatRequest], desc: str = "requests", progress: bool = True) -> list[ChatResult]:
        """Answer every request; blocks. Safe inside Jupyter (runs its own loop in a thread)."""
        if not requests:
            return []
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
        if self.backend is None:
            self.backend = make_backend(self.cfg)
        cfg = self.cfg
        if getattr(cfg, "batch_api", False):  # the provider's batch API instead of live calls (llm/batch.py)
            from llamaduo_nb.llm.batch import run_batch_api

            return await run_batch_api(self, requests, desc, progress)
        self._sem = asyncio.Semaphore(cfg.max_concurrency if not self.backend.supports_batch else 10**6)
        self._rpm = AsyncLimiter(1, 60.0 / cfg.requests_per_minute) if cfg.requests_per_minute else None
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
        return list(results)

    # -- internals --------------------------------------------------------
    async def _one(self, request: ChatRequest) -> ChatResult:
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
            return result
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
            raise _Failed(f"gave up after {cfg.max_retries + 1} tries: {describe_error(last)}") from None
        except PermanentError as exc:
            raise _Failed(f"refused: {describe_error(exc)}") from None
        self.cache.put(key, cfg.backend, cfg.model, completion)
        acc = self.accounting
        acc.input_tokens += completion.input_tokens
        acc.output_tokens += completion.output_tokens
        acc.cost_usd += (completion.input_tokens * cfg.price_input_per_mtok + completion.output_tokens * cfg.price_output_per_mtok) / 1e6
        result.input_tokens += completion.input_tokens
        result.output_tokens += completion.output_tokens
        return completion

    async def _attempt(self, request: ChatRequest) -> Completion:
        if self._batcher is not None:
            self.accounting.api_calls += 1
            return await self._batcher.submit(request)
        async with self._sem:
            if self._rpm is not None:
                await self._rpm.acquire()
            if self._tpm is not None:
                await self._tpm.acquire(min(request.estimated_tokens(), self._tpm_capacity))
            self.accounting.api_calls += 1
            try:
                return await asyncio.wait_for(self.backend.complete(request), timeout=self.cfg.timeout_s * 1.5)
            except asyncio.TimeoutError:
                raise TransientError(f"no answer within {self.cfg.timeout_s * 1.5:.0f} s") from None


