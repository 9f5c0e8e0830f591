"""Synthesis spend stays bounded when the provider yields little or nothing: a probe round of at most
PROBE_CALLS calls, later rounds at most ×ROUND_GROWTH, answers unusable call after call stop the service
with a line saying what it returned, and a stage with no pair for a task is not DONE."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.llm import client as client_module
from llamaduo_nb.llm.base import Backend, Completion
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.stages import coverage, synthesize


class Stingy(Backend):
    """Answers every synthesis request with JSON; only every `every`-th call (by repeat index) holds a pair."""

    name = "stingy"
    every = 0  # 0: never a pair
    calls: list = []

    async def complete(self, request):
        Stingy.calls.append(request.repeat)
        if Stingy.every and request.repeat % Stingy.every == 0 and len(request.messages) == 2:
            items = [{"instruction": f"Q{request.repeat}?", "response": f"A{request.repeat}."}]
        else:
            items = []  # valid JSON, but the schema wants at least one pair: re-asked, then failed
        return Completion(text=json.dumps({"contents": items}), input_tokens=40, output_tokens=10)


@pytest.fixture
def stingy(monkeypatch):
    Stingy.calls, Stingy.every = [], 0
    monkeypatch.setattr(client_module, "make_backend", lambda cfg: Stingy(cfg))
    return Stingy


def _params(tmp_path, target):
    path = tmp_path / "p.yaml"
    path.write_text(
        "tasks: [closed_qa]\n"
        "service: {backend: openai, model: fake-model, max_retries: 0}\n"  # max_reasks: the API default, 2
        f"synthesize: {{samples_per_task: {target}, pairs_per_call: 5}}\n"
    )
    return load_params(path)


class Unusable(Backend):
    """Answers every request with HTTP 200 and one kind of unusable output."""

    name = "unusable"
    kind = "truncated"
    sent = 0

    async def complete(self, request):
        Unusable.sent += 1
        if Unusable.kind == "truncated":  # JSON cut where the token limit fell
            return Completion(text='{"contents": [{"instruction": "What is the capital of Fr', input_tokens=40,
                              output_tokens=request.max_tokens, finish_reason="length")
        text = {"prose": "Here are some new examples of closed questions about history and science.",
                "refusal": "I'm sorry, but I can't help with creating that content.",
                "empty": json.dumps({"contents": []})}[Unusable.kind]
        return Completion(text=text, input_tokens=40, output_tokens=20, finish_reason="stop")


@pytest.mark.parametrize("kind, says", [
    ("truncated", "answers cut at the token limit: raise synthesize.max_new_tokens (now 64)"),
    ("prose", "answers are not JSON: «Here are some new examples"),
    ("refusal", "the provider refuses: «I'm sorry, but I can't help"),
    ("empty", "answers do not follow the requested format: schema: contents"),
])
def test_a_large_target_with_unusable_answers_stops_within_a_few_dozen_requests(tmp_path, monkeypatch, kind, says):
    Unusable.kind, Unusable.sent = kind, 0
    monkeypatch.setattr(client_module, "make_backend", lambda cfg: Unusable(cfg))
    path = tmp_path / "p.yaml"
    path.write_text("tasks: [closed_qa]\nservice: {backend: openai, model: fake-model, max_retries: 0}\n"
                    "synthesize: {samples_per_task: 5000, pairs_per_call: 5, max_new_tokens: 64}\n")
    params = load_params(path)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    with pytest.raises(UserError) as info:
        synthesize.run(params, run_dir)
    message = str(info.value)
    assert Unusable.sent <= 60, Unusable.sent  # a few dozen (was 8,826)
    assert "5 answers in a row were unusable" in message and says in message, message
    assert not (run_dir / "synthesize" / "DONE.json").exists()


def test_the_first_round_is_a_probe(tmp_path, stingy):
    stingy.every = 1  # every call yields a pair
    params = _params(tmp_path, 5000)
    params.synthesize.max_rounds = 1
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    assert len(stingy.calls) == synthesize.PROBE_CALLS and result.counts["pairs"] == synthesize.PROBE_CALLS


def test_rounds_grow_at_most_fourfold(tmp_path, stingy):
    stingy.every = 2  # one pair per two calls; never 5 unusable calls in a row, half of them: not stopped
    params = _params(tmp_path, 40)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    per_round = Counter(c["round"] for c in calls)
    rounds = [per_round[r] for r in sorted(per_round)]
    # ceil(40 / 4.25) = 10; then the shortfall of 35 at 0.5 pairs per call wants 70, at most 4 × 10; then 15 / 0.5
    assert rounds == [10, 40, 30]
    assert result.counts["pairs"] == sum(c["pairs"] for c in calls) == 40
    assert result.counts["short_tasks"] == "none"


def test_a_round_without_pairs_ends_the_tasks_rounds(tmp_path, stingy, monkeypatch, capsys):
    monkeypatch.setattr(client_module, "UNUSABLE_IN_A_ROW", 10**6)  # the stage's own rule, without the call path's breaker
    monkeypatch.setattr(client_module, "UNUSABLE_MIN", 10**6)
    params = _params(tmp_path, 200)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    with pytest.raises(UserError) as info:
        synthesize.run(params, run_dir)
    assert len(set(stingy.calls)) == synthesize.PROBE_CALLS and len(stingy.calls) == synthesize.PROBE_CALLS * 3  # 2 re-asks each
    assert "no valid pair for closed_qa" in str(info.value) and "round 1 gave no valid pair from 20 calls" in str(info.value)
    assert "no more rounds" in capsys.readouterr().out
    assert not (run_dir / "synthesize" / "DONE.json").exists()


def test_calls_needed():
    assert synthesize.calls_needed(100, 5, 0.1) == synthesize.PROBE_CALLS  # the probe
    assert synthesize.calls_needed(10, 5, 4.25) == 3
    assert synthesize.calls_needed(100, 5, 0.1, previous=30) == 120
    assert synthesize.calls_needed(10, 5, 4.0, previous=30) == 3
    assert synthesize.calls_needed(10, 5, 0.0, previous=7) == 28


def test_a_small_round_without_pairs_is_chance_and_the_task_goes_on(tmp_path, monkeypatch):
    """A one-call top-up that fails (the local stand-in's answers are invalid one time in five) does not end a
    task short of its target; only a round of EMPTY_ROUND_CALLS calls or more without a pair does."""

    class OneBad(Stingy):
        async def complete(self, request):
            items = [] if request.repeat == 1 else [{"instruction": f"Q{request.repeat}?", "response": f"A{request.repeat}."}]
            return Completion(text=json.dumps({"contents": items}), input_tokens=40, output_tokens=10)

    monkeypatch.setattr(client_module, "make_backend", lambda cfg: OneBad(cfg))
    params = _params(tmp_path, 2)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    assert [c["round"] for c in calls] == [1, 2, 3, 3]  # 1 call, the failed top-up of 1, then 2 at the yield seen
    assert result.counts["short_tasks"] == "none" and result.counts["pairs"] == 3
