"""Anthropic Messages API (`anthropic.AsyncAnthropic`, SDK 2.x).

One `complete()` is one HTTP request (`max_retries=0`; the client retries).
System messages go to the `system` parameter. SDK 2.x speaks API version
2026-10-21, which has no sampling parameters: `temperature` and `top_p` are not
sent (the API refuses them with a 400), so the model's default sampling applies.
For a JSON schema, the system prompt asks for one JSON object following the
schema and, where the model has structured outputs, `output_config.format` carries it
too (bounds moved into descriptions by the SDK's own transform); a 400 naming
`output_config` makes the client drop it for the rest of the run. The client
validates every answer against the full schema and re-asks when it does not hold.

Errors: 429, 408, 409, 5xx and 529 (overloaded), timeouts and dropped connections
are `TransientError` (with `retry-after` when sent); other HTTP errors are
`PermanentError`. The API key never appears in an error message.
"""

from __future__ import annotations

import json

import anthropic

from llamaduo_nb.llm.base import ChatRequest, Completion, PermanentError, TransientError
from llamaduo_nb.llm.common import (
    SDKClientBackend, Scrubber, json_instruction, rate_limit_headers, resolve_key, split_system, translate_sdk_error,
)


def api_schema(schema: dict):
    """The schema in the form structured outputs accept (the SDK's own transform: bounds move into the
    description, objects get additionalProperties false); None when it cannot be expressed."""
    try:
        from anthropic.lib._parse._transform import transform_schema

        return transform_schema(schema)
    except Exception:  # noqa: BLE001 - an SDK without it, or a schema it cannot take: the prompt carries it
        return None


class AnthropicBackend(SDKClientBackend):
    name = "anthropic"
    # structured outputs (`output_config.format`) where the model has them, else the schema in the
    # system prompt only; the client steps down on a 400 that names output_config
    json_modes = ("output_config", "prompt")

    def __init__(self, config):
        super().__init__(config)
        self._key = resolve_key(config, ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"))
        self._scrub = Scrubber(self._key)
        # build here, not in the first complete(): slow imports inside the event loop would
        # stall every concurrent request's timeout clock
        self._client = self._new_client()
        self._client.messages  # noqa: B018 - load the resource modules now
        self.json_mode = self.json_modes[0]

    def _new_client(self):
        kwargs = dict(timeout=self.config.timeout_s, max_retries=0)
        if self._key is not None:
            kwargs["api_key"] = self._key
        if self.config.base_url:
            kwargs["base_url"] = self.config.base_url
        return anthropic.AsyncAnthropic(**kwargs)

    def _sdk(self):
        if self._client is None:  # closed by aclose() after an earlier run
            self._client = self._new_client()
        return self._client

    def build(self, request: ChatRequest) -> dict:
        system, messages = split_system(request.messages)
        if request.json_schema is not None:
            system = (system + "\n\n" if system else "") + json_instruction(request.json_schema)
        if not messages or messages[0]["role"] != "user":
            messages.insert(0, {"role": "user", "content": "(see the system prompt)"})
        kwargs = {
            "model": self.config.model,
            "max_tokens": request.max_tokens,
            "messages": messages,
        }
        if system:
            kwargs["system"] = system
        if request.json_schema is not None and self.json_mode == "output_config":
            schema = api_schema(request.json_schema)
            if schema is not None:
                kwargs["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
        return kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        raw, msg = await self._raw_create(self._sdk().messages.with_raw_response.create, **self.build(request))
        completion = self._completion(msg)
        completion.limits = rate_limit_headers(raw.headers)
        return completion

    def _translate(self, exc: BaseException) -> BaseException:
        """An SDK exception -> TransientError / PermanentError (key scrubbed); others unchanged."""
        retryable = (anthropic.RetryableError,) if hasattr(anthropic, "RetryableError") else ()
        return translate_sdk_error(exc, anthropic, anthropic.AnthropicError, self._scrub, self.config.timeout_s, retryable)

    async def _call_sdk(self, coro):
        try:
            return await coro
        except Exception as exc:  # noqa: BLE001 - mapped to the backend contract
            mapped = self._translate(exc)
            if mapped is exc:
                raise
            raise mapped from None

    # -- Message Batches API (llamaduo_nb.llm.batch drives these; half price, within 24 h) ------
    supports_batch_api = True
    batch_max_items = 100_000  # the API's limits per batch: 100,000 requests, 256 MB
    batch_max_bytes = 240 * 2**20
    batch_http_calls = 0  # control calls made (creations, polls, downloads): not billed

    def batch_line_size(self, custom_id: str, request: ChatRequest) -> int:
        return len(json.dumps({"custom_id": custom_id, "params": self.build(request)}, ensure_ascii=False).encode()) + 1

    async def batch_submit(self, items: list) -> str:
        """Create a message batch of `[(custom_id, ChatRequest)]`; its id. custom_id: 1-64 of [A-Za-z0-9_-]."""
        requests = [{"custom_id": cid, "params": self.build(req)} for cid, req in items]
        self.batch_http_calls += 1
        batch = await self._call_sdk(self._sdk().messages.batches.create(requests=requests))
        return batch.id

    async def batch_status(self, batch_id: str):
        """(ended, problem): ended once processing has ended; a message batch never fails as a
        whole (each request ends succeeded, errored, canceled or expired), so problem is None."""
        self.batch_http_calls += 1
        batch = await self._call_sdk(self._sdk().messages.batches.retrieve(batch_id))
        counts = getattr(batch, "request_counts", None)
        parts = [f"{name} {getattr(counts, name, 0)}" for name in ("processing", "succeeded", "errored", "expired")
                 if getattr(counts, name, 0)]
        self.batch_progress[batch_id] = f"{batch.processing_status}" + (f" ({', '.join(parts)})" if parts else "")
        return str(batch.processing_status) == "ended", None

    async def batch_results(self, batch_id: str):
        """[(custom_id, Completion | TransientError | PermanentError)] for every request of the batch."""

        async def read():
            out = []
            self.batch_http_calls += 2  # the SDK retrieves the batch (its results_url), then downloads
            decoder = await self._sdk().messages.batches.results(batch_id)
            async for entry in decoder:
                out.append((entry.custom_id, self._batch_result(entry.result)))
            return out

        return await self._call_sdk(read())

    def _batch_result(self, result):
        kind = str(getattr(result, "type", ""))
        if kind == "succeeded":
            try:
                return self._completion(result.message)
            except (TransientError, PermanentError) as exc:
                return exc
        if kind == "errored":
            err = getattr(getattr(result, "error", None), "error", None)
            etype = str(getattr(err, "type", "") or "api_error")
            message = self._scrub(f"batch item {etype}: {getattr(err, 'message', '')}")
            if etype in ("api_error", "overloaded_error", "rate_limit_error", "timeout_error"):
                return TransientError(message)
            return PermanentError(message)
        return TransientError(f"batch item {kind or 'missing'} (not run: the batch ended first)")

    def _completion(self, msg) -> Completion:
        blocks = getattr(msg, "content", None) or []
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
        stop = str(getattr(msg, "stop_reason", "") or "")
        if not text:
            if stop == "refusal":
                raise PermanentError("the model refused to answer (stop_reason: refusal)")
            if stop == "max_tokens":  # the budget went on thinking: the same request is cut again
                raise PermanentError("empty answer cut at the token limit (stop_reason: max_tokens); raise max_new_tokens",
                                     code="length")
            raise TransientError("empty choices (no text content in the answer)")
        usage = getattr(msg, "usage", None)
        input_tokens = sum(
            int(getattr(usage, name, 0) or 0)
            for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
        )
        return Completion(
            text=text,
            input_tokens=input_tokens,
            output_tokens=int(getattr(usage, "output_tokens", 0) or 0),
            finish_reason=stop,
        )
