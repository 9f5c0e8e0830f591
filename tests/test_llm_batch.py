"""Provider batch APIs (`service.batch_api: true`, llamaduo_nb/llm/batch.py) against the emulators.

The real SDKs talk to tests/emulators: OpenAI's Files + Batch API (JSONL upload, batch on
/v1/chat/completions, output and error files) and Anthropic's Message Batches. Batches end
after a few polls; every line goes through the emulator's fault policy like a live request.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import Backend
from llamaduo_nb.llm.batch import BATCH_DISCOUNT, BatchAccounting
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.llm.common import ServiceStopped
from llamaduo_nb.core.params import ServiceParams
from tests.emulators import Fault, by_attempt
from tests.emulators.requests import SCHEMA, files_contain, request

pytestmark = pytest.mark.emulator

PROVIDERS = ["openai", "anthropic", "gemini"]
SECRET = "sk-test-BATCHSECRET-5678"
KEY_ENV = "LLAMADUO_TEST_BATCH_KEY"


def good_reply(ctx) -> str:
    return json.dumps({"answer": ctx.prompt, "score": 3})


async def fast_sleep(seconds: float) -> None:  # backoffs and polls, without the wait
    await asyncio.sleep(min(seconds, 0.005))


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def params(provider: str, emu, **overrides) -> ServiceParams:
    base = dict(
        backend=provider, model=f"{provider}-test-model", base_url=emu.url, api_key_env=KEY_ENV, batch_api=True,
        timeout_s=5.0, max_retries=2, max_reasks=2, price_input_per_mtok=3.0, price_output_per_mtok=15.0,
    )
    base.update(overrides)
    return ServiceParams(**base)


def service(cfg, cache_path, poll_s=0.0, max_wait_s=None) -> ServiceLLM:
    llm = ServiceLLM(cfg, ResponseCache(cache_path), sleep=fast_sleep)
    llm.batch_poll_s = poll_s
    if max_wait_s is not None:
        llm.batch_max_wait_s = max_wait_s
    return llm


# -- every item ends ok or failed with a reason ------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_mixed_items_every_item_accounted_for(provider, emulator_factory, tmp_path):
    script = {
        "b00-rate-limited": ["429"],  # an item the batch could not run: sent again in the next batch
        "b01-server-error": [500, 503],
        "b02-expired": ["drop"],  # expired before it ran
        "b03-malformed": ["malformed"],  # re-asked in the next batch
        "b04-truncated": ["truncated"],
        "b05-empty": ["empty"],
        "b06-always-503": [503, 503, 503],  # more than max_retries + 1
        "b07-bad-request": [400],
        "b08-never-json": ["malformed"] * 3,  # max_reasks + 1
        "b09-fine": [],
        "b10-fine": [],
    }
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt(script), api_key=SECRET, batch_polls=2)
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    prompts = list(script)
    results = llm.run([request(p) for p in prompts], progress=False)

    assert len(results) == len(prompts)
    by_prompt = dict(zip(prompts, results))
    expected_failures = {"b06-always-503": "gave up after 3 tries", "b07-bad-request": "refused:",
                         "b08-never-json": "invalid output after 3 tries"}
    for prompt, res in by_prompt.items():
        if prompt in expected_failures:
            assert not res.ok and expected_failures[prompt] in res.error, (prompt, res)
        else:
            assert res.ok, (prompt, res.error)
            assert res.parsed == {"answer": prompt, "score": 3}  # mapped back to its own request
            assert res.input_tokens > 0 and res.output_tokens > 0 and not res.cached
    assert by_prompt["b01-server-error"].retries == 2 and by_prompt["b01-server-error"].api_calls == 3
    assert by_prompt["b00-rate-limited"].retries == 1 and by_prompt["b02-expired"].retries == 1
    assert by_prompt["b03-malformed"].reasks == 1 and by_prompt["b04-truncated"].reasks == 1
    assert by_prompt["b08-never-json"].reasks == 2
    assert by_prompt["b09-fine"].api_calls == 1 and by_prompt["b09-fine"].retries == 0

    acc = llm.accounting
    assert isinstance(acc, BatchAccounting) and acc.batch_discount == BATCH_DISCOUNT
    assert acc.requests == len(prompts) and acc.failures == 3
    # every request went in a batch (no live call), each line once per batch it was in
    records = emu.stats.snapshot()
    assert all(r.batch_id for r in records)
    assert acc.api_calls == emu.stats.total == sum(r.api_calls for r in results)
    assert acc.retries == sum(r.retries for r in results) and acc.reasks == sum(r.reasks for r in results)
    # rounds: the first batch; b00/b01/b02/b05/b06 retried and b03/b04/b08 re-asked in the second;
    # b01/b06 retried and b08 re-asked in the third
    assert acc.batch_jobs == len({r.batch_id for r in records}) == 3
    counts = emu.stats.by_fault
    assert counts["503"] == 1 + 3 and counts["malformed"] == 1 + 3 and counts["drop"] == 1
    if provider == "openai":
        assert emu.control["files.create"] == emu.control["batches.create"] == 3
        assert emu.control["batches.retrieve"] == 3 * 2  # each batch ended on its second poll
    elif provider == "anthropic":
        assert emu.control["batches.create"] == 3 and emu.control["batches.results"] == 3
    else:  # gemini: the answers come inline with the last poll, nothing to download
        assert emu.control["batches.create"] == 3 and emu.control["batches.retrieve"] == 3 * 2
        assert emu.control["batches.results"] == 0
    for res in results:
        assert SECRET not in (res.error or "") and SECRET not in (res.text or "")
    assert not files_contain(tmp_path, SECRET)


# -- a re-run with the same cache makes no API call --------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_rerun_with_same_cache_makes_no_calls(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt({"r1": ["malformed"], "r2": [503]}), batch_polls=1)
    cache_path = tmp_path / "cache.sqlite"
    prompts = [f"r{i}" for i in range(6)]
    first = service(params(provider, emu), cache_path).run([request(p) for p in prompts], progress=False)
    assert all(r.ok for r in first)
    calls, control = emu.stats.total, dict(emu.control)
    assert calls == len(prompts) + 2  # r1 re-asked once, r2 retried once

    again = service(params(provider, emu), cache_path)
    replay = again.run([request(p) for p in prompts], progress=False)
    assert emu.stats.total == calls and dict(emu.control) == control  # nothing reached the API
    acc = again.accounting
    assert acc.api_calls == 0 and acc.batch_jobs == 0 and acc.batch_control_calls == 0 and acc.cost_usd == 0
    assert acc.cache_hits == len(prompts) + 1  # r1: its first answer and the re-ask's
    assert [r.text for r in replay] == [r.text for r in first]
    assert all(r.ok and r.cached for r in replay) and replay[1].reasks == 1


# -- only cache misses go into the batch ---------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_cache_first_only_misses_are_batched(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply)
    cache_path = tmp_path / "cache.sqlite"
    live = service(params(provider, emu, batch_api=False), cache_path)
    assert all(r.ok for r in live.run([request(f"m{i}") for i in range(0, 8, 2)], progress=False))
    assert emu.stats.total == 4 and not any(r.batch_id for r in emu.stats.snapshot())

    llm = service(params(provider, emu), cache_path)
    results = llm.run([request(f"m{i}") for i in range(8)], progress=False)
    assert all(r.ok for r in results)
    batched = [r for r in emu.stats.snapshot() if r.batch_id]
    assert sorted(r.prompt for r in batched) == [f"m{i}" for i in range(1, 8, 2)]
    assert llm.accounting.cache_hits == 4 and llm.accounting.api_calls == 4 and llm.accounting.batch_jobs == 1
    assert [r.cached for r in results] == [True, False] * 4


# -- cost: same tokens as live calls, half the price ---------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_cost_is_half_the_live_cost(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply)
    reqs = [request(f"cost question number {i}: " + "words " * i) for i in range(10)]
    live = service(params(provider, emu, batch_api=False), tmp_path / "live.sqlite")
    batch = service(params(provider, emu), tmp_path / "batch.sqlite")
    assert all(r.ok for r in live.run(reqs, progress=False))
    assert all(r.ok for r in batch.run(reqs, progress=False))
    a, b = live.accounting, batch.accounting
    assert (a.input_tokens, a.output_tokens, a.api_calls) == (b.input_tokens, b.output_tokens, b.api_calls)
    expected_live = (a.input_tokens * 3.0 + a.output_tokens * 15.0) / 1e6
    assert a.cost_usd == pytest.approx(expected_live) and a.cost_usd > 0
    assert b.cost_usd == pytest.approx(expected_live * 0.5)
    assert b.as_dict()["batch_discount"] == 0.5 and b.as_dict()["batch_jobs"] == 1


# -- a batch still running when the run stops is read back by the next run, not paid twice ------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_unfinished_batch_is_resumed_not_resubmitted(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, batch_polls=6)
    cache_path = tmp_path / "cache.sqlite"
    prompts = [f"u{i}" for i in range(5)]
    cut_short = service(params(provider, emu), cache_path, poll_s=0.01, max_wait_s=0.02)
    first = cut_short.run([request(p) for p in prompts], progress=False)
    assert all(not r.ok and "still running" in r.error and "next run reads it back" in r.error for r in first)
    assert emu.control["batches.create"] == 1 and emu.stats.total == 0  # not run yet

    later = service(params(provider, emu), cache_path, poll_s=0.01)
    second = later.run([request(p) for p in prompts], progress=False)
    assert all(r.ok for r in second) and [r.parsed["answer"] for r in second] == prompts
    assert emu.control["batches.create"] == 1  # no second batch
    assert emu.stats.total == len(prompts)  # each request ran (and was billed) once
    assert later.accounting.batch_jobs == 0 and later.accounting.batch_jobs_resumed == 1
    assert later.accounting.api_calls == len(prompts)
    third = service(params(provider, emu), cache_path).run([request(p) for p in prompts], progress=False)
    assert all(r.ok and r.cached for r in third) and emu.control["batches.create"] == 1


@pytest.mark.parametrize("provider", PROVIDERS)
def test_unfinished_batch_the_provider_forgot_is_sent_again(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, batch_polls=6)
    cache_path = tmp_path / "cache.sqlite"
    cut_short = service(params(provider, emu), cache_path, poll_s=0.01, max_wait_s=0.02)
    assert not any(r.ok for r in cut_short.run([request("f0"), request("f1")], progress=False))
    emu.batches.clear()  # the provider answers 404 for it now
    emu.batch_polls = 0
    later = service(params(provider, emu), cache_path)
    results = later.run([request("f0"), request("f1")], progress=False)
    assert all(r.ok and r.retries == 1 for r in results)
    assert emu.control["batches.create"] == 2 and emu.stats.total == 2
    assert later.accounting.batch_jobs_resumed == 1 and later.accounting.batch_jobs == 1


# -- control calls (upload, create, poll, download) are retried; a batch failing as a whole fails its items
@pytest.mark.parametrize("provider", PROVIDERS)
def test_control_call_faults_are_retried(provider, emulator_factory, tmp_path):
    faults = {("files.create", 1): Fault.rate_limit(retry_after=0), ("batches.create", 1): 503,
              ("batches.retrieve", 1): 500, ("files.content", 1): 502, ("batches.results", 1): 529}
    emu = emulator_factory(provider, reply=good_reply, batch_polls=1, control_policy=lambda op, n: faults.get((op, n)))
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    results = llm.run([request(f"c{i}") for i in range(3)], progress=False)
    assert all(r.ok for r in results), [r.error for r in results]
    assert emu.stats.total == 3 and llm.accounting.batch_jobs == 1 and emu.control["batches.create"] == 2
    assert llm.accounting.batch_control_calls == sum(emu.control.values())


def test_openai_batch_that_fails_validation_fails_its_items(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=good_reply)
    emu._read_lines = lambda data: ([], [{"code": "invalid_request", "message": "line is not valid", "param": None, "line": 1}])
    llm = service(params("openai", emu), tmp_path / "cache.sqlite")
    results = llm.run([request("v0"), request("v1")], progress=False)
    assert all(not r.ok and "failed: line 1: line is not valid" in r.error for r in results)
    assert emu.stats.total == 0 and emu.control["batches.create"] == 1  # refused as a whole: not resubmitted


@pytest.mark.parametrize("provider", PROVIDERS)
def test_wrong_key_fails_items_without_leaking_it(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, api_key="sk-the-right-one", echo_key_in_errors=True)
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    results = llm.run([request("k0"), request("k1")], progress=False)
    assert all(not r.ok and "batch not created: 401" in r.error and "***" in r.error for r in results)
    assert sum(emu.control.values()) == 1  # a 401 is not retried
    assert SECRET not in json.dumps([r.error for r in results]) + json.dumps(llm.accounting.as_dict())
    assert not files_contain(tmp_path, SECRET)


def test_batch_api_needs_a_backend_with_one(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=good_reply)
    llm = service(params("openai", emu), tmp_path / "cache.sqlite")
    llm.backend = Backend(llm.cfg)  # a backend without a batch API (the local stand-in has none)
    with pytest.raises(UserError, match="batch_api is available for the openai, anthropic and gemini backends only"):
        llm.run([request("g")], progress=False)
    assert emu.stats.total == 0


@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_request_shape(provider, emulator_factory, tmp_path):
    """A batch line is the live request: same body (OpenAI), same params (Anthropic: no sampling)."""
    seen = []
    emu = emulator_factory(provider, reply=lambda ctx: (seen.append(ctx), good_reply(ctx))[1])
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    assert llm.run([request("shape", temperature=0.2)], progress=False)[0].ok
    ctx = seen[0]
    assert ctx.system.startswith("You are a careful assistant.") and ctx.messages == [{"role": "user", "content": "shape"}]
    assert ctx.model == f"{provider}-test-model"
    if provider == "openai":
        assert ctx.body["temperature"] == 0.2 and ctx.body["response_format"]["json_schema"]["schema"] == SCHEMA
    elif provider == "gemini":
        gen = ctx.body["generationConfig"]
        assert gen["temperature"] == 0.2 and gen["responseJsonSchema"] == SCHEMA and gen["responseMimeType"] == "application/json"
    else:
        assert "temperature" not in ctx.body and json.dumps(SCHEMA) in ctx.system


# -- the wait shows the provider's own status ------------------------------------------------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_batch_wait_shows_the_providers_status(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply, batch_polls=2)
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    assert all(r.ok for r in llm.run([request(f"s{i}") for i in range(3)], progress=False))
    (shown,) = llm.backend.batch_progress.values()
    assert shown == {"openai": "completed (3/3 done, 0 failed)", "anthropic": "ended (succeeded 3)",
                     "gemini": "JOB_STATE_SUCCEEDED (3 answered, 0 failed)"}[provider]


# -- a new batch holds only the items that failed or expired, never one already answered -------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_only_failed_or_expired_items_are_sent_again(provider, emulator_factory, tmp_path):
    script = {"x0-server-error": [503], "x1-expired": ["drop"], "x2-rate-limited": ["429"]}
    emu = emulator_factory(provider, reply=good_reply, policy=by_attempt(script), batch_polls=1)
    llm = service(params(provider, emu), tmp_path / "cache.sqlite")
    prompts = list(script) + [f"x{i}-fine" for i in range(3, 8)]
    results = llm.run([request(p) for p in prompts], progress=False)
    assert all(r.ok for r in results), [r.error for r in results]
    first, second = sorted({r.batch_id for r in emu.stats.snapshot()}, key=lambda b: min(
        r.arrived for r in emu.stats.snapshot() if r.batch_id == b))
    sent = {b: sorted(r.prompt for r in emu.stats.snapshot() if r.batch_id == b) for b in (first, second)}
    assert sent[first] == sorted(prompts) and sent[second] == sorted(script)
    assert emu.stats.total == len(prompts) + len(script) == 11 and emu.control["batches.create"] == 2
    assert llm.accounting.retries == 3 and llm.accounting.api_calls == 11


def test_gemini_expired_job_sends_its_requests_again(emulator_factory, tmp_path):
    """A job pending for 48 hours ends JOB_STATE_EXPIRED with no answers: every request goes again, once."""
    emu = emulator_factory("gemini", reply=good_reply, batch_polls=1, expire_batches=1)
    llm = service(params("gemini", emu), tmp_path / "cache.sqlite")
    prompts = [f"e{i}" for i in range(4)]
    results = llm.run([request(p) for p in prompts], progress=False)
    assert all(r.ok and r.retries == 1 and r.api_calls == 2 for r in results)
    assert emu.control["batches.create"] == 2 and emu.stats.total == len(prompts)  # the expired job ran nothing
    assert len({r.batch_id for r in emu.stats.snapshot()}) == 1
    assert llm.accounting.api_calls == 2 * len(prompts) and llm.accounting.batch_jobs == 2


def test_gemini_batch_item_errors_keep_the_grpc_meaning(emulator_factory, tmp_path):
    """An inline answer's error is a google.rpc.Status: INVALID_ARGUMENT fails its item, UNAVAILABLE is sent again."""
    emu = emulator_factory("gemini", reply=good_reply, policy=by_attempt({"g0": [400], "g1": [503, 503, 503]}))
    llm = service(params("gemini", emu, max_retries=1), tmp_path / "cache.sqlite")
    bad, flaky, fine = llm.run([request("g0"), request("g1"), request("g2")], progress=False)
    assert not bad.ok and "refused: batch item INVALID_ARGUMENT" in bad.error and bad.api_calls == 1
    assert not flaky.ok and "gave up after 2 tries: batch item UNAVAILABLE" in flaky.error and flaky.api_calls == 2
    assert fine.ok and emu.stats.total == 4


# -- the spend caps hold for a batch: it takes only what the cap allows at its worst case ------------------
@pytest.mark.parametrize("provider", PROVIDERS)
def test_a_batch_takes_only_what_the_run_cap_allows(provider, emulator_factory, tmp_path):
    emu = emulator_factory(provider, reply=good_reply)
    llm = service(params(provider, emu, price_input_per_mtok=0.0, price_output_per_mtok=1000.0), tmp_path / "cache.sqlite")
    worst = BATCH_DISCOUNT * 64 * 1000.0 / 1e6  # a request's whole max_tokens, at the batch price
    llm.run_max_cost_usd = 3.5 * worst
    with pytest.raises(ServiceStopped) as info:
        llm.run([request(f"cap{i}") for i in range(10)], progress=False)
    assert emu.stats.total == 3 and emu.control["batches.create"] == 1
    assert f"cycle.max_cost_usd = ${3.5 * worst:g}, the run's cap" in str(info.value)
    assert llm.accounting.not_sent == 7 and 0 < llm.cache.spent_usd <= 3.5 * worst


def test_gemini_job_that_fails_as_a_whole_fails_its_items(emulator_factory, tmp_path):
    emu = emulator_factory("gemini", reply=good_reply)

    def fail(state):  # the job fails as a whole: no answers, nothing ran
        state["object"]["metadata"]["state"] = "BATCH_STATE_FAILED"
        state["object"]["done"] = True

    emu._run_batch = fail
    llm = service(params("gemini", emu), tmp_path / "cache.sqlite")
    results = llm.run([request("v0"), request("v1")], progress=False)
    assert all(not r.ok and "failed: no reason given" in r.error for r in results)
    assert emu.stats.total == 0 and emu.control["batches.create"] == 1  # not resubmitted
    assert list(llm.backend.batch_progress.values()) == ["JOB_STATE_FAILED"]
