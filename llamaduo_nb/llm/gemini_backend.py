"""Google Gemini API through `google.genai` (`client.aio.models.generate_content`).

One `complete()` is one HTTP request: the SDK's retries are off
(`HttpRetryOptions(attempts=1)`, which also stops its implicit reconnect-and-retry),
because retries live in `llamaduo_nb.llm.client`. System messages become
`system_instruction`; a JSON schema is sent as `response_json_schema` with
`response_mime_type="application/json"`. `base_url` points the SDK at another
endpoint (the emulator); the timeout is the SDK's (milliseconds in HttpOptions).

Errors: `APIError.code` 429, 408, 409 or 5xx, timeouts and dropped connections
are `TransientError` (the wait from `Retry-After` or the `google.rpc.RetryInfo`
detail); other codes are `PermanentError`. The key never appears in a message.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Optional

from google import genai
from google.genai import errors, types

from llamaduo_nb.errors import UserError
from llamaduo_nb.llm.base import Backend, ChatRequest, Completion, PermanentError, TransientError
from llamaduo_nb.llm.common import Scrubber, is_permanent, resolve_key, retry_after_from_headers, split_system

_DELAY = re.compile(r"^\s*([0-9]*\.?[0-9]+)s\s*$")


def _transport_errors() -> tuple:
    """Network-level exception classes of whichever HTTP stack the SDK uses."""
    out: list = [asyncio.TimeoutError, ConnectionError]
    for mod, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("aiohttp", "ClientError")):
        try:
            module = __import__(mod)
            out.append(getattr(module, name))
        except (ImportError, AttributeError):
            continue
    try:
        from google.auth import exceptions as auth_exceptions

        out.append(auth_exceptions.TransportError)
    except ImportError:  # pragma: no cover - google-auth comes with google-genai
        pass
    return tuple(out)


def retry_delay_from_details(details) -> Optional[float]:
    """The `retryDelay` of a `google.rpc.RetryInfo` in an error body ("37s" -> 37.0)."""
    if not isinstance(details, dict):
        return None
    err = details.get("error", details)
    items = err.get("details") if isinstance(err, dict) else None
    for item in items or []:
        if isinstance(item, dict) and str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            m = _DELAY.match(str(item.get("retryDelay", "")))
            if m:
                return float(m.group(1))
    return None


class GeminiBackend(Backend):
    name = "gemini"

    def __init__(self, config):
        super().__init__(config)
        self._key = resolve_key(config, ("GOOGLE_API_KEY", "GEMINI_API_KEY"))
        self._scrub = Scrubber(self._key)
        self._transport = _transport_errors()
        # build here, not in the first complete(): slow imports inside the event loop would
        # stall every concurrent request's timeout clock
        self._client = None
        self._sdk()

    def _sdk(self):
        if self._client is None:  # first use, or closed by aclose() after an earlier run
            http_options = types.HttpOptions(
                timeout=max(1, int(round(self.config.timeout_s * 1000))),  # milliseconds
                retry_options=types.HttpRetryOptions(attempts=1),
            )
            if self.config.base_url:
                http_options.base_url = self.config.base_url
            try:
                self._client = genai.Client(api_key=self._key, vertexai=False, http_options=http_options)
            except ValueError as exc:
                raise UserError(self._scrub(f"service '{self.config.label}': cannot create the Gemini client: {exc}")) from None
        return self._client

    def build(self, request: ChatRequest):
        system, messages = split_system(request.messages)
        contents = [
            types.Content(role="model" if m["role"] == "assistant" else "user", parts=[types.Part(text=m["content"])])
            for m in messages
        ]
        config = types.GenerateContentConfig(
            temperature=request.temperature,
            top_p=request.top_p,
            max_output_tokens=request.max_tokens,
            candidate_count=1,
        )
        if system:
            config.system_instruction = system
        if request.json_schema is not None:
            config.response_mime_type = "application/json"
            config.response_json_schema = request.json_schema
        return contents, config

    async def complete(self, request: ChatRequest) -> Completion:
        contents, config = self.build(request)
        client = self._sdk()
        try:
            resp = await client.aio.models.generate_content(model=self.config.model, contents=contents, config=config)
        except errors.APIError as exc:
            status = exc.code if isinstance(exc.code, int) else None
            message = str(exc.message or exc)
            detail = self._scrub(f"{type(exc).__name__}: {exc.status or ''} {message}")
            if status is None or not is_permanent(status, None, message):
                wait = retry_after_from_headers(getattr(getattr(exc, "response", None), "headers", None))
                if wait is None:
                    wait = retry_delay_from_details(exc.details)
                raise TransientError(detail, retry_after=wait, status=status) from None
            raise PermanentError(f"{status} {detail}", status=status, code=str(exc.status or "") or None,
                                 provider_message=self._scrub(message)) from None
        except json.JSONDecodeError as exc:
            raise TransientError(f"malformed response body: {exc}") from None
        except self._transport as exc:
            name = type(exc).__name__
            if "timeout" in name.lower():
                raise TransientError(f"no answer within {self.config.timeout_s:g} s ({name})") from None
            raise TransientError(self._scrub(f"connection error: {name}: {exc}")) from None
        return self._completion(resp)

    def _completion(self, resp) -> Completion:
        candidates = getattr(resp, "candidates", None) or []
        if not candidates:
            feedback = getattr(resp, "prompt_feedback", None)
            blocked = getattr(feedback, "block_reason", None) if feedback is not None else None
            if blocked:
                raise PermanentError(f"prompt blocked: {getattr(blocked, 'value', blocked)}")
            raise TransientError("empty choices (no candidates)")
        cand = candidates[0]
        reason = getattr(cand, "finish_reason", None)
        reason = str(getattr(reason, "value", reason) or "")
        parts = getattr(getattr(cand, "content", None), "parts", None) or []
        text = "".join(p.text for p in parts if getattr(p, "text", None) and not getattr(p, "thought", False))
        if not text:
            if reason in ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "SPII", "RECITATION"):
                raise PermanentError(f"no answer (finish_reason {reason})")
            if reason == "MAX_TOKENS":  # the budget went on thinking: the same request is cut again
                raise PermanentError("empty answer cut at the token limit (finish_reason: MAX_TOKENS); raise max_new_tokens",
                                     code="length")
            raise TransientError("empty choices (no text in the candidate)")
        usage = getattr(resp, "usage_metadata", None)
        output_tokens = int(getattr(usage, "candidates_token_count", 0) or 0)
        output_tokens += int(getattr(usage, "thoughts_token_count", 0) or 0)  # billed as output
        return Completion(
            text=text,
            input_tokens=int(getattr(usage, "prompt_token_count", 0) or 0),
            output_tokens=output_tokens,
            finish_reason=reason,
        )

    async def aclose(self) -> None:
        # the SDK's connection pool belongs to this run's event loop: close it, and build the
        # next run's client now (unused, so bound to no loop) rather than inside its first request
        client, self._client = self._client, None
        if client is not None:
            try:
                await client.aio.aclose()
            except Exception:  # noqa: BLE001 - closing is best effort
                pass
            try:
                client.close()
            except Exception:  # noqa: BLE001
                pass
        self._sdk()
