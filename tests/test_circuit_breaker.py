"""Spend stays bounded when the provider says no: the circuit breaker, the cost cap, the JSON mode a
server takes and the limits it announces, against the OpenAI emulator answering with the real
API's error bodies and headers (the openai SDK reads them).

Each case counts the requests the emulator received and checks the exception and its message.
"""

from __future__ import annotations

import json
import time

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import BREAKER_IN_A_ROW, Pacer, ServiceLLM
from llamaduo_nb.llm.common import ServiceStopped, extract_json, is_permanent, parse_reset, rate_limit_headers
from llamaduo_nb.core.params import ServiceParams
from tests.emulators import Fault

pytestmark = pytest.mark.emulator

KEY = "sk-test-BREAKER-5678"
KEY_ENV = "LLAMADUO_BREAKER_KEY"
SCHEMA = {"type": "object", "required": ["score"], "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}}}


def reply(ctx) -> str:
    return json.dumps({"score": 7})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


async def _no_sleep(_):
    return None


def service(emu, tmp_path, cache="c.sqlite", **overrides) -> ServiceLLM:
    cfg = dict(backend="openai", model="gpt-4o", base_url=emu.url, api_key_env=KEY_ENV, timeout_s=5.0,
               max_retries=6, max_concurrency=8)
    cfg.update(overrides)
    return ServiceLLM(ServiceParams(**cfg), ResponseCache(tmp_path / cache), sleep=_no_sleep)


def requests(n: int, start: int = 0) -> list[ChatRequest]:
    return [ChatRequest(messages=({"role": "user", "content": f"prompt {i}"},), json_schema=SCHEMA, max_tokens=32)
            for i in range(start, start + n)]


def stopped(llm: ServiceLLM, n: int = 20) -> ServiceStopped:
    with pytest.raises(ServiceStopped) as info:
        llm.run(requests(n), progress=False)
    assert isinstance(info.value, UserError)  # the CLI prints it as one line, exit code 2
    assert "\n" not in str(info.value)
    return info.value


# -- permanent errors: not retried, and three in a row stop the call path ---------------------------
def test_wrong_key_sends_three_requests(emulator_factory, tmp_path, monkeypatch):
    emu = emulator_factory("openai", reply=reply, api_key="sk-the-right-one")
    exc = stopped(service(emu, tmp_path))
    assert emu.stats.total == BREAKER_IN_A_ROW == 3
    assert "401 Incorrect API key provided" in str(exc) and "3 requests in a row failed" in str(exc)
    assert KEY not in str(exc)  # the emulator echoes the key it got; the message never does


def test_unknown_model(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, models={"gpt-4o"})
    exc = stopped(service(emu, tmp_path, model="gpt-4o-2099"))
    assert emu.stats.total == 3
    assert "404 The model `gpt-4o-2099` does not exist" in str(exc)


def test_insufficient_quota_is_not_retried(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, policy=lambda ctx: "quota")
    exc = stopped(service(emu, tmp_path))
    assert emu.stats.total == 3  # a 429 otherwise, but no retry brings credit back
    assert "exceeded your current quota" in str(exc)


def test_empty_answer_cut_at_the_token_limit(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, policy=lambda ctx: "length")
    exc = stopped(service(emu, tmp_path))
    assert emu.stats.total == 3
    assert "finish_reason: length" in str(exc) and "max_new_tokens" in str(exc)


def test_sampling_settings_refused_by_a_reasoning_model(emulator_factory, tmp_path):
    # a model the client does not know as a reasoning model: the provider's 400 names the setting
    emu = emulator_factory("openai", reply=reply, reasoning_models={"house-reasoner"})
    exc = stopped(service(emu, tmp_path, model="house-reasoner"))
    assert emu.stats.total == 3
    assert "400 Unsupported value: 'temperature' does not support 0.7" in str(exc)


def test_reasoning_model_gets_no_sampling_settings(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, reasoning_models={"o4-mini"})
    results = service(emu, tmp_path, model="o4-mini").run(requests(5), progress=False)
    assert all(r.ok for r in results) and emu.stats.total == 5
    sent = [r for r in emu.stats.snapshot()]
    assert all(r.status == 200 for r in sent)


def test_server_validation_error_as_500_is_not_retried(emulator_factory, tmp_path):
    # llama.cpp's server answers a body it cannot parse with 500 + pydantic's message
    message = "1 validation error:\n  {'type': 'missing', 'loc': ('body', 'messages'), 'msg': 'Field required'}"
    assert is_permanent(500, None, message) and not is_permanent(500, None, "The server had an error")
    assert not is_permanent(429, "rate_limit_exceeded", "Rate limit reached") and is_permanent(429, "insufficient_quota", "")
    assert not is_permanent(529, "overloaded_error", "Overloaded")


# -- transient errors are still retried; failures mixed with successes trip on their share ---------
def test_transient_errors_do_not_trip(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, policy=lambda ctx: Fault.error(503) if ctx.attempt <= 2 else None)
    results = service(emu, tmp_path).run(requests(6), progress=False)
    assert all(r.ok for r in results) and emu.stats.total == 18


def test_failure_share_over_the_window(emulator_factory, tmp_path):
    # two of every three prompts are refused: never three in a row, but two thirds of the window
    policy = lambda ctx: Fault.error(400) if int(ctx.prompt.split()[-1]) % 3 else None  # noqa: E731
    emu = emulator_factory("openai", reply=reply, policy=policy)
    exc = stopped(service(emu, tmp_path, max_concurrency=1), n=60)
    assert "of the last" in str(exc) and "400 Invalid request" in str(exc)
    assert 10 <= emu.stats.total <= 12


def test_paid_answers_stay_in_the_cache_and_a_rerun_resumes(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, policy=lambda ctx: Fault.error(401) if ctx.index >= 5 else None)
    exc = stopped(service(emu, tmp_path, max_concurrency=1))
    assert emu.stats.total == 8 and "8 requests sent" in str(exc)
    emu.policy, _ = None, emu.stats.reset()  # the key is fixed
    again = service(emu, tmp_path)
    results = again.run(requests(20), progress=False)
    assert all(r.ok for r in results)
    assert again.accounting.cache_hits == 5 and emu.stats.total == 15


def test_cost_cap_while_calls_are_in_flight(emulator_factory, tmp_path):
    # every answer uses nearly its whole budget: ~2 tokens in, 30 of 32 out, at $10 / $30 per million: ~$0.00098 each
    emu = emulator_factory("openai", reply=lambda ctx: json.dumps({"score": 7, "pad": "x" * 100}), latency=0.05)
    llm = service(emu, tmp_path, price_input_per_mtok=10.0, price_output_per_mtok=30.0, max_cost_usd=0.005)
    exc = stopped(llm, n=40)
    assert "service.max_cost_usd = $0.005" in str(exc)
    assert llm.accounting.cost_usd <= 0.005
    # 8 may be in flight, but only as many as the cap covers at their worst case are sent
    assert 4 <= emu.stats.total <= 6 and llm.accounting.not_sent == 40 - emu.stats.total


# -- the JSON mode a server takes ------------------------------------------------------------------
def test_llamacpp_like_server_gets_json_object_with_schema(emulator_factory, tmp_path, capsys):
    emu = emulator_factory("openai", reply=reply, json_types=("text", "json_object"))
    llm = service(emu, tmp_path)
    results = llm.run(requests(10), progress=False)
    assert all(r.ok for r in results)
    assert emu.stats.total == 11 and emu.stats.count("invalid") == 1  # one refusal, then the weaker mode
    assert llm.accounting.json_mode == "json_object+schema" and llm.accounting.failures == 0
    assert "using json_object+schema" in capsys.readouterr().err
    # the next process of the same run asks in that mode from the start
    again = service(emu, tmp_path)
    emu.stats.reset()
    assert all(r.ok for r in again.run(requests(5, start=10), progress=False))
    assert emu.stats.total == 5 and emu.stats.count("invalid") == 0


def test_server_without_schema_support_gets_the_schema_in_the_prompt(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=reply, json_types=("text", "json_object"), object_schema=False)
    llm = service(emu, tmp_path)
    assert all(r.ok for r in llm.run(requests(6), progress=False))
    assert emu.stats.total == 8 and llm.accounting.json_mode == "json_object"
    last = emu.stats.snapshot()[-1]
    assert last.status == 200


def test_control_characters_in_json_strings():
    assert extract_json('{"reason": "line one\nline two\tend"}') == {"reason": "line one\nline two\tend"}


# -- limits the provider announces -----------------------------------------------------------------
@pytest.mark.parametrize("text,seconds", [("6m0s", 360.0), ("1s", 1.0), ("20ms", 0.02), ("1m30.5s", 90.5), ("2h0m0s", 7200.0), ("0.5", 0.5)])
def test_openai_reset_durations(text, seconds):
    assert parse_reset(text) == pytest.approx(seconds)


def test_rate_limit_headers_are_read():
    openai_style = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "6m0s",
                    "x-ratelimit-limit-tokens": "30000", "x-ratelimit-remaining-tokens": "29000", "x-ratelimit-reset-tokens": "2s"}
    got = rate_limit_headers(openai_style)
    assert got["requests"] == {"limit": 500.0, "remaining": 0.0, "reset_s": 360.0} and got["tokens"]["reset_s"] == 2.0
    anthropic_style = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
                       "anthropic-ratelimit-requests-reset": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 60))}
    got = rate_limit_headers(anthropic_style)
    assert got["requests"]["limit"] == 50 and 55 <= got["requests"]["reset_s"] <= 61


def test_pacer_adapts_down_to_the_provider_and_up_to_the_ceiling():
    pacer = Pacer(6000)
    pacer.adapt(600)
    assert pacer.rate == 600
    pacer.adapt(10_000)
    assert pacer.rate == 6000  # never above what the params allow
    unset = Pacer(None)
    unset.adapt(600)
    assert unset.rate == 600


def test_nothing_remaining_holds_requests_until_the_reset(emulator_factory, tmp_path):
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s"}
    emu = emulator_factory("openai", reply=reply, rate_limit_headers=headers)
    llm = service(emu, tmp_path, max_concurrency=4)
    assert all(r.ok for r in llm.run(requests(3), progress=False))
    times = emu.stats.times()
    assert len(times) == 3 and times[1] - times[0] >= 0.95 and times[2] - times[1] >= 0.95


def test_minute_long_reset_on_a_429_is_honoured(emulator_factory, tmp_path):
    """A 429 with no Retry-After but `x-ratelimit-reset-requests: 6m0s` waits six minutes (here: the
    wait asked of the sleep function)."""
    waits = []

    async def record(seconds):
        waits.append(seconds)

    emu = emulator_factory("openai", reply=reply, policy=lambda ctx: Fault.error(429) if ctx.attempt == 1 else None)
    emu.error_headers = lambda status, retry_after: {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "0",
                                                     "x-ratelimit-reset-requests": "6m0s"}
    cfg = ServiceParams(backend="openai", model="gpt-4o", base_url=emu.url, api_key_env=KEY_ENV, timeout_s=5.0, max_retries=2)
    llm = ServiceLLM(cfg, ResponseCache(tmp_path / "c.sqlite"), sleep=record)
    (res,) = llm.run(requests(1), progress=False)
    assert res.ok and emu.stats.total == 2
    assert len(waits) == 1 and 360 <= waits[0] <= 365


# -- Anthropic: structured outputs where the model has them, its limits read ----------------------
def test_anthropic_model_without_structured_outputs_gets_the_prompt_only(emulator_factory, tmp_path, capsys):
    emu = emulator_factory("anthropic", reply=reply, structured_outputs=False)
    llm = service(emu, tmp_path, backend="anthropic", model="claude-old")
    assert all(r.ok for r in llm.run(requests(5), progress=False))
    assert emu.stats.total == 6 and emu.stats.count("invalid") == 1
    assert llm.accounting.json_mode == "prompt" and "using prompt from now on" in capsys.readouterr().err


def test_anthropic_structured_outputs_and_rate_limit_headers(emulator_factory, tmp_path):
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 30))
    headers = {"anthropic-ratelimit-requests-limit": "50", "anthropic-ratelimit-requests-remaining": "49",
               "anthropic-ratelimit-requests-reset": reset}
    emu = emulator_factory("anthropic", reply=reply, rate_limit_headers=headers)
    llm = service(emu, tmp_path, backend="anthropic", model="claude-sonnet-4-5", requests_per_minute=1000)
    assert all(r.ok for r in llm.run(requests(2), progress=False))
    assert emu.stats.total == 2 and llm.accounting.json_mode == "output_config"
    assert llm._pacer.rate == 50  # down to what the provider says


def test_a_server_that_dies_is_reported_as_such_with_the_amx_hint(emulator_factory, tmp_path):
    """A llama.cpp server that crashes after its first answers (as the stock server on AMX CPUs does) is named as
    having stopped answering, not as a bare connection error."""
    from llamaduo_nb.llm.base import ChatRequest
    from llamaduo_nb.llm.cache import ResponseCache
    from llamaduo_nb.llm.client import ServiceLLM
    from llamaduo_nb.llm.common import ServiceStopped
    from llamaduo_nb.core.params import ServiceParams

    emu = emulator_factory("openai")
    cfg = ServiceParams(backend="openai", model="served", base_url=emu.url, timeout_s=5.0, max_retries=0, max_concurrency=1)
    llm = ServiceLLM(cfg, ResponseCache(tmp_path / "llm.sqlite"))
    ask = [ChatRequest(messages=({"role": "user", "content": f"question {i}"},), max_tokens=16) for i in range(6)]
    assert all(r.ok for r in llm.run(ask[:2], progress=False))
    url = emu.url
    emu.stop()
    with pytest.raises(ServiceStopped) as info:
        llm.run(ask[2:], progress=False)
    message = str(info.value)
    assert f"the server at {url} stopped answering after 2 answered requests" in message
    assert "--no-repack" in message and "llamaduo serve" in message and "\n" not in message

    never = ServiceLLM(cfg, ResponseCache(tmp_path / "other.sqlite"))
    with pytest.raises(ServiceStopped) as info:
        never.run(ask[:3], progress=False)
    assert f"no server answers at {url}" in str(info.value)

