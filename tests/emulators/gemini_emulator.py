"""An emulator of the Gemini API's `POST /{v1,v1beta}/models/{model}:generateContent`.

Answers in the GenerateContentResponse shape (`candidates`, `usageMetadata`);
errors in Google's ``{"error": {"code", "message", "status", "details"}}`` shape.
Like the real API, a 429 is `RESOURCE_EXHAUSTED` with `google.rpc.QuotaFailure`, `Help` and
`RetryInfo` details and says when to come back only in `retryDelay` ("2s"), not in a header
(unless `retry_after_header=True`); no response carries rate-limit headers.

Also Batch Mode with inline requests, the endpoints google-genai's `batches` calls:
`POST /v1beta/models/{model}:batchGenerateContent` (``{"batch": {"inputConfig": {"requests":
{"requests": [{"request", "metadata"}]}}}}``) answers a long-running operation named
`batches/{id}`; `GET /v1beta/batches/{id}` reports `BATCH_STATE_PENDING`/`RUNNING` to
`batch_polls` polls, then runs every request through the same validation, fault policy and
reply script as a live request and ends `BATCH_STATE_SUCCEEDED` with the answers inline, in
request order, each with its metadata: a GenerateContentResponse, or an `error` (a
`google.rpc.Status`, gRPC code: a 400 is 3, a 429 is 8, a 503 is 14; a "drop" fault is 4,
DEADLINE_EXCEEDED). The first `expire_batches` jobs end `BATCH_STATE_EXPIRED` instead, with no
answers, as a job pending for 48 hours does.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import time
from typing import Optional

from .server import ProviderEmulator, text_of

_PATH = re.compile(r"/(v1|v1beta|v1alpha)/models/([^/:]+):generateContent$")
_BATCH_CREATE = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):batchGenerateContent$")
_BATCH_GET = re.compile(r"^/(v1|v1beta|v1alpha)/batches/([^/:]+)$")
#: an HTTP status -> the google.rpc.Code a batch item's error carries
_GRPC = {400: 3, 401: 16, 403: 7, 404: 5, 408: 4, 409: 10, 429: 8, 500: 13, 502: 14, 503: 14, 504: 4}
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

    def __init__(self, *args, retry_after_header: bool = False, expire_batches: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.retry_after_header = retry_after_header
        self.expire_batches = expire_batches

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
        if status == 429:
            try:
                delay = f"{float(retry_after):g}s" if retry_after is not None else None
            except (TypeError, ValueError):
                delay = None
            err["message"] = ("You exceeded your current quota, please check your plan and billing details. For more "
                              "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.\n"
                              "* Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_requests, "
                              "limit: 10" + (f"\nPlease retry in {delay}." if delay else ""))
            err["details"] = [
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel", "quotaValue": "10"}]},
                {"@type": "type.googleapis.com/google.rpc.Help",
                 "links": [{"description": "Learn more about Gemini API quotas", "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
            ]
            if delay:
                err["details"].append({"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": delay})
        return {"error": err}

    def error_headers(self, status, retry_after) -> dict:
        if self.retry_after_header and retry_after is not None:
            return {"Retry-After": str(retry_after)}
        return {}

    # -- Batch Mode (inline requests) ------------------------------------------------
    def route(self, handler, method, path, raw) -> bool:
        create, get = _BATCH_CREATE.match(path), _BATCH_GET.match(path)
        if method == "POST" and create:
            self._batches_create(handler, raw, create.group(1), create.group(2))
        elif method == "GET" and get:
            self._batches_get(handler, f"batches/{get.group(2)}")
        else:
            return False
        return True

    def _batches_create(self, handler, raw, version: str, model: str):
        if self._control(handler, "batches.create"):
            return
        body = self._json_body(handler, raw)
        if body is None:
            return
        batch = body.get("batch") if isinstance(body, dict) else None
        requests = (((batch or {}).get("inputConfig") or {}).get("requests") or {}).get("requests")
        if not isinstance(requests, list) or not requests:
            self._send(handler, 400, self.error_body(400, "* BatchGenerateContentRequest.batch.input_config: input_config is not specified"))
            return
        for i, item in enumerate(requests):
            metadata = item.get("metadata") if isinstance(item, dict) else None
            if not isinstance(item, dict) or not isinstance(item.get("request"), dict):
                self._send(handler, 400, self.error_body(400, f"batch.input_config.requests.requests[{i}].request: request is not specified"))
                return
            if metadata is not None and not all(isinstance(v, str) for v in metadata.values()):
                self._send(handler, 400, self.error_body(400, f"batch.input_config.requests.requests[{i}].metadata: values must be strings"))
                return
        now = _rfc3339(time.time())
        name = f"batches/emu{self.next_id():06d}"
        metadata = {
            "@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch",
            "model": f"models/{model}", "displayName": batch.get("displayName", ""), "createTime": now, "updateTime": now,
            "batchStats": {"requestCount": str(len(requests)), "pendingRequestCount": str(len(requests))},
            "state": "BATCH_STATE_PENDING", "name": name,
        }
        state = {"object": {"name": name, "metadata": metadata}, "requests": requests, "polls": 0,
                 "path": f"/{version}/models/{model}:generateContent"}
        with self._batch_lock:
            self.batches[name] = state
            if self.batch_polls <= 0:
                self._run_batch(state)
        self._send(handler, 200, state["object"])

    def _run_batch(self, state: dict) -> None:
        op, metadata = state["object"], state["object"]["metadata"]
        with self._batch_lock:
            expired = self.expire_batches > 0
            if expired:
                self.expire_batches -= 1
        if expired:  # pending too long: ends with no answers, nothing ran
            metadata.update(state="BATCH_STATE_EXPIRED", updateTime=_rfc3339(time.time()))
            op["done"] = True
            return
        answers, ok = [], 0
        for item in state["requests"]:
            status, payload, _ = self.batch_line(state["path"], item["request"], op["name"])
            answer = {"metadata": item["metadata"]} if item.get("metadata") is not None else {}
            if status == 200:
                answer["response"] = payload
                ok += 1
            elif status == 0:
                answer["error"] = {"code": 4, "message": "Deadline expired before operation could complete."}
            else:
                err = payload.get("error", {}) if isinstance(payload, dict) else {}
                answer["error"] = {"code": _GRPC.get(status, 2), "message": err.get("message", f"HTTP {status}")}
            answers.append(answer)
        output = {"inlinedResponses": {"inlinedResponses": answers}}
        metadata.update(state="BATCH_STATE_SUCCEEDED", updateTime=_rfc3339(time.time()), output=output,
                        batchStats={"requestCount": str(len(answers)), "successfulRequestCount": str(ok),
                                    "failedRequestCount": str(len(answers) - ok)})
        op.update(done=True, response=dict(output, **{"@type": "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"}))

    def _batches_get(self, handler, name: str):
        if self._control(handler, "batches.retrieve"):
            return
        state = self.batches.get(name)
        if state is None:
            self._send(handler, 404, self.error_body(404, f"Batch {name} not found."))
            return
        with self._batch_lock:
            metadata = state["object"]["metadata"]
            if not state["object"].get("done"):
                if self._poll_ready(state):
                    self._run_batch(state)
                else:
                    metadata["state"] = "BATCH_STATE_RUNNING"
            op = json.loads(json.dumps(state["object"]))
        self._send(handler, 200, op)


def _rfc3339(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, tz=_dt.timezone.utc).isoformat().replace("+00:00", "Z")
