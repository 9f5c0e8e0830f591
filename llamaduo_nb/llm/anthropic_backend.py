"""Anthropic Messages API (`anthropic.AsyncAnthropic`, SDK 2.x).

One `complete()` is one HTTP request (`max_retries=0`; the client retries).
System messages go to the `system` parameter. SDK 2.x speaks API version
2026-10-21, which has no sampling parameters: `temperature` and `top_p` are not
sent (the API refuses them with a 400), so the model's default sampling applies.
For a JSON schema, the system prompt asks for one JSON object following the
schema; the client validates it and re-asks when it does not.

Errors: 429, 408, 409, 5xx and 529 (overloaded), timeouts and dropped connections
are `TransientError` (with `retry-after` when sent); other HTTP errors are
`PermanentError`. The API key never appears in an error message.
"""

from __future__ import annotations

import json

import anthropic

from .base import Backend, ChatRequest, Completion, PermanentError, TransientError
from .openai_backend import Scrubber, is_transient_status, json_instruction, resolve_key, retry_after_from_headers, split_system


class AnthropicBackend(Backend):
    name = "anthropic"

    def __init__(self, config):
        super().__init__(config)
        self._key = resolve_key(config, ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"))
        self._scrub = Scrubber(self._key)
        # build here, not in the first complete(): slow imports inside the event loop would
        # stall every concurrent request's timeout clock
        self._client = self._new_client()
        self._client.messages  # noqa: B018 - load the resource modules now

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
        return kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            msg = await self._sdk().messages.create(**self.build(request))
        except anthropic.APIStatusError as exc:  # RateLimitError, OverloadedError, InternalServerError ...
            status = exc.status_code
            detail = self._scrub(f"{type(exc).__name__}: {_error_text(exc)}")
            if is_transient_status(status):
                raise TransientError(detail, retry_after=retry_after_from_headers(exc.response.headers),
                                     status=status) from None
            raise PermanentError(f"{status} {detail}") from None
        except anthropic.APITimeoutError:
            raise TransientError(f"no answer within {self.config.timeout_s:g} s (timeout or dropped connection)") from None
        except anthropic.APIConnectionError as exc:
            raise TransientError(self._scrub(f"connection error: {_cause(exc)}")) from None
        except anthropic.APIResponseValidationError as exc:
            raise TransientError(self._scrub(f"malformed response: {exc}")) from None
        except json.JSONDecodeError as exc:
            raise TransientError(f"malformed response body: {exc}") from None
        except anthropic.RetryableError as exc:
            raise TransientError(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        except anthropic.AnthropicError as exc:
            raise PermanentError(self._scrub(f"{type(exc).__name__}: {exc}")) from None
        return self._completion(msg)

    def _completion(self, msg) -> Completion:
        blocks = getattr(msg, "content", None) or []
        text = "".join(getattr(b, "text", "") or "" for b in blocks if getattr(b, "type", None) == "text")
        stop = str(getattr(msg, "stop_reason", "") or "")
        if not text:
            if stop == "refusal":
                raise PermanentError("the model refused to answer (stop_reason: refusal)")
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

    async def aclose(self) -> None:
        # the SDK's connection pool belongs to this run's event loop: close it, and build the
        # next run's client now (unused, so bound to no loop) rather than inside its first request
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.close()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
        self._client = self._new_client()


def _error_text(exc) -> str:
    msg = getattr(exc, "api_message", None)
    if msg:
        return str(msg)
    return getattr(exc, "message", None) or str(exc)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return str(exc) or type(exc).__name__
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
