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
import json
import os
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import jsonschema
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, RetryError, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter
from ..progress import tqdm

from ..errors import UserError
from .base import Backend, ChatRequest, ChatResult, Completion, PermanentError, TransientError
from .cache import ResponseCache


@dataclass
class Accounting:
    requests: int = 0
    cache_hits: int = 0
    api_calls: int = 0
    retries: int = 0
    reasks: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    failure_reasons: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cost_usd"] = round(self.cost_usd, 6)
        return out


def api_key(cfg) -> Optional[str]:
    """The key from the environment variable the params name; never logged."""
    if not cfg.api_key_env:
        return None
    value = os.environ.get(cfg.api_key_env)
    if not value:
        raise UserError(f"service '{cfg.label}': environment variable {cfg.api_key_env} is not set (it must hold the API key)")
    return value


def check_keys(services) -> None:
    """Fail before any work starts when a needed key is missing."""
    for cfg in services:
        if cfg.backend != "local" and cfg.api_key_env:
            api_key(cfg)


def make_backend(cfg) -> Backend:
    if cfg.backend == "local":
        from .local import LocalBackend

        return LocalBackend(cfg)
    if cfg.backend == "openai":
        from .openai_backend import OpenAIBackend

        return OpenAIBackend(cfg)
    if cfg.backend == "anthropic":
        from .anthropic_backend import AnthropicBackend

        return AnthropicBackend(cfg)
    if cfg.backend == "gemini":
        from .gemini_backend import GeminiBackend

        return GeminiBackend(cfg)
    raise UserError(f"service.backend: unknown backend '{cfg.backend}'")


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """Parse the JSON object in a model's reply (bare, fenced, or with prose around it)."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    last_error = None
    for cand in candidates:
        try:
            return json.loads(cand)
        except (json.JSONDecodeError, ValueError) as exc:
            last_error = exc
    raise ValueError(f"no JSON object found ({last_error})")


def validate_output(text: str, schema: Optional[dict]) -> Any:
    if schema is None:
        return None
    obj = extract_json(text)
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"schema: {path}: {exc.message}") from None
    return obj


def reask_request(request: ChatRequest, bad_text: str, problem: str) -> ChatRequest:
    messages = tuple(request.messages) + (
        {"role": "assistant", "content": bad_text},
        {"role": "user", "content": f"That reply was not valid ({problem[:300]}). Reply again with only the JSON object that follows the requested format."},
    )
    return ChatRequest(
        messages=messages, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
        json_schema=request.json_schema, repeat=request.repeat, judge_inputs=request.judge_inputs,
    )


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
            from .batch import run_batch_api

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
            raise _Failed(f"gave up after {cfg.max_retries + 1} tries: {_describe(last)}") from None
        except PermanentError as exc:
            raise _Failed(f"refused: {_describe(exc)}") from None
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


def _describe(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status", None)
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"{status} {text}" if status else text
