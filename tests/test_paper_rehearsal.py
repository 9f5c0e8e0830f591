"""The paper's synthesis, rehearsed offline: `params/paper.yaml`'s synthesis settings, scaled down 300× (1,000
pairs per task instead of 300k), against the OpenAI emulator (the real SDK) with latency and failure mixes.

A healthy provider (latency, a few 429s and 503s) is sent at most 1.1× the calls the target needs; a broken one
— a dead key, empty answers, JSON cut at the token limit, prose, refusals, a slow 5xx storm — is stopped within
a few dozen requests, at a target of 5,000 pairs, with one line that says what it returned (exit 2 from the CLI).
Each case prints the requests it cost (`pytest -s`): the numbers of docs/MEASUREMENTS.md.
"""

from __future__ import annotations

import math

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.stages import coverage, synthesize
from tests.emulators.faults import Fault, random_faults
from tests.test_service_pipeline import service_reply

pytestmark = [pytest.mark.long, pytest.mark.emulator]

KEY = "sk-test-REHEARSAL-9876"
KEY_ENV = "LLAMADUO_REHEARSAL_KEY"
SCALE = 300  # the paper's 300k pairs per task / 1,000
PAIRS_PER_CALL = 5  # params/paper.yaml
BROKEN_TARGET = 5000
FEW_DOZEN = 60


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def _params(tmp_path, emu, target: int, tasks=("closed_qa",), **service):
    paper = load_params("params/paper.yaml")
    settings = {"max_concurrency": 16, "timeout_s": 2.0, **service}
    extra = "".join(f", {k}: {v}" for k, v in settings.items())
    path = tmp_path / "rehearsal.yaml"
    path.write_text(
        f"tasks: [{', '.join(tasks)}]\n"
        f"service: {{backend: openai, model: gpt-4o, base_url: '{emu.url}', api_key_env: {KEY_ENV}{extra}}}\n"
        f"synthesize: {{samples_per_task: {target}, pairs_per_call: {paper.synthesize.pairs_per_call}, "
        f"max_new_tokens: {paper.synthesize.max_new_tokens}, temperature: {paper.synthesize.temperature}}}\n"
    )
    assert paper.synthesize.pairs_per_call == PAIRS_PER_CALL and paper.synthesize.samples_per_task == SCALE * 1000
    return load_params(path)


def test_a_healthy_provider_is_sent_at_most_a_tenth_more_than_the_target_needs(emulator_factory, tmp_path):
    faults = random_faults({"429": 0.02, "503": 0.02}, seed=3, max_attempt=3)
    emu = emulator_factory("openai", reply=service_reply, api_key=KEY, latency=(0.002, 0.02), policy=faults)
    target = SCALE * 1000 // SCALE  # 1,000 pairs per task
    params = _params(tmp_path, emu, target, tasks=("closed_qa", "summarization"))
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    needed = 2 * math.ceil(target / PAIRS_PER_CALL)
    rounds = sorted({c["round"] for c in calls})
    print(f"\nhealthy: {len(calls)} calls, {emu.stats.total} requests for {needed} calls needed; rounds {rounds}")
    assert result.counts["pairs"] >= 2 * target and result.counts["short_tasks"] == "none"
    assert len(calls) <= 1.1 * needed and emu.stats.total <= 1.1 * needed


BROKEN = {
    "dead key (401)": (dict(api_key="sk-other"), "401"),
    "empty answers": (dict(policy=lambda ctx: "empty"), "empty"),
    "JSON cut at the token limit": (dict(policy=lambda ctx: "at_limit"), "raise synthesize.max_new_tokens (now 2048)"),
    "prose instead of JSON": (dict(policy=lambda ctx: "malformed"), "answers are not JSON"),
    "refusals": (dict(reply=lambda ctx: "I'm sorry, but I can't help with that request."), "the provider refuses"),
    "slow 5xx storm": (dict(policy=lambda ctx: Fault.error(503), latency=0.05), "503"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_provider_is_stopped_within_a_few_dozen_requests(emulator_factory, tmp_path, case):
    options, says = BROKEN[case]
    options = {"reply": service_reply, "api_key": KEY, **options}
    emu = emulator_factory("openai", **options)
    params = _params(tmp_path, emu, BROKEN_TARGET, max_retries=2)  # 2 retries, not 6: the same stop, in seconds
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    with pytest.raises(UserError) as info:
        synthesize.run(params, run_dir)
    message = str(info.value)
    print(f"\n{case}: {emu.stats.total} requests for a {BROKEN_TARGET:,}-pair target: {message[:220]}")
    assert emu.stats.total <= FEW_DOZEN and says in message and "\n" not in message
    assert not (run_dir / "synthesize" / "DONE.json").exists()
