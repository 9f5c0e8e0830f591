"""An emulator of OpenAI's `POST /v1/chat/completions` (any OpenAI-compatible server).

Answers in the Chat Completions shape with `usage`; errors in OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape; 429s carry
`Retry-After`. Requests are checked the way the API checks them: `messages`
present, `response_format` of type `json_schema` carrying a `name` and a `schema`.
"""

from __future__ import annotations

import time
from typing import Optional

from .faults import RequestContext
from .server import ProviderEmulator, text_of

_ERROR_TYPES = {
    400: ("invalid_request_error", None),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "unsupported_country_region_territory"),
    404: ("invalid_request_error", "model_not_found"),
    429: ("requests", "rate_limit_exceeded"),
}


class OpenAIEmulator(ProviderEmulator):
    provider = "openai"
    url_suffix = "/v1"

    def matches(self, path: str) -> bool:
        return path.rstrip("/").endswith("/chat/completions")

    def received_key(self, headers) -> Optional[str]:
        auth = headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def parse(self, path: str, body: dict) -> dict:
        system, messages = [], []
        for m in body.get("messages") or []:
            role, text = m.get("role"), text_of(m.get("content"))
            if role in ("system", "developer"):
                system.append(text)
            else:
                messages.append({"role": role, "content": text})
        fmt = body.get("response_format") or {}
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else None
        return {
            "model": body.get("model", ""),
            "system": "\n\n".join(system),
            "messages": messages,
            "wants_json": fmt.get("type") in ("json_schema", "json_object"),
            "schema": schema,
        }

    def validate(self, body: dict) -> Optional[str]:
        if not body.get("model"):
            return "you must provide a model parameter"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty array"
        for m in msgs:
            if m.get("role") not in ("system", "developer", "user", "assistant", "tool") or "content" not in m:
                return f"invalid message: {m!r}"[:200]
        fmt = body.get("response_format")
        if fmt is not None:
            if fmt.get("type") not in ("text", "json_object", "json_schema"):
                return "response_format.type is invalid"
            if fmt.get("type") == "json_schema":
                js = fmt.get("json_schema") or {}
                if not js.get("name") or not isinstance(js.get("schema"), dict):
                    return "response_format.json_schema needs a name and a schema"
        if "max_tokens" in body and "max_completion_tokens" in body:
            return "max_tokens and max_completion_tokens cannot both be set"
        return None

    def _envelope(self, ctx: RequestContext, choices: list, input_tokens: int, output_tokens: int) -> dict:
        return {
            "id": f"chatcmpl-emu{self.next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": ctx.model,
            "choices": choices,
            "usage": {
                "prompt_tokens": input_tokens,
                "completion_tokens": output_tokens,
                "total_tokens": input_tokens + output_tokens,
            },
            "system_fingerprint": "fp_emulator",
        }

    def ok_body(self, ctx, text, input_tokens, output_tokens) -> dict:
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text, "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
        return self._envelope(ctx, [choice], input_tokens, output_tokens)

    def empty_body(self, ctx, input_tokens) -> dict:
        return self._envelope(ctx, [], input_tokens, 0)

    def error_body(self, status, message, retry_after=None) -> dict:
        etype, code = _ERROR_TYPES.get(status, ("server_error", None))
        return {"error": {"message": message, "type": etype, "param": None, "code": code}}

    def error_headers(self, status, retry_after) -> dict:
        headers = super().error_headers(status, retry_after)
        if status == 429:
            headers["x-ratelimit-remaining-requests"] = "0"
        return headers
