"""An emulator of Anthropic's `POST /v1/messages`.

Answers in the Messages shape (`content` blocks, `stop_reason`, `usage`); errors in
Anthropic's ``{"type": "error", "error": {"type", "message"}}`` shape; 429 and 529
carry `retry-after`. Like API version 2026-10-21 (what SDK 2.x sends), it refuses
sampling parameters (`temperature`, `top_p`, `top_k`) with a 400, and it refuses a
`system` role inside `messages` (system text belongs in the `system` field).

Also the Message Batches API: `POST /v1/messages/batches` (``{"requests": [{custom_id,
params}]}``), `GET /v1/messages/batches/{id}` and `GET .../{id}/results` (JSONL at the
batch's `results_url`). A batch reports `in_progress` to `batch_polls` polls, then runs
every request through the same validation, fault policy and reply script as a live
request and ends: results `succeeded` (a Message), `errored` (an error response: a
400 for a request the API refuses, a 429/5xx fault) or `expired` (a "drop" fault),
in shuffled order.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from typing import Optional

from .server import ProviderEmulator, text_of

_CUSTOM_ID = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

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

    def __init__(self, *args, structured_outputs: bool = True, rate_limit_headers=None, **kwargs):
        """structured_outputs: False answers `output_config.format` with a 400, as for a model without
        structured outputs; rate_limit_headers: a dict of `anthropic-ratelimit-*` headers sent on every answer."""
        super().__init__(*args, **kwargs)
        self.structured_outputs = structured_outputs
        self.rate_limit_headers = rate_limit_headers

    def limit_headers(self) -> dict:
        return dict(self.rate_limit_headers or {})

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

    def validate(self, body: dict):
        fmt = (body.get("output_config") or {}).get("format")
        if fmt is not None and not self.structured_outputs:
            return f"output_config.format: structured outputs are not supported by the model {body.get('model')}"
        if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
            return "output_config.format: type must be json_schema, with a schema"
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

    # -- Message Batches API ----------------------------------------------------------
    def route(self, handler, method, path, raw) -> bool:
        parts = [p for p in path.split("/") if p]
        if parts[:3] != ["v1", "messages", "batches"]:
            return False
        if method == "POST" and len(parts) == 3:
            self._batches_create(handler, raw)
        elif method == "GET" and len(parts) == 4:
            self._batches_retrieve(handler, parts[3])
        elif method == "GET" and len(parts) == 5 and parts[4] == "results":
            self._batches_results(handler, parts[3])
        else:
            return False
        return True

    def _batches_create(self, handler, raw):
        if self._control(handler, "batches.create"):
            return
        body = self._json_body(handler, raw)
        if body is None:
            return
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            self._send(handler, 400, self.error_body(400, "requests: at least one request is required"))
            return
        seen = set()
        for i, r in enumerate(requests):
            cid = r.get("custom_id") if isinstance(r, dict) else None
            if not isinstance(cid, str) or not _CUSTOM_ID.match(cid):
                self._send(handler, 400, self.error_body(400, f"requests.{i}.custom_id: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"))
                return
            if cid in seen:
                self._send(handler, 400, self.error_body(400, f"requests.{i}.custom_id: duplicate custom_id {cid}"))
                return
            if not isinstance(r.get("params"), dict):
                self._send(handler, 400, self.error_body(400, f"requests.{i}.params: Field required"))
                return
            seen.add(cid)
        now = time.time()
        batch = {
            "id": f"msgbatch_emu{self.next_id():06d}", "type": "message_batch", "processing_status": "in_progress",
            "request_counts": {"processing": len(requests), "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0},
            "created_at": _rfc3339(now), "expires_at": _rfc3339(now + 86400), "ended_at": None, "archived_at": None,
            "cancel_initiated_at": None, "results_url": None,
        }
        state = {"object": batch, "requests": requests, "polls": 0, "results": None}
        with self._batch_lock:
            self.batches[batch["id"]] = state
            if self.batch_polls <= 0:
                self._run_batch(state)
        self._send(handler, 200, batch)

    def _run_batch(self, state: dict) -> None:
        batch = state["object"]
        results, counts = [], {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        for r in state["requests"]:
            status, payload, _ = self.batch_line("/v1/messages", r["params"], batch["id"])
            if status == 0:
                result = {"type": "expired"}
            elif status == 200:
                result = {"type": "succeeded", "message": payload}
            else:
                result = {"type": "errored", "error": payload}
            counts["succeeded" if status == 200 else "expired" if status == 0 else "errored"] += 1
            results.append({"custom_id": r["custom_id"], "result": result})
        with self._rng_lock:
            self._rng.shuffle(results)
        state["results"] = "".join(json.dumps(x) + "\n" for x in results).encode()
        batch.update(processing_status="ended", request_counts=counts, ended_at=_rfc3339(time.time()),
                     results_url=f"{self.url}/v1/messages/batches/{batch['id']}/results")

    def _batches_retrieve(self, handler, batch_id):
        self._retrieve_batch(handler, batch_id, "processing_status", f"Message batch {batch_id} not found")

    def _batches_results(self, handler, batch_id):
        if self._control(handler, "batches.results"):
            return
        state = self.batches.get(batch_id)
        if state is None or state["results"] is None:
            self._send(handler, 404, self.error_body(404, f"No results for message batch {batch_id} (not ended?)"))
            return
        self._send(handler, 200, state["results"], content_type="application/binary")


def _rfc3339(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).isoformat().replace("+00:00", "Z")
