"""The one call path, with an in-memory backend: cache, re-asks, retries, failures, accounting."""

import asyncio

import pytest

from llamaduo_nb.llm.base import Backend, ChatRequest, Completion, PermanentError, TransientError
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.llm.common import extract_json
from llamaduo_nb.core.params import ServiceParams

SCHEMA = {"type": "object", "required": ["x"], "properties": {"x": {"type": "integer"}}}


class ScriptedBackend(Backend):
    """Replies from a script: each item is text, or an exception to raise."""

    name = "fake"

    def __init__(self, script):
        super().__init__(None)
        self.script = list(script)
        self.calls = []

    async def complete(self, request):
        self.calls.append(request)
        item = self.script.pop(0) if self.script else '{"x": 1}'
        if isinstance(item, Exception):
            raise item
        return Completion(text=item, input_tokens=10, output_tokens=5)


def _service(tmp_path, backend, **cfg):
    params = ServiceParams(backend="openai", model="fake-1", max_retries=3, max_reasks=2, price_input_per_mtok=1.0,
                           price_output_per_mtok=2.0, **cfg)

    async def no_sleep(_):
        return None

    return ServiceLLM(params, ResponseCache(tmp_path / "c.sqlite"), backend=backend, sleep=no_sleep)


def _req(i=0):
    return ChatRequest(messages=({"role": "user", "content": f"q{i}"},), json_schema=SCHEMA, repeat=i)


def test_rerun_is_served_from_cache(tmp_path):
    backend = ScriptedBackend([])
    first = _service(tmp_path, backend).run([_req(i) for i in range(5)], progress=False)
    assert all(r.ok and r.parsed == {"x": 1} for r in first)
    assert len(backend.calls) == 5
    again = _service(tmp_path, backend)
    second = again.run([_req(i) for i in range(5)], progress=False)
    assert [r.parsed for r in second] == [r.parsed for r in first]
    assert len(backend.calls) == 5  # not one more call
    assert again.accounting.cache_hits == 5 and again.accounting.api_calls == 0


def test_repeat_index_keeps_requests_distinct(tmp_path):
    a, b = _req(0), _req(0)
    assert a.key("openai", "m") == b.key("openai", "m")
    c = ChatRequest(messages=a.messages, json_schema=SCHEMA, repeat=1)
    assert c.key("openai", "m") != a.key("openai", "m")
    assert a.key("openai", "m") != a.key("openai", "other-model")


def test_invalid_json_is_reasked_then_counted(tmp_path):
    backend = ScriptedBackend(['{"x": "not an int"}', "```json\n{\"x\": 3}\n```"])
    svc = _service(tmp_path, backend)
    (res,) = svc.run([_req()], progress=False)
    assert res.ok and res.parsed == {"x": 3} and res.reasks == 1
    assert "not valid" in backend.calls[1].messages[-1]["content"]
    assert svc.accounting.reasks == 1


def test_gives_up_after_reasks_with_reason(tmp_path):
    backend = ScriptedBackend(["nope", "still no", "{broken"])
    svc = _service(tmp_path, backend)
    (res,) = svc.run([_req()], progress=False)
    assert not res.ok and "invalid output after 3 tries" in res.error
    assert svc.accounting.failures == 1


def test_transient_errors_are_retried(tmp_path):
    backend = ScriptedBackend([TransientError("503", status=503), TransientError("429", retry_after=0.01, status=429), '{"x": 7}'])
    svc = _service(tmp_path, backend)
    (res,) = svc.run([_req()], progress=False)
    assert res.ok and res.parsed == {"x": 7} and res.retries == 2
    assert svc.accounting.retries == 2 and svc.accounting.api_calls == 3


def test_permanent_error_fails_the_item_not_the_run(tmp_path):
    backend = ScriptedBackend([PermanentError("401 bad key"), '{"x": 2}'])
    svc = _service(tmp_path, backend, max_concurrency=1)
    results = svc.run([_req(0), _req(1)], progress=False)
    assert [r.ok for r in results] == [False, True]
    assert results[0].error.startswith("refused")


def test_retries_are_bounded(tmp_path):
    backend = ScriptedBackend([TransientError("500", status=500)] * 10)
    svc = _service(tmp_path, backend)
    (res,) = svc.run([_req()], progress=False)
    assert not res.ok and "gave up after 4 tries" in res.error
    assert len(backend.calls) == 4


def test_cost_accounting(tmp_path):
    svc = _service(tmp_path, ScriptedBackend([]))
    svc.run([_req(i) for i in range(4)], progress=False)
    acc = svc.accounting.as_dict()
    assert acc["input_tokens"] == 40 and acc["output_tokens"] == 20
    assert acc["cost_usd"] == pytest.approx((40 * 1.0 + 20 * 2.0) / 1e6)


def test_runs_inside_a_running_event_loop(tmp_path):
    """Jupyter runs an event loop; run() must still work there."""
    svc = _service(tmp_path, ScriptedBackend([]))

    async def inside():
        return svc.run([_req()], progress=False)

    (res,) = asyncio.run(inside())
    assert res.ok


@pytest.mark.parametrize("text", ['{"x": 1}', 'Sure! {"x": 1} Hope that helps.', '```json\n{"x": 1}\n```'])
def test_extract_json(text):
    assert extract_json(text) == {"x": 1}
