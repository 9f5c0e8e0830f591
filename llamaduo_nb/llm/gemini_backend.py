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

No limits are learned from Gemini: the API sends no rate-limit headers (no
`x-ratelimit-*`; google-genai exposes none either), only, on a 429, a
`RESOURCE_EXHAUSTED` body whose `RetryInfo.retryDelay` says when to come back; that
wait is honoured, and the pace is the configured `requests_per_minute`.

Batch Mode (`batch_api: true`): `client.aio.batches` with inline requests, driven by
`llamaduo_nb.llm.batch` like OpenAI's and Anthropic's batch APIs.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Optional

from google import genai
from google.genai import errors, types

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import Backend, ChatRequest, Completion, PermanentError, TransientError
from llamaduo_nb.llm.common import Scrubber, is_permanent, resolve_key, retry_after_from_headers, split_system

_DELAY = re.compile(r"^\s*([0-9]*\.?[0-9]+)s\s*$")

#: the metadata field of an inline batch request that carries its cache key back with the answer
BATCH_KEY = "llamaduo_key"
#: google.rpc.Code of a batch item's error; these are worth sending again in the next batch
GRPC_NAMES = {1: "CANCELLED", 2: "UNKNOWN", 3: "INVALID_ARGUMENT", 4: "DEADLINE_EXCEEDED", 5: "NOT_FOUND",
              7: "PERMISSION_DENIED", 8: "RESOURCE_EXHAUSTED", 9: "FAILED_PRECONDITION", 10: "ABORTED",
              13: "INTERNAL", 14: "UNAVAILABLE", 16: "UNAUTHENTICATED"}
GRPC_TRANSIENT = frozenset({1, 2, 4, 8, 10, 13, 14})


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
        resp = await self._call_sdk(self._sdk().aio.models.generate_content(model=self.config.model, contents=contents, config=config))
        return self._completion(resp)

    async def _call_sdk(self, coro):
        """Await one SDK call; its errors mapped to the backend contract (key scrubbed)."""
        try:
            return await coro
        except errors.APIError as exc:
            status = exc.code if isinstance(exc.code, int) else None
            message = str(exc.message or exc)
            detail = self._scrub(f"{type(exc).__name__}: {exc.status or ''} {message}")
            if status is None or not is_permanent(status, None, message):
                # Gemini sends no Retry-After on a 429: the wait is the RetryInfo detail of the body
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

    # -- Batch Mode (llamaduo_nb.llm.batch drives these; half price, answers within 24 h) ------
    # `client.aio.batches`: the requests go inline in one `models/{model}:batchGenerateContent`
    # call, each tagged with its cache key in `metadata`; `batches/{id}` is polled and, once the
    # job has ended, carries the answers inline (`dest.inlined_responses`, one per request).
    supports_batch_api = True
    batch_max_items = 50_000
    batch_max_bytes = 19 * 2**20  # inline requests: the whole create call must stay under 20 MB
    batch_http_calls = 0  # control calls made (creations, polls): not billed

    def _inlined(self, custom_id: str, request: ChatRequest) -> types.InlinedRequest:
        contents, config = self.build(request)
        return types.InlinedRequest(contents=contents, config=config, metadata={BATCH_KEY: custom_id})

    def batch_line_size(self, custom_id: str, request: ChatRequest) -> int:
        return len(self._inlined(custom_id, request).model_dump_json(exclude_none=True).encode()) + 1

    async def batch_submit(self, items: list) -> str:
        """Create a batch job of `[(custom_id, ChatRequest)]` inline; its name (`batches/…`)."""
        self.batch_http_calls += 1
        job = await self._call_sdk(self._sdk().aio.batches.create(
            model=self.config.model, src=[self._inlined(cid, req) for cid, req in items],
            config=types.CreateBatchJobConfig(display_name="llamaduo_nb"),
        ))
        return job.name

    async def batch_status(self, batch_id: str):
        """(ended, problem): ended once the job's state is final; problem says why a job failed as a
        whole. An expired or cancelled job has no answers: its requests go again in the next batch."""
        self.batch_http_calls += 1
        job = await self._call_sdk(self._sdk().aio.batches.get(name=batch_id))
        state = getattr(job.state, "value", None) or str(job.state)
        answers = list(getattr(job.dest, "inlined_responses", None) or []) if job.dest is not None else []
        failed = sum(1 for a in answers if a.error is not None)
        self.batch_progress[batch_id] = state + (f" ({len(answers) - failed} answered, {failed} failed)" if answers else "")
        if not job.done:
            return False, None
        if state == "JOB_STATE_FAILED":
            reason = getattr(job.error, "message", None) if job.error is not None else None
            return True, self._scrub(f"batch {batch_id} failed: {reason or 'no reason given'}")
        self._batch_answers[batch_id] = answers
        return True, None

    @property
    def _batch_answers(self) -> dict:
        return self.__dict__.setdefault("_batch_inlined", {})

    async def batch_results(self, batch_id: str):
        """[(custom_id, Completion | TransientError | PermanentError)]: the answers came with the
        last poll (no download); a job read back by a later run is polled once more for them."""
        if batch_id not in self._batch_answers:
            await self.batch_status(batch_id)
        out = []
        for answer in self._batch_answers.pop(batch_id, []):
            key = (answer.metadata or {}).get(BATCH_KEY)
            if answer.error is not None:
                out.append((key, self._batch_error(answer.error)))
                continue
            try:
                out.append((key, self._completion(answer.response)))
            except (TransientError, PermanentError) as exc:
                out.append((key, exc))
        return out

    def _batch_error(self, error) -> Exception:
        """One request's `google.rpc.Status` (a gRPC code, not an HTTP status) -> the backend contract."""
        code = int(getattr(error, "code", 0) or 0)
        message = self._scrub(f"batch item {GRPC_NAMES.get(code, code)}: {getattr(error, 'message', '') or ''}")
        if code in GRPC_TRANSIENT:
            return TransientError(message)
        return PermanentError(message, code=GRPC_NAMES.get(code))

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
