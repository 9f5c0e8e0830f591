"""An emulator of Anthropic's `POST /v1/messages`.

Answers in the Messages shape (`content` blocks, `stop_reason`, `usage`); errors in
Anthropic's ``{"type": "error", "error": {"type", "message"}}`` shape; 429 and 529
carry `retry-after`. Like API version 2026-10-21 (what SDK 2.x sends), it refuses
sampling parameters (`temperature`, `top_p`, `top_k`) with a 400, and it refuses a
`system` role inside `messages` (system text belongs in the `system` field).
"""

from __future__ import annotations

from typing import Optional

from .server import ProviderEmulator, text_of

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "api_error",
    529: "overloaded_error",
}


class AnthropicEmulator(ProviderEmulator):
    provider = "anthropic"
    url_suffix = ""

    def matches(self, path: str) -> bool:
        return path.rstrip("/").endswith("/v1/messages")

    def received_key(self, headers) -> Optional[str]:
        if headers.get("x-api-key"):
            return headers.get("x-api-key")
        auth = headers.get("Authorization") or ""
        return auth[7:] if auth.lower().startswith("bearer ") else None

    def parse(self, path: str, body: dict) -> dict:
        system = text_of(body.get("system"))
        messages = [{"role": m.get("role"), "content": text_of(m.get("content"))} for m in body.get("messages") or []]
        fmt = (body.get("output_config") or {}).get("format") or {}
        return {
            "model": body.get("model", ""),
            "system": system,
            "messages": messages,
            "wants_json": bool(fmt) or "JSON" in system,
            "schema": fmt.get("schema"),
        }

    def validate(self, body: dict) -> Optional[str]:
        for name in ("temperature", "top_p", "top_k"):
            if name in body:
                return f"{name}: Extra inputs are not permitted"
        if not body.get("model"):
            return "model: Field required"
        if not isinstance(body.get("max_tokens"), int):
            return "max_tokens: Field required"
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "messages: at least one message is required"
        for m in msgs:
            if m.get("role") not in ("user", "assistant"):
                return f"messages: Unexpected role \"{m.get('role')}\". Use the top-level system parameter"
        return None

    def ok_body(self, ctx, text, input_tokens, output_tokens) -> dict:
        return {
            "id": f"msg_emu{self.next_id():06d}",
            "type": "message",
            "role": "assistant",
            "model": ctx.model,
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": input_tokens, "output_tokens": output_tokens},
        }

    def empty_body(self, ctx, input_tokens) -> dict:
        body = self.ok_body(ctx, "", input_tokens, 0)
        body["content"] = []
        return body

    def error_body(self, status, message, retry_after=None) -> dict:
        return {
            "type": "error",
            "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message},
            "request_id": f"req_emu{self.next_id():06d}",
        }

    def error_headers(self, status, retry_after) -> dict:
        return {"retry-after": str(retry_after)} if retry_after is not None else {}
