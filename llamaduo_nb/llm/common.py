"""What the service-LLM call path and every backend share: keys, errors, JSON, accounting.

No backend and not the client: backends and the client import from here, never from each other.
"""

from __future__ import annotations

import email.utils
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import jsonschema

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import Backend, ChatRequest, PermanentError, TransientError


@dataclass
class Accounting:
    requests: int = 0
    cache_hits: int = 0
    api_calls: int = 0
    retries: int = 0
    reasks: int = 0
    failures: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    failure_reasons: dict = field(default_factory=dict)
    json_mode: str = ""  # the structured-output mode the server ended up taking (openai-compatible servers)
    not_sent: int = 0  # requests not sent because the call path had stopped (circuit breaker, cost cap)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["cost_usd"] = round(self.cost_usd, 6)
        return out


class ServiceStopped(UserError):
    """The call path stopped sending requests (permanent errors in a row, too many failures, the cost
    cap). One line with the provider's own message; answers already paid for stay in the cache."""


def api_key(cfg) -> Optional[str]:
    """The key from the environment variable the params name; never logged."""
    if not cfg.api_key_env:
        return None
    value = os.environ.get(cfg.api_key_env)
    if not value:
        raise UserError(f"service '{cfg.label}': environment variable {cfg.api_key_env} is not set (it must hold the API key)")
    return value


def check_keys(services) -> None:
    """Fail before any work starts when a needed key is missing."""
    for cfg in services:
        if cfg.backend != "local" and cfg.api_key_env:
            api_key(cfg)


_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.S)


def extract_json(text: str) -> Any:
    """Parse the JSON object in a model's reply (bare, fenced, or with prose around it)."""
    candidates = [text.strip()]
    candidates += [m.strip() for m in _FENCE.findall(text)]
    start, end = text.find("{"), text.rfind("}")
    if start != -1 and end > start:
        candidates.append(text[start : end + 1])
    last_error = None
    for cand in candidates:
        try:
            # strict=False: raw control characters (a newline inside a string) are what small models
            # and llama.cpp's grammar-constrained output often produce; the content is still fine
            return json.loads(cand, strict=False)
        except (json.JSONDecodeError, ValueError) as exc:
            last_error = exc
    raise ValueError(f"no JSON object found ({last_error})")


def validate_output(text: str, schema: Optional[dict]) -> Any:
    if schema is None:
        return None
    obj = extract_json(text)
    try:
        jsonschema.validate(obj, schema)
    except jsonschema.ValidationError as exc:
        path = "/".join(str(p) for p in exc.absolute_path) or "(root)"
        raise ValueError(f"schema: {path}: {exc.message}") from None
    return obj


_REFUSAL = re.compile(r"^\W*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i cannot|i won'?t|i am unable|i'?m unable|as an ai)", re.I)


def unusable_kind(completion, problem: str, max_tokens: int, token_field: str = "max_new_tokens") -> str:
    """What an answer that stayed invalid after its re-asks was, in words a user can act on."""
    text = (completion.text or "").strip() if completion is not None else ""
    reason = (getattr(completion, "finish_reason", "") or "").lower()
    tokens = getattr(completion, "output_tokens", 0) or 0
    if reason in ("length", "max_tokens") or (max_tokens and tokens >= max_tokens):
        return f"answers cut at the token limit: raise {token_field} (now {max_tokens})"
    if not text:
        return "empty answers"
    if _REFUSAL.match(text):
        return f"the provider refuses: «{' '.join(text.split())[:120]}»"
    if problem.startswith("no JSON object found"):
        return f"answers are not JSON: «{' '.join(text.split())[:120]}»"
    return f"answers do not follow the requested format: {problem[:200]}"


def reask_request(request: ChatRequest, bad_text: str, problem: str) -> ChatRequest:
    messages = tuple(request.messages) + (
        {"role": "assistant", "content": bad_text},
        {"role": "user", "content": f"That reply was not valid ({problem[:300]}). Reply again with only the JSON object that follows the requested format."},
    )
    return ChatRequest(
        messages=messages, temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens,
        json_schema=request.json_schema, repeat=request.repeat, fields=request.fields,
    )


def describe_error(exc: Optional[BaseException]) -> str:
    if exc is None:
        return "unknown error"
    status = getattr(exc, "status", None)
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    return f"{status} {text}" if status and not text.startswith(str(status)) else text


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
        found = parse_retry_after(headers.get("retry-after"))
    except Exception:  # noqa: BLE001 - an odd header is no reason to fail the request
        found = None
    if found is not None:
        return found
    limits = rate_limit_headers(headers) or {}
    waits = [v["reset_s"] for v in limits.values() if v.get("remaining") is not None and v["remaining"] < 1 and v.get("reset_s")]
    return max(waits) if waits else None


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_reset(value: Optional[str], now: Optional[float] = None) -> Optional[float]:
    """Seconds until a rate limit resets: OpenAI's durations (`6m0s`, `1s`, `20ms`, `1h2m3.5s`), plain
    seconds, or Anthropic's RFC 3339 time (`2026-12-02T01:00:00Z`)."""
    if value is None:
        return None
    text = str(value).strip()
    if not text:
        return None
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if parts and "".join(n + u for n, u in parts) == text:
        scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
        return sum(float(n) * scale[u] for n, u in parts)
    try:
        import datetime as _dt

        when = _dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=_dt.timezone.utc)
        return max(when.timestamp() - (time.time() if now is None else now), 0.0)
    except ValueError:
        return None


def _number(value) -> Optional[float]:
    try:
        return float(value) if value is not None and str(value).strip() != "" else None
    except ValueError:
        return None


def rate_limit_headers(headers: Any) -> Optional[dict]:
    """What a response says about the provider's limits: {"requests"|"tokens": {"limit", "remaining",
    "reset_s"}} from OpenAI's `x-ratelimit-*` or Anthropic's `anthropic-ratelimit-*`; None when silent."""
    if headers is None:
        return None
    out = {}
    for kind in ("requests", "tokens"):
        names = [(f"x-ratelimit-limit-{kind}", f"x-ratelimit-remaining-{kind}", f"x-ratelimit-reset-{kind}"),
                 (f"anthropic-ratelimit-{kind}-limit", f"anthropic-ratelimit-{kind}-remaining", f"anthropic-ratelimit-{kind}-reset")]
        for lim, rem, reset in names:
            try:
                limit, remaining, reset_s = _number(headers.get(lim)), _number(headers.get(rem)), parse_reset(headers.get(reset))
            except Exception:  # noqa: BLE001 - an odd header is no reason to fail the request
                continue
            if limit is not None or remaining is not None:
                out[kind] = {"limit": limit, "remaining": remaining, "reset_s": reset_s}
                break
    return out or None


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


def translate_sdk_error(exc: BaseException, sdk, base_error: type, scrub, timeout_s: float, transient=()) -> BaseException:
    """Map an exception of a Stainless-generated SDK (openai, anthropic: same exception classes) onto the
    backend contract: TransientError (worth retrying) or PermanentError, with the key scrubbed from the text.
    `transient` adds SDK-specific exception classes worth retrying. Anything else is returned unchanged."""
    if isinstance(exc, sdk.APIStatusError):  # RateLimitError, InternalServerError, OverloadedError, …
        status = exc.status_code
        message = error_text(exc)
        detail = scrub(f"{type(exc).__name__}: {message}")
        code = error_code(exc)
        if is_permanent(status, code, message):
            return PermanentError(f"{status} {detail}", status=status, code=code, provider_message=scrub(message),
                                  response_format=names_response_format(message))
        return TransientError(detail, retry_after=retry_after_from_headers(exc.response.headers), status=status)
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


#: error codes that no retry can fix, whatever the HTTP status (OpenAI answers `insufficient_quota` with 429)
PERMANENT_CODES = frozenset({
    "insufficient_quota", "billing_hard_limit_reached", "billing_not_active", "invalid_api_key", "account_deactivated",
    "model_not_found", "unsupported_country_region_territory", "authentication_error", "permission_error",
    "not_found_error", "invalid_request_error",
})

# A server that validates the request only after routing it (llama.cpp's server: pydantic errors come back
# as 500) says so in the message; such a 5xx is the request's fault, and sending it again cannot help.
_REQUEST_VALIDATION = re.compile(
    r"validation error for|Input should be|Field required|Extra inputs are not permitted|Unrecognized request argument"
    r"|Unsupported parameter|Unsupported value|is not supported with this model|response_format|output_config",
    re.IGNORECASE,
)


def is_permanent(status: Optional[int], code: Optional[str], message: str) -> bool:
    """Not worth retrying: a client error other than 408/409/425/429, a code no retry can fix, or a 5xx
    whose message is a request-validation error."""
    if code and code in PERMANENT_CODES and status != 529:  # 529: Anthropic's overloaded, whatever its type
        return True
    if status is None:
        return False
    if status >= 500:
        return bool(_REQUEST_VALIDATION.search(message or ""))
    return not is_transient_status(status)


def names_response_format(message: str) -> bool:
    """The server refused the request's JSON mode (not the prompt, not the key)."""
    text = message or ""
    return any(name in text for name in ("response_format", "json_schema", "output_config", "output_format"))


def error_code(exc) -> Optional[str]:
    """The API's error code (OpenAI `code`, else its `type`; Anthropic `error.type`), if any."""
    code = getattr(exc, "code", None)
    if code:
        return str(code)
    body = getattr(exc, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            found = inner.get("code") or inner.get("type")
            if found and found not in ("error", "server_error", "internal_server_error", "api_error", "overloaded_error", "rate_limit_error"):
                return str(found)
    return None


def error_text(exc) -> str:
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
