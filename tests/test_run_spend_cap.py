"""The run-wide spend cap (`cycle.max_cost_usd`) holds while calls are in flight.

Every paid answer's cost goes into the run's response cache (its spend ledger) with the answer, so
the cap counts what earlier stages, cycles and runs paid. Before each request the call path checks
the spend so far, plus the worst case of the requests in flight and of this one, against the cap;
when it could pass, nothing more is sent and the stage stops with one line naming the cap (exit 2).
A re-run with a higher cap resumes from the cache. Against the OpenAI emulator (the real SDK).
"""

from __future__ import annotations

import json
import math

import pytest

from llamaduo_nb import cli
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.llm.common import ServiceStopped
from llamaduo_nb.pipeline import cycle, runner
from llamaduo_nb.core.params import ServiceParams
from tests.test_service_pipeline import service_reply

pytestmark = pytest.mark.emulator

KEY = "sk-test-RUNCAP-4321"
KEY_ENV = "LLAMADUO_RUNCAP_KEY"
PRICE_OUT = 1000.0  # USD per million output tokens: a few cents a call, so a small cap stops a run quickly
SCHEMA = {"type": "object", "required": ["score"], "properties": {"score": {"type": "integer"}}}
PAD = "x" * 120


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


async def _no_sleep(_):
    return None


def judge_reply(ctx) -> str:
    return json.dumps({"score": 7, "pad": PAD})  # the same length every time: the same cost


def service(emu, cache: ResponseCache, run_cap: float | None) -> ServiceLLM:
    cfg = ServiceParams(backend="openai", model="gpt-4o", base_url=emu.url, api_key_env=KEY_ENV, timeout_s=5.0,
                        max_retries=0, max_concurrency=1, price_output_per_mtok=PRICE_OUT)
    return ServiceLLM(cfg, cache, sleep=_no_sleep, run_max_cost_usd=run_cap)


def requests(n: int, start: int = 0) -> list[ChatRequest]:
    return [ChatRequest(messages=({"role": "user", "content": f"prompt {i}"},), json_schema=SCHEMA, max_tokens=64)
            for i in range(start, start + n)]


def test_the_run_cap_counts_what_earlier_stages_paid(emulator_factory, tmp_path):
    emu = emulator_factory("openai", reply=judge_reply)
    path = tmp_path / "llm.sqlite"
    one = len(judge_reply(None)) // 4 * PRICE_OUT / 1e6  # what one answer costs (the emulator's token count)
    worst = 64 * PRICE_OUT / 1e6  # what the next request could cost at most: its whole max_tokens
    cap = 10.5 * one

    earlier = service(emu, ResponseCache(path), cap)  # an earlier stage: 4 answers paid
    assert all(r.ok for r in earlier.run(requests(4), progress=False))
    assert earlier.cache.spent_usd == pytest.approx(4 * one)

    later = service(emu, ResponseCache(path), cap)  # a later stage, in another process: the ledger is on disk
    assert later.cache.spent_usd == pytest.approx(4 * one)
    with pytest.raises(ServiceStopped) as info:
        later.run(requests(40, start=100), progress=False)
    message = str(info.value)
    allowed = 4 + math.floor((cap - worst - 4 * one) / one) + 1  # sent while spent + the worst case fit under the cap
    assert emu.stats.total == allowed == 9 and later.cache.spent_usd <= cap
    assert later.accounting.api_calls == allowed - 4 and later.accounting.not_sent == 40 - (allowed - 4)
    assert info.value.exit_code == 2 and "\n" not in message
    assert f"cycle.max_cost_usd = ${cap:g}, the run's cap" in message
    assert f"spent ${9 * one:.4f} in this run so far" in message and "a re-run with a higher cap resumes" in message

    resumed = service(emu, ResponseCache(path), 100 * cap)  # the same stage again, with a higher cap
    results = resumed.run(requests(40, start=100), progress=False)
    assert all(r.ok for r in results)
    assert resumed.accounting.cache_hits == 5 and emu.stats.total == 9 + 35  # nothing paid twice
    assert resumed.cache.spent_usd == pytest.approx(44 * one)


TINY = """\
run_name: capped
tasks: [closed_qa]
coverage: {{source: bundled, max_test_prompts: 1}}
service: {{backend: openai, model: gpt-4o, base_url: "{url}", api_key_env: {key_env}, max_retries: 0, max_concurrency: 1,
          price_output_per_mtok: {price}}}
synthesize: {{samples_per_task: 20, pairs_per_call: 2, max_new_tokens: 128}}
finetune: {{base_models: [smollm2-135m-instruct], volumes: [2], quantization: none}}
cycle: {{max_cost_usd: {cap}}}
"""


def test_llamaduo_run_stops_at_the_run_cap_and_resumes_with_a_higher_one(emulator_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "_execute", runner.execute_in_process)  # stages in this process: seconds, not kernels
    monkeypatch.setattr(runner, "check_notebooks", lambda: None)  # and no notebook is read
    emu = emulator_factory("openai", reply=service_reply, api_key=KEY)
    params = tmp_path / "capped.yaml"
    params.write_text(TINY.format(url=emu.url, key_env=KEY_ENV, price=PRICE_OUT, cap=0.3))
    run_dir = tmp_path / "run"
    args = ["run", str(params), "--run-dir", str(run_dir), "--stages", "coverage,synthesize"]

    assert cli.main(args) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]  # one line (and progress bars)
    assert "cycle.max_cost_usd = $0.3, the run's cap" in err and "in this run so far" in err
    sent = emu.stats.total
    spent = ResponseCache(run_dir / "cache" / "llm.sqlite").spent_usd
    # every answer is paid, the worst case of each is 128 tokens: at least cap / worst of them fit, and never more than the cap
    assert 0 < spent <= 0.3 and math.floor(0.3 / (128 * PRICE_OUT / 1e6)) <= sent < 10
    assert not (run_dir / "synthesize" / "DONE.json").exists()
    assert cycle.run_spend(run_dir) == pytest.approx(spent)  # the stop rule between cycles weighs the same spend

    assert cli.main(args + ["--set", "cycle.max_cost_usd=50"]) == 0
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    assert all(c["ok"] for c in calls) and emu.stats.total == len(calls)  # the calls paid before the stop were not paid again
    assert len(calls) > sent


def test_a_services_stage_cap_is_shared_by_every_client_the_stage_builds(emulator_factory, tmp_path, monkeypatch):
    """Evaluate builds up to four clients for one judge (answers, people's labels, pairwise): one cap for them all."""
    from llamaduo_nb.llm import service_llm
    from llamaduo_nb.core import units
    from llamaduo_nb.core.params import Params

    emu = emulator_factory("openai", reply=judge_reply)
    one = len(judge_reply(None)) // 4 * PRICE_OUT / 1e6
    worst = 64 * PRICE_OUT / 1e6  # no input price: the next request's bound is its max_tokens
    cap = 6.5 * one
    judge = ServiceParams(backend="openai", model="gpt-4o", base_url=emu.url, api_key_env=KEY_ENV, timeout_s=5.0, max_retries=0,
                          max_concurrency=1, price_output_per_mtok=PRICE_OUT, max_cost_usd=cap)
    params = Params(tasks=["closed_qa"], service=judge)
    run_dir = tmp_path / "run"
    monkeypatch.setattr(units, "_executions", {str(run_dir.resolve()): "evaluate@1"})
    scores = service_llm(judge, params, run_dir)  # the judge scoring answers
    assert all(r.ok for r in scores.run(requests(3), progress=False))
    pairwise = service_llm(judge, params, run_dir)  # the same judge again, for pairwise, in the same execution
    with pytest.raises(ServiceStopped) as info:
        pairwise.run(requests(10, start=100), progress=False)
    spent = scores.accounting.cost_usd + pairwise.accounting.cost_usd
    assert spent <= cap and emu.stats.total == 3 + math.floor((cap - worst - 3 * one) / one) + 1
    assert f"service.max_cost_usd = ${cap:g} (spent ${pairwise.ledger.cost_usd:.4f} in this stage" in str(info.value)

    units._executions[str(run_dir.resolve())] = "evaluate@2"  # the next execution of the stage starts a fresh ledger
    assert service_llm(judge, params, run_dir).ledger.cost_usd == 0


@pytest.mark.parametrize("in_flight", [1, 16])  # one at a time: the clients' own caps added up to $1.23; 16: stopped at $0.17
def test_evaluate_with_judge_service_answers_and_pairwise_spends_at_most_the_judges_cap(emulator_factory, tmp_path, in_flight):
    """The evaluate stage builds a client for the judge's scores, the service LLM's answers, the people's labels and
    pairwise; with the service LLM as its own judge, one `service.max_cost_usd` bounds what all of them paid."""
    from llamaduo_nb.core.params import Params
    from llamaduo_nb.stages import evaluate
    from tests.test_service_competitor import answered_run
    from tests.test_service_pipeline import service_reply

    emu = emulator_factory("openai", reply=service_reply, api_key=KEY)
    run_dir = tmp_path / "run"
    answered_run(run_dir, prompts=4, k=2)
    cap = 1.0  # a few dozen of the ~100 calls the stage would make
    params = Params(tasks=["closed_qa"], coverage={"source": "bundled"},
                    service={"backend": "openai", "model": "gpt-4o", "base_url": emu.url, "api_key_env": KEY_ENV, "max_retries": 0,
                             "max_concurrency": in_flight, "price_output_per_mtok": PRICE_OUT, "max_cost_usd": cap},
                    # token limits above the emulator's reply lengths: a real API never bills more than max_tokens, the emulator would
                    infer={"k": 2, "max_new_tokens": 256}, finetune={"base_models": ["smollm2-135m-instruct"], "volumes": [4]},
                    evaluate={"m": 2, "pairwise": True, "reference_metrics": False, "bootstrap": 0, "max_new_tokens": 128},
                    cycle={"target": "precision mean >= service - 5"})
    with pytest.raises(ServiceStopped) as info:
        evaluate.run(params, run_dir)
    spent = ResponseCache(run_dir / "cache" / "llm.sqlite").spent_usd
    print(f"\nevaluate under service.max_cost_usd = ${cap:g}: spent ${spent:.3f} in {emu.stats.total} requests")
    assert cap / 2 < spent <= cap, (spent, cap)  # every client of the stage under the one cap, and the cap is what stopped it
    assert f"service.max_cost_usd = ${cap:g}" in str(info.value) and "in this stage" in str(info.value)
