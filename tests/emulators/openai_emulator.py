"""An emulator of OpenAI's `POST /v1/chat/completions` (any OpenAI-compatible server).

Answers in the Chat Completions shape with `usage`; errors in OpenAI's
``{"error": {"message", "type", "param", "code"}}`` shape, with its real messages and
codes (401 `invalid_api_key`, 404 `model_not_found`, 400 `unsupported_value` for a
sampling setting sent to a reasoning model, 429 `insufficient_quota`); 429s carry
`Retry-After`. Requests are checked the way the API checks them: `messages`
present, `response_format` of type `json_schema` carrying a `name` and a `schema`.

Options make it answer like other servers or accounts: `models` (anything else is
404), `reasoning_models` (400 on temperature/top_p other than 1), `json_types` (the
response_format types the server takes: `("text", "json_object")` is llama.cpp's
server, which refuses `json_schema` with a 500 carrying pydantic's validation error),
`object_schema` (whether `json_object` may carry a `schema`), and `rate_limit_headers`
(`x-ratelimit-*` on every answer: from the `enforce_rpm` bucket, or a fixed dict).

`GET /v1/models` lists `models`; `honours_n=False` answers one choice whatever `n` asks (llama.cpp's server).

Also the Batch API on top of the Files API: `POST /v1/files` (multipart, purpose
`batch`), `GET /v1/files/{id}` and `/v1/files/{id}/content`, `POST /v1/batches`
(endpoint `/v1/chat/completions`, window `24h`) and `GET /v1/batches/{id}`. A batch
is validated when created (bad lines: status `failed` with `errors`), reports
`in_progress` to `batch_polls` polls, then runs every line through the same fault
policy and reply script as a live request and ends `completed` with an output file
(200 answers) and an error file (other statuses; a "drop" fault is an item that
expired). Output lines come in shuffled order, as the API does not promise order.
"""

from __future__ import annotations

import json
import time
from typing import Optional

from .faults import RequestContext
from .server import ProviderEmulator, parse_multipart, text_of

CHAT_ENDPOINT = "/v1/chat/completions"

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

    def __init__(self, *args, models=None, reasoning_models=(), json_types=("text", "json_object", "json_schema"),
                 object_schema=True, rate_limit_headers=None, honours_n=True, **kwargs):
        super().__init__(*args, **kwargs)
        self.honours_n = honours_n  # False: one choice whatever `n` says, as llama.cpp's server does
        self.models = set(models) if models is not None else None
        self.reasoning_models = set(reasoning_models)
        self.json_types = tuple(json_types)
        self.object_schema = object_schema
        self.rate_limit_headers = rate_limit_headers  # True: from the enforce_rpm bucket; a dict: sent as is

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
        schema = (fmt.get("json_schema") or {}).get("schema") if fmt.get("type") == "json_schema" else fmt.get("schema")
        return {
            "model": body.get("model", ""),
            "system": "\n\n".join(system),
            "messages": messages,
            "wants_json": fmt.get("type") in ("json_schema", "json_object"),
            "schema": schema,
        }

    def validate(self, body: dict):
        if not body.get("model"):
            return "you must provide a model parameter"
        model = body["model"]
        if self.models is not None and model not in self.models:
            return 404, {"error": {"message": f"The model `{model}` does not exist or you do not have access to it.",
                                   "type": "invalid_request_error", "param": None, "code": "model_not_found"}}
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return "'messages' must be a non-empty array"
        for m in msgs:
            if m.get("role") not in ("system", "developer", "user", "assistant", "tool") or "content" not in m:
                return f"invalid message: {m!r}"[:200]
        if model in self.reasoning_models:
            for name in ("temperature", "top_p"):
                if name in body and body[name] != 1:
                    return 400, {"error": {"message": f"Unsupported value: '{name}' does not support {body[name]} with this model. "
                                                      "Only the default (1) value is supported.",
                                           "type": "invalid_request_error", "param": name, "code": "unsupported_value"}}
            if "max_tokens" in body:
                return 400, {"error": {"message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                                                  "Use 'max_completion_tokens' instead.",
                                       "type": "invalid_request_error", "param": "max_tokens", "code": "unsupported_parameter"}}
        fmt = body.get("response_format")
        if fmt is not None:
            if fmt.get("type") not in self.json_types:
                if "json_schema" not in self.json_types and fmt.get("type") == "json_schema":
                    # llama-cpp-python's server: FastAPI's validation error, wrapped as a 500
                    allowed = " or ".join(f"'{t}'" for t in self.json_types)
                    detail = {"type": "literal_error", "loc": ("body", "response_format", "type"),
                              "msg": f"Input should be {allowed}", "input": fmt.get("type"), "ctx": {"expected": allowed}}
                    return 500, {"error": {"message": f"1 validation error:\n  {detail}\n\n  POST /v1/chat/completions",
                                           "type": "internal_server_error", "param": None, "code": None}}
                return "response_format.type is invalid"
            if fmt.get("type") == "json_object" and "schema" in fmt and not self.object_schema:
                return 400, {"error": {"message": "Unknown parameter: 'response_format.schema'.", "type": "invalid_request_error",
                                       "param": "response_format.schema", "code": "unknown_parameter"}}
            if fmt.get("type") == "json_schema":
                js = fmt.get("json_schema") or {}
                if not js.get("name") or not isinstance(js.get("schema"), dict):
                    return "response_format.json_schema needs a name and a schema"
        if "max_tokens" in body and "max_completion_tokens" in body:
            return "max_tokens and max_completion_tokens cannot both be set"
        return None

    def limit_headers(self) -> dict:
        if isinstance(self.rate_limit_headers, dict):
            return dict(self.rate_limit_headers)
        if self.rate_limit_headers and self.bucket is not None:
            limit, remaining, reset = self.bucket.state()
            return {"x-ratelimit-limit-requests": str(int(limit)), "x-ratelimit-remaining-requests": str(int(remaining)),
                    "x-ratelimit-reset-requests": openai_duration(reset)}
        return {}

    def length_body(self, ctx, input_tokens) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
                  "finish_reason": "length"}
        return self._envelope(ctx, [choice], input_tokens, int(ctx.body.get("max_completion_tokens") or ctx.body.get("max_tokens") or 16))

    def at_limit_body(self, ctx, text, input_tokens, limit) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                  "finish_reason": "length"}
        return self._envelope(ctx, [choice], input_tokens, limit)

    def quota_body(self) -> dict:
        return {"error": {"message": "You exceeded your current quota, please check your plan and billing details. For more "
                                     "information on this error, read the docs: https://platform.openai.com/docs/guides/error-codes/api-errors.",
                          "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}}

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
        n = int(ctx.body.get("n") or 1) if self.honours_n else 1
        choices = [{
            "index": i,
            "message": {"role": "assistant", "content": text if i == 0 else f"{text} (choice {i})", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        } for i in range(n)]
        return self._envelope(ctx, choices, input_tokens, output_tokens * n)

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

    # -- Files + Batch API ------------------------------------------------------------
    def route(self, handler, method, path, raw) -> bool:
        parts = [p for p in path.split("/") if p]
        if parts[:2] == ["v1", "models"] and method == "GET" and len(parts) == 2:
            names = sorted(self.models) if self.models is not None else ["gpt-4o", "gpt-4o-mini"]
            self._send(handler, 200, {"object": "list", "data": [{"id": m, "object": "model", "created": 0, "owned_by": "emulator"}
                                                                   for m in names]})
            return True
        if len(parts) < 2 or parts[0] != "v1" or parts[1] not in ("files", "batches"):
            return False
        if parts[1] == "files" and method == "POST" and len(parts) == 2:
            self._files_create(handler, raw)
        elif parts[1] == "files" and method == "GET" and len(parts) == 3:
            self._files_retrieve(handler, parts[2])
        elif parts[1] == "files" and method == "GET" and len(parts) == 4 and parts[3] == "content":
            self._files_content(handler, parts[2])
        elif parts[1] == "batches" and method == "POST" and len(parts) == 2:
            self._batches_create(handler, raw)
        elif parts[1] == "batches" and method == "GET" and len(parts) == 3:
            self._batches_retrieve(handler, parts[2])
        else:
            return False
        return True

    @property
    def files(self) -> dict:
        return self.__dict__.setdefault("_files", {})

    def _file_object(self, f: dict) -> dict:
        return {"id": f["id"], "object": "file", "bytes": len(f["data"]), "created_at": f["created_at"],
                "filename": f["filename"], "purpose": f["purpose"], "status": "processed", "expires_at": None,
                "status_details": None}

    def _new_file(self, data: bytes, filename: str, purpose: str) -> dict:
        f = {"id": f"file-emu{self.next_id():06d}", "data": data, "filename": filename, "purpose": purpose,
             "created_at": int(time.time())}
        self.files[f["id"]] = f
        return f

    def _files_create(self, handler, raw):
        if self._control(handler, "files.create"):
            return
        ctype = handler.headers.get("Content-Type") or ""
        if not ctype.startswith("multipart/form-data"):
            self._send(handler, 400, self.error_body(400, "expected multipart/form-data"))
            return
        form = parse_multipart(ctype, raw)
        purpose = (form.get("purpose") or (None, b""))[1].decode()
        if "file" not in form or purpose not in ("batch", "assistants", "fine-tune", "user_data", "vision", "evals"):
            self._send(handler, 400, self.error_body(400, "'file' and a valid 'purpose' are required"))
            return
        filename, data = form["file"]
        self._send(handler, 200, self._file_object(self._new_file(data, filename or "upload", purpose)))

    def _files_retrieve(self, handler, file_id):
        if self._control(handler, "files.retrieve"):
            return
        f = self.files.get(file_id)
        if f is None:
            self._send(handler, 404, self.error_body(404, f"No such File object: {file_id}"))
        else:
            self._send(handler, 200, self._file_object(f))

    def _files_content(self, handler, file_id):
        if self._control(handler, "files.content"):
            return
        f = self.files.get(file_id)
        if f is None:
            self._send(handler, 404, self.error_body(404, f"No such File object: {file_id}"))
        else:
            self._send(handler, 200, f["data"], content_type="application/octet-stream")

    def _batches_create(self, handler, raw):
        if self._control(handler, "batches.create"):
            return
        body = self._json_body(handler, raw)
        if body is None:
            return
        if body.get("endpoint") != CHAT_ENDPOINT or body.get("completion_window") != "24h":
            self._send(handler, 400, self.error_body(400, "endpoint must be /v1/chat/completions (emulated) and completion_window 24h"))
            return
        f = self.files.get(body.get("input_file_id") or "")
        if f is None or f["purpose"] != "batch":
            self._send(handler, 400, self.error_body(400, f"input_file_id {body.get('input_file_id')!r}: no file with purpose batch"))
            return
        lines, errors = self._read_lines(f["data"])
        now = int(time.time())
        batch = {
            "id": f"batch_emu{self.next_id():06d}", "object": "batch", "endpoint": CHAT_ENDPOINT, "errors": None,
            "input_file_id": f["id"], "completion_window": "24h", "status": "validating", "output_file_id": None,
            "error_file_id": None, "created_at": now, "in_progress_at": None, "expires_at": now + 86400,
            "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None, "cancelling_at": None,
            "cancelled_at": None, "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"), "model": (lines[0]["body"].get("model") if lines else None),
        }
        state = {"object": batch, "lines": lines, "polls": 0}
        with self._batch_lock:
            self.batches[batch["id"]] = state
        if errors:
            batch.update(status="failed", failed_at=now, errors={"object": "list", "data": errors})
        elif self.batch_polls <= 0:
            self._run_batch(state)
        else:
            batch.update(status="in_progress", in_progress_at=now)
        self._send(handler, 200, batch)

    def _read_lines(self, data: bytes) -> tuple[list, list]:
        lines, errors, seen, models = [], [], set(), set()
        for n, text in enumerate(data.decode("utf-8", "replace").splitlines(), start=1):
            if not text.strip():
                continue
            try:
                line = json.loads(text)
            except json.JSONDecodeError:
                errors.append({"code": "invalid_json_line", "message": "This line is not parseable as valid JSON.", "param": None, "line": n})
                continue
            cid = line.get("custom_id")
            if not isinstance(cid, str) or not cid or cid in seen:
                errors.append({"code": "duplicate_custom_id" if cid in seen else "missing_required_parameter",
                               "message": "custom_id must be a unique non-empty string", "param": "custom_id", "line": n})
                continue
            seen.add(cid)
            if line.get("method") != "POST" or line.get("url") != CHAT_ENDPOINT or not isinstance(line.get("body"), dict):
                errors.append({"code": "invalid_request", "message": "method POST, url /v1/chat/completions and a body are required",
                               "param": None, "line": n})
                continue
            models.add(line["body"].get("model"))
            lines.append(line)
        if len(models) > 1:
            errors.append({"code": "mismatched_model", "message": "every line of a batch must use the same model", "param": "body.model", "line": None})
        return lines, errors

    def _run_batch(self, state: dict) -> None:
        batch = state["object"]
        out, err = [], []
        for line in state["lines"]:
            status, payload, _ = self.batch_line(CHAT_ENDPOINT, line["body"], batch["id"])
            entry = {"id": f"batch_req_emu{self.next_id():06d}", "custom_id": line["custom_id"]}
            if status == 0:
                err.append(dict(entry, response=None, error={"code": "batch_expired", "message": "This request could not be executed before the completion window expired."}))
            elif status == 200:
                out.append(dict(entry, response={"status_code": 200, "request_id": f"req_emu{self.next_id():06d}", "body": payload}, error=None))
            else:
                err.append(dict(entry, response={"status_code": status, "request_id": f"req_emu{self.next_id():06d}", "body": payload}, error=None))
        with self._rng_lock:
            self._rng.shuffle(out)
        now = int(time.time())
        if out:
            batch["output_file_id"] = self._new_file(_jsonl(out), f"{batch['id']}_output.jsonl", "batch_output")["id"]
        if err:
            batch["error_file_id"] = self._new_file(_jsonl(err), f"{batch['id']}_error.jsonl", "batch_output")["id"]
        batch.update(status="completed", in_progress_at=batch["in_progress_at"] or now, finalizing_at=now, completed_at=now,
                     request_counts={"total": len(state["lines"]), "completed": len(out), "failed": len(err)})

    def _batches_retrieve(self, handler, batch_id):
        self._retrieve_batch(handler, batch_id, "status", f"No batch found with id '{batch_id}'.")


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def openai_duration(seconds: float) -> str:
    """OpenAI's reset format: `6m0s`, `1s`, `20ms`."""
    if seconds < 1:
        return f"{max(int(round(seconds * 1000)), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest}s" if minutes else f"{rest}s"
