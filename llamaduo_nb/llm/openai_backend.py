"""OpenAI Chat Completions, or any OpenAI-compatible server (vLLM, llama.cpp, Ollama).

One `complete()` is one HTTP request: the SDK's own retries are off
(`max_retries=0`) because retries, rate limits and re-asks live in
`llamaduo_nb.llm.client`. Errors are mapped to the backend contract:
429, 408, 409, 5xx, timeouts and dropped connections are `TransientError`
(with the server's `Retry-After`, when it sent one); other HTTP errors are
`PermanentError`. The API key never appears in an error message.

Also the home of the helpers the other API backends share (`retry_after_from_headers`,
`Scrubber`); they import no SDK.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from typing import Any, Optional

from ..errors import UserError
from .base import Backend, ChatRequest, Completion, PermanentError, TransientError

#: HTTP statuses worth retrying, besides every 5xx (529: Anthropic "overloaded").
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429})

#: the key sent to a keyless OpenAI-compatible server (the SDK insists on one)
PLACEHOLDER_KEY = "not-needed"


def is_transient_status(status: Optional[int]) -> bool:
    return status is not None and (status in TRANSIENT_STATUSES or status >= 500)


def parse_retry_after(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds to wait from a `Retry-After` value: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = str(value).strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
        if parsed is None:
            return None
        if parsed.tzinfo is None:  # RFC 9110 dates are GMT
            import datetime as _dt

            parsed = parsed.replace(tzinfo=_dt.timezone.utc)
        seconds = parsed.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):  # NaN / inf
        return None
    return max(seconds, 0.0)


def retry_after_from_headers(headers: Any) -> Optional[float]:
    """`retry-after-ms` (OpenAI) or `Retry-After` (seconds or HTTP date), else None."""
    if headers is None:
        return None
    try:
        ms = headers.get("retry-after-ms")
        if ms is not None:
            return max(float(ms) / 1000.0, 0.0)
    except (TypeError, ValueError):
        pass
    try:
        return parse_retry_after(headers.get("retry-after"))
    except Exception:  # noqa: BLE001 - an odd header is no reason to fail the request
        return None


class Scrubber:
    """Removes the API key from any text that may end up in a message or a log."""

    def __init__(self, secret: Optional[str]):
        self.secret = secret if secret and secret != PLACEHOLDER_KEY and len(secret) >= 4 else None

    def __call__(self, text: Any, limit: int = 300) -> str:
        out = str(text)
        if self.secret:
            out = out.replace(self.secret, "***")
        out = " ".join(out.split())
        return out[:limit]


def resolve_key(cfg, sdk_env_vars: tuple) -> Optional[str]:
    """The key from `cfg.api_key_env`; a placeholder for a keyless server at `base_url`;
    None to let the SDK read its own variable (`sdk_env_vars`), which must then be set."""
    from .client import api_key

    key = api_key(cfg)  # UserError when the named variable is not set
    if key:
        return key
    if cfg.base_url:
        return PLACEHOLDER_KEY
    if not any(os.environ.get(v) for v in sdk_env_vars):
        raise UserError(
            f"service '{cfg.label}': no API key: set service.api_key_env to the NAME of the environment "
            f"variable holding it (or set {' or '.join(sdk_env_vars)})"
        )
    return None


def split_system(messages) -> tuple[str, list]:
    """System text (joined) and the other messages, consecutive same-role turns merged."""
    system, rest = [], []
    for m in messages:
        role, content = m.get("role"), m.get("content", "")
        if role in ("system", "developer"):
            system.append(content)
        elif rest and rest[-1]["role"] == role:
            rest[-1] = {"role": role, "content": rest[-1]["content"] + "\n\n" + content}
        else:
            rest.append({"role": role, "content": content})
    return "\n\n".join(s for s in system if s), rest


def json_instruction(schema: dict) -> str:
    return (
        "Reply with only one JSON object that follows this JSON schema: no prose before or after it, "
        "no code fences.\nJSON schema:\n" + json.dumps(schema, ensure_ascii=False)
    )


class SDKClientBackend(Backend):
    """A backend holding an async SDK client (`self._client`, built by `_new_client()`)."""

    def _new_client(self):  # pragma: no cover - abstract
        raise NotImplementedError

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


class OpenAIBackend(SDKClientBackend):
    name = "openai"

    def __init__(self, config):
        super().__init__(config)
        self._key = resolve_key(config, ("OPENAI_API_KEY",))
        self._scrub = Scrubber(self._key)
        # the official API wants max_completion_tokens (max_tokens is deprecated and refused by
        # reasoning models); compatible servers (vLLM, llama.cpp, Ollama) all read max_tokens
        self._max_tokens_param = "max_tokens" if config.base_url else "max_completion_tokens"
        # import and build here, not in the first complete(): a slow import inside the event
        # loop would stall every concurrent request's timeout clock
        self._client = self._new_client()
        self._client.chat.completions  # noqa: B018 - load the resource modules now

    def _new_client(self):
        import openai

        return openai.AsyncOpenAI(
            api_key=self._key,
            base_url=self.config.base_url,
            timeout=self.config.timeout_s,
            max_retries=0,
        )

    def _sdk(self):
        if self._client is None:  # closed by aclose() after an earlier run
            self._client = self._new_client()
        return self._client

    def request_body(self, request: ChatRequest) -> dict:
        """The Chat Completions request body (the same for a live call and a batch line)."""
        kwargs: dict = {
            "model": self.config.model,
            "messages": [{"role": m["role"], "content": m.get("content", "")} for m in request.messages],
            "temperature": request.temperature,
            "top_p": request.top_p,
            self._max_tokens_param: request.max_tokens,
        }
        if request.json_schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema},
            }
        return kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        try:
            resp = await self._sdk().chat.completions.create(**self.request_body(request))
        except Exception as exc:  # noqa: BLE001 - mapped to the backend contract
            mapped = self._translate(exc)
            if mapped is exc:
                raise
            raise mapped from None
        return self._completion(resp)

    def _translate(self, exc: BaseException) -> BaseException:
        """An SDK exception -> TransientError / PermanentError (key scrubbed); others unchanged."""
        import openai

        return translate_sdk_error(exc, openai, openai.OpenAIError, self._scrub, self.config.timeout_s)

    # -- Batch API (llamaduo_nb.llm.batch drives these; half price, answers within 24 h) -----
    supports_batch_api = True
    batch_max_items = 50_000  # the API's limits per batch: 50,000 requests, 200 MB input file
    batch_max_bytes = 190 * 2**20
    batch_http_calls = 0  # control calls made (uploads, creations, polls, downloads): not billed

    def batch_line_size(self, custom_id: str, request: ChatRequest) -> int:
        return len(self._batch_line(custom_id, request))

    def _batch_line(self, custom_id: str, request: ChatRequest) -> bytes:
        line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": self.request_body(request)}
        return (json.dumps(line, ensure_ascii=False) + "\n").encode()

    async def batch_submit(self, items: list) -> str:
        """Upload `[(custom_id, ChatRequest)]` as a JSONL file and create a batch on it; its id.

        Transient/PermanentError on failure (the caller retries)."""
        data = b"".join(self._batch_line(cid, req) for cid, req in items)
        try:
            self.batch_http_calls += 1
            upload = await self._sdk().files.create(file=("llamaduo-batch.jsonl", data, "application/jsonl"), purpose="batch")
            self.batch_http_calls += 1
            batch = await self._sdk().batches.create(
                input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                metadata={"source": "llamaduo_nb"},
            )
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from None
        return batch.id

    async def batch_status(self, batch_id: str):
        """(ended, problem): ended once the batch can run no more; problem says why a batch
        failed as a whole (validation), else None."""
        try:
            self.batch_http_calls += 1
            batch = await self._sdk().batches.retrieve(batch_id)
        except Exception as exc:  # noqa: BLE001
            raise self._translate(exc) from None
        status = str(batch.status)
        if status in ("validating", "in_progress", "finalizing", "cancelling"):
            return False, None
        if status == "failed":
            errors = getattr(getattr(batch, "errors", None), "data", None) or []
            text = "; ".join(
                f"line {getattr(e, 'line', None)}: {getattr(e, 'message', '')}" if getattr(e, "line", None) else str(getattr(e, "message", ""))
                for e in errors[:3]
            )
            return True, self._scrub(f"batch {batch_id} failed: {text or 'no reason given'}")
        # completed, expired (some lines may have run), cancelled
        self._batch_files[batch_id] = (batch.output_file_id, batch.error_file_id)
        return True, None

    @property
    def _batch_files(self) -> dict:
        return self.__dict__.setdefault("_batch_file_ids", {})

    async def batch_results(self, batch_id: str):
        """[(custom_id, Completion | TransientError | PermanentError)] for every line the batch
        ran; lines it did not run (expired, cancelled) are simply absent."""
        output_id, error_id = self._batch_files.get(batch_id, (None, None))
        if batch_id not in self._batch_files:
            await self.batch_status(batch_id)
            output_id, error_id = self._batch_files.get(batch_id, (None, None))
        out = []
        for file_id in (output_id, error_id):
            if not file_id:
                continue
            try:
                self.batch_http_calls += 1
                content = await self._sdk().files.content(file_id)
                text = content.text
            except Exception as exc:  # noqa: BLE001
                raise self._translate(exc) from None
            for raw in text.splitlines():
                try:
                    line = json.loads(raw) if raw.strip() else None
                except json.JSONDecodeError:
                    line = None  # an unreadable line: its request counts as missing and goes again
                if isinstance(line, dict):
                    out.append(self._batch_result(line))
        return out

    def _batch_result(self, line: dict):
        from openai.types.chat import ChatCompletion

        cid = line.get("custom_id")
        response, error = line.get("response"), line.get("error")
        if response is None:
            code = (error or {}).get("code") or "error"
            message = self._scrub(f"batch item {code}: {(error or {}).get('message', '')}")
            if code in ("batch_expired", "batch_cancelled", "server_error", "rate_limit_exceeded"):
                return cid, TransientError(message)
            return cid, PermanentError(message)
        status = int(response.get("status_code") or 0)
        body = response.get("body") or {}
        if status != 200:
            inner = body.get("error", body) if isinstance(body, dict) else {}
            text = inner.get("message") if isinstance(inner, dict) else None
            detail = self._scrub(f"batch item: {text or body}")
            if is_transient_status(status):
                return cid, TransientError(detail, status=status)
            return cid, PermanentError(f"{status} {detail}")
        try:
            return cid, self._completion(ChatCompletion.model_validate(body))
        except (TransientError, PermanentError) as exc:
            return cid, exc
        except Exception as exc:  # noqa: BLE001 - a body the SDK cannot read
            return cid, TransientError(self._scrub(f"malformed batch item: {exc}"))

    def _completion(self, resp) -> Completion:
        choices = getattr(resp, "choices", None) or []
        if not choices:
            raise TransientError("empty choices")
        choice = choices[0]
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None) if message is not None else None
        if content is None or content == "":
            refusal = getattr(message, "refusal", None) if message is not None else None
            if refusal:
                raise PermanentError(self._scrub(f"the model refused: {refusal}"))
            raise TransientError("empty choices (no content in the answer)")
        usage = getattr(resp, "usage", None)
        return Completion(
            text=content,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=str(getattr(choice, "finish_reason", "") or ""),
        )


def translate_sdk_error(exc: BaseException, sdk, base_error: type, scrub, timeout_s: float, transient=()) -> BaseException:
    """Map an exception of a Stainless-generated SDK (openai, anthropic: same exception classes) onto the
    backend contract: TransientError (worth retrying) or PermanentError, with the key scrubbed from the text.
    `transient` adds SDK-specific exception classes worth retrying. Anything else is returned unchanged."""
    if isinstance(exc, sdk.APIStatusError):  # RateLimitError, InternalServerError, OverloadedError, …
        status = exc.status_code
        detail = scrub(f"{type(exc).__name__}: {_error_text(exc)}")
        if is_transient_status(status):
            return TransientError(detail, retry_after=retry_after_from_headers(exc.response.headers), status=status)
        return PermanentError(f"{status} {detail}")
    if isinstance(exc, sdk.APITimeoutError):
        return TransientError(f"no answer within {timeout_s:g} s (timeout or dropped connection)")
    if isinstance(exc, sdk.APIConnectionError):
        return TransientError(scrub(f"connection error: {_cause(exc)}"))
    if isinstance(exc, sdk.APIResponseValidationError):
        return TransientError(scrub(f"malformed response: {exc}"))
    if isinstance(exc, json.JSONDecodeError):
        return TransientError(f"malformed response body: {exc}")
    if transient and isinstance(exc, transient):
        return TransientError(scrub(f"{type(exc).__name__}: {exc}"))
    if isinstance(exc, base_error):
        return PermanentError(scrub(f"{type(exc).__name__}: {exc}"))
    return exc


def _error_text(exc) -> str:
    """The API's own error message when the body has one, else the SDK's text."""
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    msg = getattr(exc, "api_message", None)  # anthropic
    if msg:
        return str(msg)
    return getattr(exc, "message", None) or str(exc)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    if cause is None:
        return str(exc) or type(exc).__name__
    return f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
