"""An emulator of the Gemini API's `POST /{v1,v1beta}/models/{model}:generateContent`.

Answers in the GenerateContentResponse shape (`candidates`, `usageMetadata`);
errors in Google's ``{"error": {"code", "message", "status", "details"}}`` shape.
Like the real API, a 429 says when to come back in a `google.rpc.RetryInfo`
detail (`retryDelay: "2s"`), not in a header, unless `retry_after_header=True`.
"""

from __future__ import annotations

import re
from typing import Optional

from .server import ProviderEmulator, text_of

_PATH = re.compile(r"/(v1|v1beta|v1alpha)/models/([^/:]+):generateContent$")
_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


class GeminiEmulator(ProviderEmulator):
    provider = "gemini"
    url_suffix = ""

    def __init__(self, *args, retry_after_header: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after_header = retry_after_header

    def matches(self, path: str) -> bool:
        return bool(_PATH.search(path))

    def received_key(self, headers) -> Optional[str]:
        return headers.get("x-goog-api-key")

    def parse(self, path: str, body: dict) -> dict:
        m = _PATH.search(path)
        gen = body.get("generationConfig") or body.get("generation_config") or {}
        system = body.get("systemInstruction") or body.get("system_instruction") or {}
        messages = []
        for c in body.get("contents") or []:
            role = "assistant" if c.get("role") == "model" else "user"
            messages.append({"role": role, "content": text_of(c.get("parts"))})
        schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
        return {
            "model": m.group(2) if m else "",
            "system": text_of(system.get("parts") if isinstance(system, dict) else system),
            "messages": messages,
            "wants_json": gen.get("responseMimeType") == "application/json",
            "schema": schema,
        }

    def validate(self, body: dict) -> Optional[str]:
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            return "* GenerateContentRequest.contents: contents is not specified"
        for c in contents:
            if c.get("role") not in ("user", "model"):
                return f"Please use a valid role: user, model (got {c.get('role')!r})"
        gen = body.get("generationConfig") or {}
        if ("responseJsonSchema" in gen or "responseSchema" in gen) and gen.get("responseMimeType") != "application/json":
            return "responseMimeType must be application/json when a response schema is set"
        if "responseJsonSchema" in gen and "responseSchema" in gen:
            return "responseJsonSchema and responseSchema cannot both be set"
        return None

    def _envelope(self, ctx, candidates, input_tokens, output_tokens) -> dict:
        return {
            "candidates": candidates,
            "usageMetadata": {
                "promptTokenCount": input_tokens,
                "candidatesTokenCount": output_tokens,
                "totalTokenCount": input_tokens + output_tokens,
            },
            "modelVersion": ctx.model,
            "responseId": f"emu{self.next_id():06d}",
        }

    def ok_body(self, ctx, text, input_tokens, output_tokens) -> dict:
        cand = {"content": {"parts": [{"text": text}], "role": "model"}, "finishReason": "STOP", "index": 0}
        return self._envelope(ctx, [cand], input_tokens, output_tokens)

    def empty_body(self, ctx, input_tokens) -> dict:
        body = self._envelope(ctx, [], input_tokens, 0)
        del body["candidates"]  # the API leaves the field out
        return body

    def error_body(self, status, message, retry_after=None) -> dict:
        err = {"code": status, "message": message, "status": _STATUS.get(status, "UNKNOWN")}
        if status == 429 and retry_after is not None:
            try:
                delay = f"{float(retry_after):g}s"
            except (TypeError, ValueError):
                delay = None
            if delay:
                err["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay}]
        return {"error": err}

    def error_headers(self, status, retry_after) -> dict:
        if self.retry_after_header and retry_after is not None:
            return {"Retry-After": str(retry_after)}
        return {}
