"""Synthesis: rounds until the target of valid pairs, provenance, and resume without paying twice."""

import json

import pytest

from llamaduo_nb.stages import coverage

from llamaduo_nb.stages import synthesize
from llamaduo_nb.llm import client as client_module
from llamaduo_nb.llm.base import Backend, Completion
from llamaduo_nb.core.params_file import load_params


class FakeService(Backend):
    """Answers synthesis prompts; every third call (by repeat index) is cut short (invalid JSON)."""

    name = "fake"
    calls = []

    async def complete(self, request):
        FakeService.calls.append(request.repeat)
        if request.repeat % 3 == 2:
            return Completion(text='{"contents": [{"instruction": "cut', input_tokens=50, output_tokens=9, finish_reason="length")
        n = request.json_schema["properties"]["contents"]["maxItems"]
        items = [{"instruction": f"Question {request.repeat}-{j}?", "response": f"Answer {request.repeat}-{j}."} for j in range(n)]
        return Completion(text=json.dumps({"contents": items}), input_tokens=50, output_tokens=20)


@pytest.fixture
def fake_backend(monkeypatch):
    FakeService.calls = []
    monkeypatch.setattr(client_module, "make_backend", lambda cfg: FakeService(cfg))
    return FakeService


def _params(tmp_path, target):
    path = tmp_path / "p.yaml"
    path.write_text(
        "tasks: [closed_qa, coding]\n"
        "service: {backend: openai, model: fake-model, max_reasks: 0, max_retries: 0}\n"
        f"synthesize: {{samples_per_task: {target}, pairs_per_call: 2, expected_loss: 0.0}}\n"
    )
    return load_params(path)


def test_rounds_reach_the_target_and_record_provenance(tmp_path, fake_backend):
    params = _params(tmp_path, 8)
    run_dir = tmp_path / "run"
    coverage.run(params, run_dir)
    result = synthesize.run(params, run_dir)
    pairs = synthesize.load(run_dir)
    for task in ("closed_qa", "coding"):
        mine = [p for p in pairs if p["task"] == task]
        assert len(mine) >= 8  # 4 calls give 6 pairs (one is cut short), a second round tops up
    assert result.counts["rounds"] == 2 and result.counts["failed_calls"] >= 2
    train_ids = {r["prompt_id"] for r in coverage.load(run_dir, "train")}
    row = pairs[0]
    assert row["seed_prompt_id"] in train_ids
    assert row["service_model"] == "openai:fake-model" and row["prompt"] == "synthesize" and row["prompt_version"] >= 1
    assert row["cycle"] == 1 and len({p["id"] for p in pairs}) == len(pairs)
    from datasets import load_dataset

    loaded = load_dataset("json", data_files=str(run_dir / "synthesize" / "pairs.jsonl"), split="train")
    assert loaded.num_rows == len(pairs) and {"instruction", "response", "seed_prompt_id"} <= set(loaded.column_names)
    calls = [json.loads(line) for line in (run_dir / "synthesize" / "calls.jsonl").read_text().splitlines()]
    assert any(not c["ok"] and c["error"] for c in calls)  # failures kept with their reason


def test_resume_pays_only_for_what_is_missing(tmp_path, fake_backend):
    run_dir = tmp_path / "run"
    params = _params(tmp_path, 6)
    coverage.run(params, run_dir)
    synthesize.run(params, run_dir)
    first = len(fake_backend.calls)
    synthesize.run(params, run_dir, force=True)  # same requests: all from the cache
    assert len(fake_backend.calls) == first
    bigger = _params(tmp_path, 12)
    synthesize.run(bigger, run_dir)
    new_calls = fake_backend.calls[first:]
    assert new_calls and min(new_calls) >= first // 2  # only calls beyond those already made per task
    assert len(synthesize.load(run_dir)) >= 24


def test_same_call_index_same_seed(tmp_path):
    params = _params(tmp_path, 4)
    coverage.run(params, tmp_path / "run")
    seeds = [r for r in coverage.load(tmp_path / "run", "train") if r["task"] == "coding"]
    from llamaduo_nb.core.prompts import load_prompt

    prompt = load_prompt("synthesize")
    a = synthesize.request_for(params, prompt, None, seeds, "coding", 5)
    b = synthesize.request_for(params, prompt, None, list(reversed(seeds))[::-1], "coding", 5)
    assert a[0] == b[0] and a[1] == b[1]
    assert "programming request" in a[1].messages[-1]["content"]  # the task's own guidance
