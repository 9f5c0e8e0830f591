"""The offline stand-in judge carries signal: it ranks the human reference above an unrelated answer."""

import pytest

from llamaduo_nb.stages import coverage

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def judge():
    from llamaduo_nb.llm.local import LocalBackend
    from llamaduo_nb.core.params import ServiceParams

    return LocalBackend(ServiceParams(backend="local", model="smollm2-135m-instruct"))


def test_reference_beats_unrelated_answer_on_bundled_test_prompts(judge):
    rows = [r for r in coverage.read_jsonl(coverage.BUNDLED) if r["split"] == "test"]
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    picked = [r for cat in sorted(by_cat) for r in by_cat[cat][:3]]  # 3 per task: 12 prompts
    wins = {"similarity": 0, "precision": 0}
    for i, row in enumerate(picked):
        instruction, reference = row["messages"][0]["content"], row["messages"][1]["content"]
        # an answer to a prompt of another task: fluent, but unrelated
        unrelated = picked[(i + 3) % len(picked)]["messages"][1]["content"]
        good = judge.judge.judge_scores(instruction, reference, reference)
        bad = judge.judge.judge_scores(instruction, reference, unrelated)
        for metric in wins:
            wins[metric] += good[metric] > bad[metric]
    assert wins["similarity"] >= 10, wins  # "most": at least 10 of 12
    assert wins["precision"] >= 10, wins


def test_partial_answer_lands_between(judge):
    instruction = "Based on the passage, what year was the bridge opened? Passage: The Elm Street bridge, designed by Mara Voss, opened to traffic in 1932 after four years of construction."
    reference = "The bridge opened in 1932."
    close = judge.judge.judge_scores(instruction, reference, "It opened in 1932.")
    off = judge.judge.judge_scores(instruction, reference, "Bananas are rich in potassium and grow in tropical climates.")
    empty = judge.judge.judge_scores(instruction, reference, "")
    assert close["similarity"] > off["similarity"]
    assert close["precision"] > off["precision"]
    assert empty["similarity"] == empty["precision"] == 0


def test_json_contract_via_service_layer(judge, tmp_path):
    from llamaduo_nb.llm.base import ChatRequest
    from llamaduo_nb.llm.cache import ResponseCache
    from llamaduo_nb.llm.client import ServiceLLM
    from llamaduo_nb.core.prompts import load_prompt

    prompt = load_prompt("judge")
    svc = ServiceLLM(judge.config, ResponseCache(tmp_path / "c.sqlite"), backend=judge)
    ins, ref, ans = "Say hi.", "Hi!", "Hello!"
    reqs = [ChatRequest(messages=prompt.messages(instruction=ins, reference=ref, answer=ans), json_schema=prompt.schema,
                        repeat=m, fields=(("instruction", ins), ("reference", ref), ("answer", ans))) for m in range(3)]
    results = svc.run(reqs, progress=False)
    assert all(r.ok for r in results)
    for r in results:
        for key in ("similarity_assessment", "precision_assessment"):
            assert 0 <= r.parsed[key]["score"] <= 100 and r.parsed[key]["reason"]
