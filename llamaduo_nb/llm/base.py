"""The contract every service-LLM backend fulfils.

A backend turns one `ChatRequest` into one `Completion`, or raises
`TransientError` (worth retrying: 429, 5xx, timeouts, dropped connections) or
`PermanentError` (not worth retrying: 400, 401, 404, a refused request).
Retries, rate limits, caching, JSON validation and accounting live in
`llamaduo_nb.llm.client`, once, for every backend.
"""

from __future__ import annotations

import inspect

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class ChatRequest:
    messages: tuple  # ({"role": "system"|"user"|"assistant", "content": str}, ...)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 512
    json_schema: Optional[dict] = None  # ask for (and validate against) this JSON schema
    repeat: int = 0  # keeps M repeated judgements of the same prompt distinct in the cache
    # The prompt template's fields, ((name, value), ...), that the messages were rendered from. The
    # messages already hold them (so they are not part of the cache key); a backend that reads
    # meaning rather than text uses them: the local likelihood judge scores (instruction, reference, answer).
    fields: tuple = ()
    # answering test prompts through a server (infer.engine: openai): the sampling seed, and how many
    # answers one request asks for (`n`; the K answers then come back as a JSON list of texts)
    seed: Optional[int] = None
    n: int = 1
    # the served model's weights (an adapter's or a GGUF's content fingerprint): not sent, but in the cache key, so
    # a model retrained behind the same served name is asked again instead of answered from the cache
    weights: Optional[str] = None

    def key(self, backend: str, model: str, base_url: Optional[str] = None) -> str:
        """Cache key: everything that changes the answer."""
        body = asdict(self)
        body.pop("fields")
        for name, default in (("seed", None), ("n", 1), ("weights", None)):  # absent unless set: earlier keys stay valid
            if body[name] == default:
                body.pop(name)
        body.update(backend=backend, model=model, base_url=base_url or "")
        return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def max_input_tokens(self) -> int:
        """An upper bound of the prompt's tokens, for the spend caps: a byte-level BPE token (GPT, Claude, Gemini,
        Llama) covers at least one UTF-8 byte, plus a chat template's few tokens per message. About 4× the usual
        count for English, so a cap stops a little early rather than late."""
        return sum(len(str(m.get("content", "")).encode()) + 8 for m in self.messages) + 16

    def estimated_tokens(self) -> int:
        """A cheap upper-bound guess for the tokens/min limiter (4 characters per token)."""
        chars = sum(len(m.get("content", "")) for m in self.messages)
        return chars // 4 + self.max_tokens


@dataclass
class Completion:
    """What one API call returned."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    finish_reason: str = ""
    # rate-limit headers of the response that carried it ({lowercase name: value}); never cached
    limits: Optional[dict] = None


@dataclass
class ChatResult:
    """The outcome of one request after retries and re-asks."""

    ok: bool
    text: Optional[str] = None
    parsed: Any = None  # the validated JSON object when the request had a schema
    error: Optional[str] = None  # why it failed (ok=False)
    input_tokens: int = 0
    output_tokens: int = 0
    cached: bool = False  # answered entirely from the response cache
    api_calls: int = 0
    retries: int = 0
    reasks: int = 0
    finish_reason: str = ""  # why the answer ended ("stop", "length")


class TransientError(Exception):
    """Worth retrying. `retry_after` (seconds) comes from the server when it says so."""

    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


class PermanentError(Exception):
    """Not worth retrying (bad request, authentication, unknown model, no quota left).

    `message` is the provider's own words; `response_format` is True when the server refused the
    request's JSON mode (the client then tries a weaker one instead of failing)."""

    def __init__(self, message: str, status: Optional[int] = None, code: Optional[str] = None,
                 provider_message: Optional[str] = None, response_format: bool = False):
        super().__init__(message)
        self.status = status
        self.code = code
        self.provider_message = provider_message or message
        self.response_format = response_format


class Backend:
    """Base class: one request at a time (async) or, for in-process models, in batches."""

    name = "base"
    supports_batch = False  # True: the client calls complete_batch() in a worker thread

    def __init__(self, config):
        self.config = config

    async def complete(self, request: ChatRequest) -> Completion:  # pragma: no cover - abstract
        raise NotImplementedError

    def _translate(self, exc: Exception) -> Exception:  # an SDK backend maps its SDK's errors to the contract
        return exc

    async def _raw_create(self, create, **kwargs) -> tuple:
        """(raw response, parsed body) of an SDK's `with_raw_response.create(**kwargs)` (the raw one carries the rate
        limit headers), the SDK's errors mapped to the backend contract."""
        try:
            raw = await create(**kwargs)
            body = raw.parse()
            if inspect.isawaitable(body):  # the async raw response of newer SDKs parses in a coroutine
                body = await body
        except Exception as exc:  # noqa: BLE001 - mapped to the backend contract
            mapped = self._translate(exc)
            if mapped is exc:
                raise
            raise mapped from None
        return raw, body

    def complete_batch(self, requests: list[ChatRequest]) -> list[Completion]:  # pragma: no cover
        raise NotImplementedError

    @property
    def batch_progress(self) -> dict:
        """batch id -> the provider's own status of a batch (its batch API), as last polled: shown while waiting."""
        return self.__dict__.setdefault("_batch_progress", {})

    async def aclose(self) -> None:
        return None
