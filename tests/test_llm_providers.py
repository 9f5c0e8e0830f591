"""ServiceLLM + each API backend against a local emulator of its provider.

Real SDKs (openai, anthropic, google-genai) talk HTTP to `tests/emulators`, which
inject 429 with Retry-After, 5xx, timeouts, dropped connections (before and mid-response), malformed,
truncated and empty answers, and count every request they receive.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
import traceback

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import PermanentError, TransientError
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM, make_backend
from llamaduo_nb.llm.common import parse_retry_after, retry_after_from_headers
from llamaduo_nb.core.params import ServiceParams
from tests.emulators import Fault, by_attempt
from tests.emulators.requests import SCHEMA, files_contain, request

pytestmark = pytest.mark.emulator

PROVIDERS = ["openai", "anthropic", "gemini"]
SECRET = "sk-test-SECRET-1234"
KEY_ENV = "LLAMADUO_TEST_KEY"


def good_reply(ctx) -> str:
    """A valid JSON answer naming the prompt it answers."""
    return json.dumps({"answer": ctx.prompt, "score": 3})


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def params(provider: str, emu, **overrides) -> ServiceParams:
    base = dict(
        backend=provider, model=f"{provider}-test-model", base_url=emu.url, api_key_env=KEY_ENV,
        timeout_s=1.0, max_retries=2, max_reasks=2, max_concurrency=8,
    )
    base.update(overrides)
    return ServiceParams(**base)


# -- (a) every item ends ok or failed with a reason, under mixed faults ----------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mixed_faults_every_item_accounted_for(provider, emulator_factory, tmp_path):
    script = {
        "p00-rate-limited": [Fault.rate_limit(retry_after=1)],
        "p01-unavailable": [503],
        "p02-slow": [Fault.slow(3.0)],
        "p03-dropped": ["drop"],
        "p03-cut-mid-response": ["cut"],
        "p04-malformed": ["malformed"],
        "p05-truncated": ["truncated"],
        "p06-empty": ["empty"],
        "p07-two-500s": [500, 500],
        "p08-always-503": [503, 503, 503, 503],  # more than max_retries + 1
        "p09-bad-request": [400],
        "p10-never-json": ["malformed", "malformed", "malformed"],  # max_reasks + 1
        "p11-fine": [],
    }
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt(script), api_key=SECRET)
    llm = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache.sqlite"))
    prompts = list(script)
    results = llm.run([request(p) for p in prompts], progress=False)

    assert len(results) == len(prompts)
    by_prompt = dict(zip(prompts, results))
    expected_failures = {"p08-always-503": "gave up after 3 tries", "p09-bad-request": "refused: 400",
                         "p10-never-json": "invalid output after 3 tries"}
    for prompt, res in by_prompt.items():
        if prompt in expected_failures:
            assert not res.ok and res.error and expected_failures[prompt] in res.error, (prompt, res)
        else:
            assert res.ok, (prompt, res.error)
            assert res.parsed == {"answer": prompt, "score": 3}
            assert res.input_tokens > 0 and res.output_tokens > 0
    assert by_prompt["p07-two-500s"].retries == 2 and by_prompt["p07-two-500s"].api_calls == 3
    assert by_prompt["p04-malformed"].reasks == 1 and by_prompt["p05-truncated"].reasks == 1
    assert by_prompt["p11-fine"].retries == 0 and by_prompt["p11-fine"].reasks == 0

    acc = llm.accounting
    assert acc.requests == len(prompts)
    assert acc.failures == 3
    # every call the client made reached the emulator, and nothing else did
    assert acc.api_calls == emu.stats.total
    counts = emu.stats.by_fault
    assert counts["429"] == 1 and counts["400"] == 1 and counts["500"] == 2
    assert counts["503"] == 1 + 3  # p01 once, p08 on all 3 tries
    assert counts["slow"] == 1 and counts["drop"] == 1 and counts["cut"] == 1 and counts["empty"] == 1
    assert by_prompt["p03-cut-mid-response"].retries == 1  # half a body is a transport error: retried, not re-asked
    assert counts["malformed"] == 1 + 3 and counts["truncated"] == 1
    assert acc.retries == sum(r.retries for r in results)
    assert acc.api_calls == sum(r.api_calls for r in results)
    for res in results:
        assert SECRET not in (res.error or "") and SECRET not in (res.text or "")
    assert SECRET not in json.dumps(acc.as_dict())
    assert not files_contain(tmp_path, SECRET)


# -- (b) requests/min never exceeds the configured limit --------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_requests_per_minute_limit(provider, emulator_factory, tmp_path):
    rpm, n = 600.0, 28
    emu = emulator_factory(provider, reply=good_reply, latency=0.02)
    cfg = params(provider, emu, requests_per_minute=rpm, max_concurrency=16)
    llm = ServiceLLM(cfg, ResponseCache(tmp_path / "cache.sqlite"))
    # warm up: the SDK's one-off costs on its first call (model classes, first connection) would
    # delay the first request ~50 ms behind the limiter's clock and bunch it with the second
    assert llm.run([request("warm-up")], progress=False)[0].ok
    emu.stats.reset()
    started = time.monotonic()
    results = llm.run([request(f"rate-{i}") for i in range(n)], progress=False)
    elapsed = time.monotonic() - started

    assert all(r.ok for r in results)
    times = emu.stats.times()
    assert len(times) == n
    per_second = rpm / 60.0
    # no burst: one second holds the limit's share, plus one for a late request's catch-up and one for
    # arrival jitter (two CPU cores shared with other jobs delay a send by tens of ms now and then)
    assert emu.stats.max_in_window(1.0) <= per_second + 2
    span = times[-1] - times[0]
    # n arrivals need (n - 1) gaps of 60/rpm, less the quarter interval a late request may catch up;
    # half a gap for network jitter
    assert (n - 1.25) <= per_second * span + 0.5, (n, span)
    assert (n - 1.25) / span * 60 <= rpm * 1.02
    # and the limiter does not throttle far below the limit either
    assert elapsed < (n - 1) / per_second + 2.0


# -- (c) a re-run with the same cache makes no API call ---------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rerun_with_same_cache_makes_no_calls(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt({"c1": ["malformed"], "c2": [503]}))
    cache_path = tmp_path / "cache.sqlite"
    llm = ServiceLLM(params(provider, emu), ResponseCache(cache_path))
    first = llm.run([request("c0"), request("c1"), request("c2")], progress=False)
    # the same ServiceLLM runs again (its SDK client was closed at the end of the last run)
    second = llm.run([request("c3"), request("c4", schema=None)], progress=False)
    assert all(r.ok for r in first + second)
    calls = emu.stats.total
    assert calls == llm.accounting.api_calls == 3 + 1 + 1 + 2  # c1 re-asked once, c2 retried once

    again = ServiceLLM(params(provider, emu), ResponseCache(cache_path))
    replay = again.run([request(p) for p in ("c0", "c1", "c2", "c3")] + [request("c4", schema=None)], progress=False)
    assert emu.stats.total == calls  # nothing reached the API
    assert again.accounting.api_calls == 0
    assert again.accounting.cache_hits == 6  # c1 is its first answer plus the re-ask's
    assert [r.text for r in replay] == [r.text for r in first + second]
    assert all(r.cached and r.ok for r in replay)
    assert replay[1].reasks == 1  # the re-ask is replayed from the cache too


# -- (d) the key appears in no file and no error text -----------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_secret_never_leaks(provider, emulator_factory, tmp_path):
    # the emulator expects another key and, worst case, repeats the one it got in its 401
    emu = emulator_factory(provider, reply=good_reply, api_key="sk-the-right-one", echo_key_in_errors=True)
    cfg = params(provider, emu)
    llm = ServiceLLM(cfg, ResponseCache(tmp_path / "cache.sqlite"))
    results = llm.run([request("who am i")], progress=False)
    assert not results[0].ok and "401" in results[0].error
    assert emu.stats.total == 1  # a 401 is not retried
    assert SECRET not in results[0].error and "***" in results[0].error
    assert SECRET not in json.dumps(llm.accounting.as_dict())

    # the exception the backend raises (message, repr, formatted traceback) is clean too
    backend = make_backend(cfg)

    async def call():
        try:
            await backend.complete(request("who am i"))
        finally:
            await backend.aclose()

    with pytest.raises(PermanentError) as info:
        asyncio.run(call())
    text = "".join(traceback.format_exception(info.value)) + repr(info.value)
    assert SECRET not in text

    # a transient error too (a dropped connection)
    emu.api_key = None
    emu.policy = by_attempt({"drop me": ["drop"]})
    backend = make_backend(cfg)

    async def dropped():
        try:
            await backend.complete(request("drop me"))
        finally:
            await backend.aclose()

    with pytest.raises(TransientError) as info:
        asyncio.run(dropped())
    assert SECRET not in "".join(traceback.format_exception(info.value))
    assert not files_contain(tmp_path, SECRET)


# -- (e) Retry-After is honoured ---------------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_retry_after_seconds_is_honoured(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt({"wait": [Fault.rate_limit(retry_after=2)]}))
    llm = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache.sqlite"))
    results = llm.run([request("wait")], progress=False)
    assert results[0].ok and results[0].retries == 1
    first, second = emu.stats.for_prompt("wait")
    assert first.fault == "429" and first.status == 429
    assert second.arrived - first.answered >= 2.0
    assert second.arrived - first.answered < 2.0 + 1.5  # 429 + Retry-After, not a long backoff


def test_retry_after_http_date_is_honoured(emulator_factory, tmp_path):
    dates = []

    def policy(ctx):
        if ctx.attempt == 1:
            dates.append(email.utils.formatdate(time.time() + 2, usegmt=True))
            return Fault.rate_limit(retry_after=dates[-1])
        return None

    emu = emulator_factory("openai", reply=good_reply, policy=policy)
    llm = ServiceLLM(params("openai", emu), ResponseCache(tmp_path / "cache.sqlite"))
    assert llm.run([request("date")], progress=False)[0].ok
    first, second = emu.stats.for_prompt("date")
    not_before = email.utils.parsedate_to_datetime(dates[0]).timestamp()
    assert second.wall >= not_before - 0.01


def test_retry_after_parsing():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after("-4") == 0.0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
    now = time.time()
    when = email.utils.formatdate(now + 30, usegmt=True)
    assert 28.0 <= parse_retry_after(when, now=now) <= 30.0
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_from_headers({}) is None


# -- (f) structured output: invalid JSON is re-asked and counted -------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_structured_output_reasks(provider, emulator_factory, tmp_path):
    def reply(ctx):
        if ctx.prompt == "wrong schema" and ctx.attempt == 1:
            return json.dumps({"answer": "x", "score": 42})  # valid JSON, out of the schema's range
        if ctx.prompt == "fenced":
            return "Here you go:\n```json\n" + good_reply(ctx) + "\n```"
        return good_reply(ctx)

    policy = by_attempt({"twice bad": ["malformed", "truncated"], "never": ["malformed"] * 3})
    emu = emulator_factory(provider, reply=reply, policy=policy)
    llm = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache.sqlite"))
    prompts = ["twice bad", "wrong schema", "fenced", "never"]
    results = dict(zip(prompts, llm.run([request(p) for p in prompts], progress=False)))

    assert results["twice bad"].ok and results["twice bad"].reasks == 2
    assert results["twice bad"].parsed == {"answer": "twice bad", "score": 3}
    assert results["wrong schema"].ok and results["wrong schema"].reasks == 1
    assert results["fenced"].ok and results["fenced"].reasks == 0
    assert not results["never"].ok and "invalid output after 3 tries" in results["never"].error
    assert results["never"].reasks == 2
    assert llm.accounting.reasks == 2 + 1 + 2
    assert len(emu.stats.for_prompt("twice bad")) == 3

    # each re-ask carries the bad answer and a correction; every call asked for the schema
    snapshot = emu.stats.snapshot()
    assert len(snapshot) == llm.accounting.api_calls == 3 + 2 + 1 + 3
    bodies = []
    emu.policy = None
    emu.reply = lambda ctx: (bodies.append(ctx), good_reply(ctx))[1]
    llm2 = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache2.sqlite"))
    assert llm2.run([request("show me the body")], progress=False)[0].ok
    ctx = bodies[0]
    if provider == "openai":
        assert ctx.body["response_format"]["type"] == "json_schema"
        assert ctx.body["response_format"]["json_schema"]["schema"] == SCHEMA
    elif provider == "gemini":
        assert ctx.body["generationConfig"]["responseMimeType"] == "application/json"
        assert ctx.body["generationConfig"]["responseJsonSchema"] == SCHEMA
    else:
        assert json.dumps(SCHEMA) in ctx.system and "You are a careful assistant." in ctx.system


def test_reask_request_reaches_the_api(emulator_factory, tmp_path):
    seen = []

    def reply(ctx):
        seen.append(ctx)
        return "not json" if ctx.attempt == 1 else good_reply(ctx)

    emu = emulator_factory("openai", reply=reply)
    llm = ServiceLLM(params("openai", emu), ResponseCache(tmp_path / "cache.sqlite"))
    assert llm.run([request("fix me")], progress=False)[0].ok
    assert [m["role"] for m in seen[1].messages] == ["user", "assistant", "user"]
    assert seen[1].messages[1]["content"] == "not json"
    assert "not valid" in seen[1].last_user


# -- (g) a missing key is a UserError before any request ---------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_missing_key_env_is_user_error(provider, emulator_factory, tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    emu = emulator_factory(provider, reply=good_reply)
    llm = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache.sqlite"))
    with pytest.raises(UserError, match=KEY_ENV):
        llm.run([request("anything")], progress=False)
    with pytest.raises(UserError, match=KEY_ENV):
        make_backend(params(provider, emu))
    assert emu.stats.total == 0


def test_keyless_openai_compatible_server(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=good_reply)  # accepts any key
    cfg = params("openai", emu, api_key_env=None)
    results = ServiceLLM(cfg, ResponseCache(tmp_path / "cache.sqlite")).run([request("local")], progress=False)
    assert results[0].ok
    assert emu.stats.snapshot()[0].fault == "ok"


@pytest.mark.parametrize("provider", PROVIDERS)
def test_request_shape(provider, emulator_factory, tmp_path):
    """System text goes where the provider wants it; Anthropic gets no sampling parameters."""
    seen = []
    emu = emulator_factory(provider, reply=lambda ctx: (seen.append(ctx), "plain answer")[1], api_key=SECRET)
    llm = ServiceLLM(params(provider, emu), ResponseCache(tmp_path / "cache.sqlite"))
    res = llm.run([request("hello", schema=None, temperature=0.2)], progress=False)[0]
    assert res.ok and res.text == "plain answer"
    ctx = seen[0]
    assert ctx.system == "You are a careful assistant."
    assert ctx.messages == [{"role": "user", "content": "hello"}]
    assert ctx.model == f"{provider}-test-model"
    if provider == "openai":
        assert ctx.body["temperature"] == 0.2 and ctx.body["max_tokens"] == 64
    elif provider == "gemini":
        assert ctx.body["generationConfig"]["temperature"] == 0.2
        assert ctx.body["generationConfig"]["maxOutputTokens"] == 64
    else:
        assert "temperature" not in ctx.body and ctx.body["max_tokens"] == 64


def test_gemini_retry_delay_is_read_from_a_real_429_body(emulator_factory):
    """Gemini's 429 carries QuotaFailure, Help and RetryInfo details and no rate-limit header: the wait is retryDelay."""
    from llamaduo_nb.llm.gemini_backend import retry_delay_from_details

    emu = emulator_factory("gemini")
    body = emu.error_body(429, "ignored", retry_after=37.5)
    assert body["error"]["status"] == "RESOURCE_EXHAUSTED" and emu.error_headers(429, 37.5) == {}
    assert [d["@type"].rsplit(".", 1)[1] for d in body["error"]["details"]] == ["QuotaFailure", "Help", "RetryInfo"]
    assert retry_delay_from_details(body) == 37.5
    assert retry_delay_from_details(emu.error_body(429, "no delay given")) is None
