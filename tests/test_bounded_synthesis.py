"""Synthesis spend stays bounded when the provider yields little or nothing: rounds grow at most ×2,
a round with no valid pair ends the task's rounds, and a stage with no pair for a task is not DONE."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from llamaduo_nb.errors import UserError
from llamaduo_nb.io import read_jsonl
from llamaduo_nb.llm import client as client_module
from llamaduo_nb.llm.base import Backend, Completion
from llamaduo_nb.pipeline.params_file import load_params
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


def test_a_provider_that_returns_no_pairs_costs_one_round(tmp_path, stingy, capsys):
    params = _params(tmp_path, 200)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    with pytest.raises(UserError) as info:
        synthesize.run(params, run_dir)
    first_round = 48  # ceil(200 / (5 × 0.85))
    assert len(set(stingy.calls)) == first_round and len(stingy.calls) == first_round * 3  # 2 re-asks each
    assert "no valid pair for closed_qa" in str(info.value) and "round 1 gave no valid pair from 48 calls" in str(info.value)
    assert "no more rounds" in capsys.readouterr().out
    assert not (run_dir / "synthesize" / "DONE.json").exists()


def test_rounds_grow_at_most_twofold(tmp_path, stingy):
    stingy.every = 10  # one pair per ten calls: the shortfall would ask for ~10x more
    params = _params(tmp_path, 40)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    per_round = Counter(c["round"] for c in calls)
    rounds = [per_round[r] for r in sorted(per_round)]
    assert rounds == [10, 20, 40, 80]  # ceil(40 / 4.25) = 10, then doubling while the yield stays at 0.1
    assert result.counts["pairs"] == sum(c["pairs"] for c in calls) < 40  # short of the target, said so
    assert result.counts["short_tasks"] == "closed_qa"


def test_calls_needed():
    assert synthesize.calls_needed(100, 5, 0.1) == 1000
    assert synthesize.calls_needed(100, 5, 0.1, previous=30) == 60
    assert synthesize.calls_needed(10, 5, 4.0, previous=30) == 3
    assert synthesize.calls_needed(10, 5, 0.0, previous=7) == 14
