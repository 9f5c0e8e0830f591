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

import json

from llamaduo_nb.llm.base import ChatRequest, Completion, PermanentError, TransientError
from llamaduo_nb.llm.common import (
    SDKClientBackend, Scrubber, is_transient_status, json_instruction, rate_limit_headers, resolve_key, translate_sdk_error,
)

#: structured-output modes, strongest first: the client steps down when a server refuses one
#: (llama.cpp's server takes only `json_object`, with an optional `schema`; some take neither)
JSON_MODES = ("json_schema", "json_object+schema", "json_object")

#: OpenAI reasoning models: no temperature/top_p (400 "Unsupported parameter"), max_completion_tokens only
_REASONING_PREFIXES = ("o1", "o3", "o4", "gpt-5")


def is_reasoning_model(model: str) -> bool:
    name = model.split("/")[-1].lower()
    return name.startswith(_REASONING_PREFIXES) and "chat" not in name


def grammar_schema(schema):
    """The schema for a server that turns it into a grammar (llama.cpp): such grammars ignore integer
    minimum/maximum, so a small bounded integer range becomes the enum of its values. Validation
    still uses the original schema."""
    if isinstance(schema, list):
        return [grammar_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    low, high = schema.get("minimum"), schema.get("maximum")
    if schema.get("type") == "integer" and isinstance(low, int) and isinstance(high, int) and 0 <= high - low <= 1000:
        rest = {k: v for k, v in schema.items() if k not in ("type", "minimum", "maximum")}
        return dict(rest, enum=list(range(low, high + 1)))
    return {k: grammar_schema(v) for k, v in schema.items()}


class OpenAIBackend(SDKClientBackend):
    name = "openai"
    json_modes = JSON_MODES

    def __init__(self, config):
        super().__init__(config)
        self._key = resolve_key(config, ("OPENAI_API_KEY",))
        self._scrub = Scrubber(self._key)
        # the official API wants max_completion_tokens (max_tokens is deprecated and refused by
        # reasoning models); compatible servers (vLLM, llama.cpp, Ollama) all read max_tokens
        self._reasoning = is_reasoning_model(config.model)
        self._max_tokens_param = "max_tokens" if config.base_url and not self._reasoning else "max_completion_tokens"
        self.json_mode = JSON_MODES[0]  # the client lowers it when the server refuses it
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
        messages = [{"role": m["role"], "content": m.get("content", "")} for m in request.messages]
        kwargs: dict = {"model": self.config.model, "messages": messages, self._max_tokens_param: request.max_tokens}
        if not self._reasoning:  # reasoning models refuse any sampling setting but the default
            kwargs.update(temperature=request.temperature, top_p=request.top_p)
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.n > 1:
            kwargs["n"] = request.n
        schema = request.json_schema
        if schema is not None:
            if self.json_mode == "json_schema":
                kwargs["response_format"] = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
            elif self.json_mode == "json_object+schema":
                kwargs["response_format"] = {"type": "json_object", "schema": grammar_schema(schema)}
            else:  # JSON only: the schema goes into the prompt, the client validates and re-asks
                kwargs["response_format"] = {"type": "json_object"}
                kwargs["messages"] = [{"role": "system", "content": json_instruction(schema)}] + messages
        return kwargs

    async def complete(self, request: ChatRequest) -> Completion:
        raw, resp = await self._raw_create(self._sdk().chat.completions.with_raw_response.create, **self.request_body(request))
        completion = self._completion(resp, request.n)
        completion.limits = rate_limit_headers(raw.headers)
        return completion

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
        counts = getattr(batch, "request_counts", None)
        done = f" ({getattr(counts, 'completed', 0)}/{getattr(counts, 'total', 0)} done, {getattr(counts, 'failed', 0)} failed)" if counts else ""
        self.batch_progress[batch_id] = status + done
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

    def _completion(self, resp, n: int = 1) -> Completion:
        choices = getattr(resp, "choices", None) or []
        if not choices:
            raise TransientError("empty choices")
        if n > 1:  # K answers in one request: the texts as a JSON list (the caller checks how many came back)
            usage = getattr(resp, "usage", None)
            return Completion(
                text=json.dumps([{"text": getattr(c.message, "content", None) or "", "finish_reason": str(c.finish_reason or "")}
                                 for c in choices]),
                input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
                output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
                finish_reason=str(getattr(choices[0], "finish_reason", "") or ""),
            )
        choice = choices[0]
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None) if message is not None else None
        if content is None or content == "":
            refusal = getattr(message, "refusal", None) if message is not None else None
            if refusal:
                raise PermanentError(self._scrub(f"the model refused: {refusal}"))
            if getattr(choice, "finish_reason", None) == "length":
                # the whole budget went before any visible text (a reasoning model thinking): the same
                # request would be cut the same way again, so it is not retried
                raise PermanentError("empty answer cut at the token limit (finish_reason: length); raise max_new_tokens",
                                     code="length")
            raise TransientError("empty choices (no content in the answer)")
        usage = getattr(resp, "usage", None)
        return Completion(
            text=content,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=str(getattr(choice, "finish_reason", "") or ""),
        )


