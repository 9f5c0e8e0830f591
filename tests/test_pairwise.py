"""Pairwise comparison (MT-Bench style) with in-memory judges: position bias, errors, the summary."""

import json
import re

import pandas as pd
import pytest

import llamaduo_nb.llm

from llamaduo_nb.stages.evaluate import competitor, judging, pairwise_verdicts
from llamaduo_nb import figures
from llamaduo_nb.stages import evaluate

from llamaduo_nb.methods import pairwise
from llamaduo_nb.llm.base import Backend, ChatRequest, ChatResult, Completion
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm import client as llm_client
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.core.params import Params, ServiceParams


class JudgeBackend(Backend):
    """An in-memory judge: `decide(answer_a, answer_b, request)` returns the reply text."""

    name = "fake"

    def __init__(self, decide):
        super().__init__(None)
        self.decide = decide
        self.calls = []

    async def complete(self, request):
        self.calls.append(request)
        text = request.messages[-1]["content"]
        a = re.search(r"\[Response A\]\n(.*?)\n\[End of response A\]", text, re.S).group(1)
        b = re.search(r"\[Response B\]\n(.*?)\n\[End of response B\]", text, re.S).group(1)
        return Completion(text=self.decide(a, b, request), input_tokens=20, output_tokens=8)


def verdict(winner):
    return json.dumps({"winner": winner, "reason": "because"})


def first_always(a, b, request):  # a judge with a pure position bias
    return verdict("A")


def longer_wins(a, b, request):  # a position-consistent judge
    return verdict("tie" if len(a) == len(b) else ("A" if len(a) > len(b) else "B"))


REFERENCES = {
    "p1": {"instruction": "Summarise: the cat sat on the mat.", "reference": "A cat sat on a mat."},
    "p2": {"instruction": "When did the bridge open? It opened in 1932.", "reference": "In 1932."},
}


def responses(identical=False):
    rows = []
    for pid in REFERENCES:
        for k in range(2):
            base = f"base answer {pid}/{k}"
            rows.append({"task": "summarization", "local_model": "tiny", "volume": 0, "prompt_id": pid, "k": k, "response": base})
            for volume in (4, 16):
                tuned = base if identical else f"a much longer tuned answer {pid}/{k} v{volume}"
                rows.append({"task": "summarization", "local_model": "tiny", "volume": volume, "prompt_id": pid, "k": k, "response": tuned})
    return pd.DataFrame(rows)


def _params(**evaluate):
    return Params(evaluate={"pairwise": True, **evaluate}, service={"backend": "openai", "model": "fake-judge", "max_reasks": 0, "max_retries": 0})


def _service(tmp_path, params, backend):
    async def no_sleep(_):
        return None

    return ServiceLLM(params.judges[0], ResponseCache(tmp_path / "c.sqlite"), backend=backend, sleep=no_sleep)


def _judge(tmp_path, decide, resp=None, **evaluate):
    params = _params(**evaluate)
    backend = JudgeBackend(decide)
    rows = pairwise_verdicts.judge_pairs(params, params.judges[0], responses() if resp is None else resp, REFERENCES, _service(tmp_path, params, backend))
    return pd.DataFrame(rows), backend


def test_every_pair_is_judged_in_both_orders(tmp_path):
    rows, backend = _judge(tmp_path, longer_wins)
    assert len(rows) == 2 * 2 * 2 * 2  # prompts × k × tuned volumes × orders
    assert len(backend.calls) == len(rows)
    assert set(rows["order"]) == {"AB", "BA"}
    ab = backend.calls[0].messages[-1]["content"]
    ba = backend.calls[1].messages[-1]["content"]
    assert "[Response A]\na much longer tuned answer p1/0 v4" in ab and "[Response B]\nbase answer p1/0" in ab
    assert "[Response A]\nbase answer p1/0" in ba and "[Response B]\na much longer tuned answer p1/0 v4" in ba
    assert "A cat sat on a mat." in ab  # reference-guided
    assert all(c.temperature == 0.0 for c in backend.calls)
    assert dict(backend.calls[0].fields)["answer_a"] == "a much longer tuned answer p1/0 v4"  # the template's fields ride along
    # the baseline is the base model's answer to the same prompt and k
    assert set(rows["baseline_volume"]) == {0} and set(rows["volume"]) == {4, 16}


def test_a_consistent_judge(tmp_path):
    rows, _ = _judge(tmp_path, longer_wins)
    assert (rows["outcome"] == "win").all()  # the tuned answers are the longer ones, whatever their position
    s = pairwise.summarise(rows)
    assert len(s) == 2  # one row per volume
    assert (s["win"] == 100).all() and (s["loss"] == 0).all() and (s["tie"] == 0).all()
    assert (s["position_inconsistency"] == 0).all() and (s["consistent_win"] == 100).all()
    assert (s["first_position_preference"] == 50).all()
    assert (s["compared_pairs"] == 4).all() and (s["errors"] == 0).all()


def test_position_bias_is_detected(tmp_path):
    rows, _ = _judge(tmp_path, first_always)
    s = pairwise.summarise(rows)
    assert (s["position_inconsistency"] == 100).all()
    assert (s["win"] == 50).all() and (s["loss"] == 50).all()
    assert (s["consistent_tie"] == 100).all() and (s["consistent_win"] == 0).all()  # inconsistent -> tie (MT-Bench)
    assert (s["first_position_preference"] == 100).all()


def test_identical_answers_are_not_sent_and_not_counted_as_inconsistent(tmp_path):
    resp = responses()
    mask = (resp["volume"] == 4) & (resp["prompt_id"] == "p1")
    resp.loc[mask, "response"] = resp.loc[mask].apply(lambda r: f"base answer {r.prompt_id}/{r.k}", axis=1)
    rows, backend = _judge(tmp_path, first_always, resp=resp)
    assert len(backend.calls) == 16 - 4  # 2 identical pairs × 2 orders not sent
    same = rows[rows["identical"]]
    assert len(same) == 4 and (same["verdict"] == "tie").all() and same["valid"].all()
    s = pairwise.summarise(rows).set_index("volume")
    assert s.loc[4, "identical_pairs"] == 2 and s.loc[4, "compared_pairs"] == 2
    assert s.loc[4, "position_inconsistency"] == 100  # every pair whose answers differ flips
    assert s.loc[4, "tie"] == 50  # identical pairs are ties in both orders


def test_unparsable_verdicts_are_the_error_sentinel_counted_not_raised(tmp_path):
    replies = iter(["not json at all", verdict("C"), verdict("A"), verdict("B")] * 4)
    rows, _ = _judge(tmp_path, lambda a, b, r: next(replies))
    assert set(rows["verdict"]) == {"error", "A", "B"}
    errors = rows[rows["verdict"] == "error"]
    assert len(errors) == 8 and (errors["outcome"] == "error").all() and (~errors["valid"]).all()
    assert errors["error"].notna().all()
    s = pairwise.summarise(rows)
    assert s["errors"].sum() == 8 and (s["error_share"] == 50).all()
    # shares are of valid verdicts; pairs with an error are not compared
    assert ((s["win"] + s["tie"] + s["loss"]).round(6) == 100).all()
    p2 = rows[rows["prompt_id"] == "p2"]
    assert p2["valid"].sum() == 4


def test_parse_verdict():
    ok = lambda parsed, text=None: ChatResult(ok=True, parsed=parsed, text=text)  # noqa: E731
    assert pairwise.parse_verdict(ok({"winner": "A", "reason": "r"})) == ("A", "r")
    assert pairwise.parse_verdict(ok({"winner": "b"}))[0] == "B"
    assert pairwise.parse_verdict(ok({"winner": " Tie "}))[0] == "tie"
    assert pairwise.parse_verdict(ok({"winner": "C"}))[0] == "error"
    assert pairwise.parse_verdict(ok({"reason": "no winner"}))[0] == "error"
    assert pairwise.parse_verdict(ok(["A"]))[0] == "error"
    assert pairwise.parse_verdict(ok(None, 'Verdict: {"winner": "B", "reason": "x"}')) == ("B", "x")
    assert pairwise.parse_verdict(ok(None, "A is better"))[0] == "error"
    assert pairwise.parse_verdict(ChatResult(ok=False, error="gave up"))[0] == "error"
    assert pairwise.parse_verdict(None)[0] == "error"


def test_outcome_from_the_tuned_models_side():
    assert pairwise.outcome("A", "A") == "win" and pairwise.outcome("B", "A") == "loss"
    assert pairwise.outcome("B", "B") == "win" and pairwise.outcome("A", "B") == "loss"
    assert pairwise.outcome("tie", "B") == "tie" and pairwise.outcome("error", "A") == "error"


def test_summary_on_hand_made_verdicts():
    def v(pid, order, verdict, volume=8):
        local = "A" if order == "AB" else "B"
        return {"cycle": 1, "task": "t", "local_model": "m", "judge": "j", "volume": volume, "baseline_volume": 0,
                "prompt_id": pid, "k": 0, "order": order, "local_position": local, "identical": False,
                "verdict": verdict, "outcome": pairwise.outcome(verdict, local), "valid": verdict != "error"}

    rows = pd.DataFrame([
        v("a", "AB", "A"), v("a", "BA", "B"),      # win, win: consistent win
        v("b", "AB", "tie"), v("b", "BA", "A"),    # tie, loss: inconsistent -> tie
        v("c", "AB", "B"), v("c", "BA", "A"),      # loss, loss: consistent loss
        v("d", "AB", "error"), v("d", "BA", "A"),  # error: not compared
    ])
    s = pairwise.summarise(rows).iloc[0]
    assert (s["pairs"], s["judgements"], s["errors"]) == (4, 8, 1)
    assert s["win"] == pytest.approx(100 * 2 / 7) and s["tie"] == pytest.approx(100 / 7) and s["loss"] == pytest.approx(100 * 4 / 7)
    assert s["compared_pairs"] == 3 and s["position_inconsistency"] == pytest.approx(100 / 3)
    assert (s["consistent_win"], s["consistent_tie"], s["consistent_loss"]) == pytest.approx((100 / 3, 100 / 3, 100 / 3))
    assert s["first_position_preference"] == pytest.approx(100 * 4 / 6)  # A in a/AB, b/BA, c/BA, d/BA of 6 A-or-B verdicts
    assert pairwise.summarise(pd.DataFrame()).empty


def test_run_writes_both_files_and_keeps_them_out_of_the_judgements(tmp_path):
    run_dir = tmp_path / "run"
    params = _params()
    backend = JudgeBackend(first_always)
    summary, accounting = pairwise_verdicts.run_pairwise(params, run_dir, responses(), REFERENCES, lambda j: _service(tmp_path, params, backend))
    summary_file = pairwise_verdicts.pairwise_summary_file(run_dir)
    assert pairwise_verdicts.pairwise_file(run_dir).exists() and summary_file == run_dir / "evaluate" / "pairwise.csv"
    assert list(pd.read_csv(summary_file).columns) == pairwise.SUMMARY_COLUMNS
    assert accounting["openai:fake-judge (pairwise)"]["requests"] == 16
    assert evaluate.load_pairwise(run_dir).empty  # the run's tables show a cycle once its evaluate has finished
    (run_dir / "evaluate" / "DONE.json").write_text("{}")
    assert len(evaluate.load_verdicts(run_dir)) == 16 and len(evaluate.load_pairwise(run_dir)) == 2
    # a single-answer judgement file beside it: load_judgements reads only that one
    (run_dir / "evaluate" / "openai_fake-judge.jsonl").write_text(json.dumps({"valid": True, "similarity": 1}) + "\n")
    assert len(evaluate.load_judgements(run_dir)) == 1
    # a judge named "pairwise" does not overwrite the verdicts
    assert judging.judge_file(run_dir, ServiceParams(name="pairwise")).name != "pairwise.jsonl"


def test_requests_carry_both_answers_in_their_fields():
    params = Params(evaluate={"pairwise": True}, service={"backend": "local", "model": "smollm2-135m-instruct"})
    jobs = pairwise.build_requests(params, params.judges[0], responses(), REFERENCES)
    meta, req = jobs[1]  # order BA
    assert meta["order"] == "BA" and dict(req.fields) == {
        "instruction": REFERENCES["p1"]["instruction"], "reference": REFERENCES["p1"]["reference"],
        "answer_a": "base answer p1/0", "answer_b": "a much longer tuned answer p1/0 v4"}


def _stub_local(scores):
    """A LocalBackend without a model: judge_scores looked up from `scores` (answer -> (similarity, precision))."""
    from llamaduo_nb.llm.local import LocalBackend

    from llamaduo_nb.llm.likelihood_judge import LikelihoodJudge

    backend = object.__new__(LocalBackend)
    backend.judge = object.__new__(LikelihoodJudge)
    backend.judge.judge_scores = lambda ins, ref, ans: dict(zip(("similarity", "precision"), scores[ans]))
    return backend


def _fields(*answers):
    names = ("answer",) if len(answers) == 1 else ("answer_a", "answer_b")
    return (("instruction", "i"), ("reference", "r")) + tuple(zip(names, answers))


@pytest.mark.parametrize("a_scores,b_scores,expected", [
    ((80, 70), (40, 30), "A"), ((10, 20), (50, 50), "B"), ((50, 50), (49, 50), "tie"), ((50, 50), (48, 50), "tie"),
    ((50, 50), (47, 50), "A"),
])
def test_local_likelihood_pairwise_verdict(a_scores, b_scores, expected):
    backend = _stub_local({"x": a_scores, "y": b_scores})
    ab = json.loads(backend._judge(ChatRequest(messages=(), fields=_fields("x", "y"))).text)
    ba = json.loads(backend._judge(ChatRequest(messages=(), fields=_fields("y", "x"))).text)
    assert ab["winner"] == expected and ab["reason"]
    import jsonschema

    jsonschema.validate(ab, pairwise.load_pairwise_prompt("pairwise").schema)  # passes the service layer's check
    assert ba["winner"] == {"A": "B", "B": "A", "tie": "tie"}[expected]  # no position bias by construction


def test_local_single_answer_judging_is_unchanged():
    backend = _stub_local({"x": (80, 70)})
    backend.judge.judge_scores = lambda ins, ref, ans: {"similarity": 80, "precision": 70, "similarity_raw": 0.8, "precision_raw": 0.7}
    body = json.loads(backend._judge(ChatRequest(messages=(), fields=_fields("x"))).text)
    assert body["similarity_assessment"]["score"] == 80 and body["precision_assessment"]["score"] == 70


def test_pairwise_prompt_contract():
    import jsonschema

    prompt = pairwise.load_pairwise_prompt("pairwise")
    msgs = prompt.messages(instruction="I", reference="R", answer_a="AAA", answer_b="BBB")
    assert "AAA" in msgs[-1]["content"] and "BBB" in msgs[-1]["content"] and '"winner"' in msgs[-1]["content"]
    jsonschema.validate({"winner": "tie", "reason": "same"}, prompt.schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"winner": "C", "reason": "?"}, prompt.schema)
    from llamaduo_nb.core.errors import UserError

    with pytest.raises(UserError):
        pairwise.load_pairwise_prompt("no_such_prompt")


class BothJudge(Backend):
    """Answers the single-answer judge (score = answer length, capped) and the pairwise judge (the longer wins)."""

    name = "fake"

    async def complete(self, request):
        text = request.messages[-1]["content"]
        if "winner" in json.dumps(request.json_schema):
            a = re.search(r"\[Response A\]\n(.*?)\n\[End of response A\]", text, re.S).group(1)
            b = re.search(r"\[Response B\]\n(.*?)\n\[End of response B\]", text, re.S).group(1)
            return Completion(text=longer_wins(a, b, request))
        if request.json_schema is None:  # the service LLM answering a test prompt as a competitor
            return Completion(text=f"the service LLM's own fairly long answer #{request.repeat}")
        answer = text.split("Generated response:\n", 1)[1].split("\n\nGrade", 1)[0]
        score = min(100, 3 * len(answer))
        return Completion(text=json.dumps({"similarity_assessment": {"score": score, "reason": "r"},
                                           "precision_assessment": {"score": 100 - score, "reason": "r"}}))


def test_evaluate_stage_writes_every_output_without_a_model(tmp_path, monkeypatch):
    from llamaduo_nb.methods import reference_metrics
    from llamaduo_nb.core.io import write_json, write_jsonl
    from llamaduo_nb.core.units import stage_dir

    run_dir = tmp_path / "run"
    write_jsonl(stage_dir(run_dir, "coverage") / "test.jsonl",
                [dict(v, prompt_id=k, task="summarization", split="test") for k, v in REFERENCES.items()])
    resp = responses()
    answer_files = []
    for (task, model, volume), rows in resp.groupby(["task", "local_model", "volume"]):
        write_jsonl(stage_dir(run_dir, "infer") / task / model / f"{volume}.jsonl", rows.to_dict("records"))
        answer_files.append(f"{task}/{model}/{volume}.jsonl")
    write_json(stage_dir(run_dir, "coverage") / "DONE.json", {"stage": "coverage", "content": "c"})
    write_json(stage_dir(run_dir, "infer") / "DONE.json", {"stage": "infer", "content": "i", "outputs": answer_files})

    class Service(ServiceLLM):
        def __init__(self, cfg, cache, backend=None, sleep=None, **caps):
            super().__init__(cfg, cache, backend=backend or BothJudge(cfg), **caps)

    monkeypatch.setattr(llamaduo_nb.llm, "ServiceLLM", Service)  # where the stages' service_llm finds it
    monkeypatch.setattr(reference_metrics, "load_embedding_model", lambda: None)  # no MiniLM here: embedding column empty
    params = Params(tasks=["summarization"], evaluate={"m": 2, "pairwise": True, "bootstrap": 50}, infer={"k": 2},
                    service={"backend": "openai", "model": "fake-judge"})
    result = evaluate.run(params, run_dir)
    # 2 prompts × K 2 × volumes 4 and 16 × 2 orders, against the base model and against the service LLM
    assert result.counts["pairwise_verdicts"] == 2 * 16 and result.counts["pairwise_errors"] == 0
    assert result.counts["service_answers"] == 2 * 2
    metrics = evaluate.load_metrics(run_dir)
    assert set(metrics["volume"]) == {-1, 0, 4, 16} and {"mean_ci_low", "mean_ci_high"} <= set(metrics.columns)
    assert set(metrics.loc[metrics["volume"] == -1, "local_model"]) == {"service:openai:fake-judge"}
    assert len(evaluate.load_judgements(run_dir)) == (12 + 4) * 2  # pairwise.jsonl is not read as judgements
    assert len(competitor.load_service_answers(run_dir)) == 4
    assert "service_answers/summarization.jsonl" in json.loads((run_dir / "evaluate" / "DONE.json").read_text())["outputs"]
    pair = evaluate.load_pairwise(run_dir)
    assert set(pair["baseline"]) == {"base", "service:openai:fake-judge"}
    vs_base, vs_service = pair[pair["baseline"] == "base"], pair[pair["baseline"] != "base"]
    assert (vs_base["win"] == 100).all() and (pair["position_inconsistency"] == 0).all()
    assert set(vs_service["volume"]) == {4, 16} and (vs_service["loss"] == 100).all()  # the service's answer is longer
    refs = evaluate.load_reference_metrics(run_dir)
    assert len(refs) == 16 and refs["rouge_l"].between(0, 1).all()
    corr = evaluate.load_correlations(run_dir)
    assert set(corr["task"]) == {"summarization"} and set(corr["reference_metric"]) == {"rouge_l", "embedding_cosine"}

    # the notebook's figures draw from these files
    import matplotlib

    matplotlib.use("Agg")
    from llamaduo_nb.stages import report

    assert not figures.judge_spread_table(metrics).empty
    figures.pairwise_bars(pair)
    fig = figures.judge_vs_reference_scatter(reference_metrics.judge_vs_reference(evaluate.load_judgements(run_dir), refs), corr)
    assert "Spearman" in fig.axes[0].get_title()

    # switched off, their files go
    params = Params(tasks=["summarization"], evaluate={"m": 2, "pairwise": False, "reference_metrics": False, "bootstrap": 50,
                                                        "service_answers": False},
                    service={"backend": "openai", "model": "fake-judge"})
    evaluate.run(params, run_dir)
    assert evaluate.load_pairwise(run_dir).empty and evaluate.load_reference_metrics(run_dir).empty
    assert not pairwise_verdicts.pairwise_file(run_dir).exists()
    assert competitor.load_service_answers(run_dir).empty and not (evaluate.load_metrics(run_dir)["volume"] == -1).any()


@pytest.mark.slow
def test_real_local_judge_prefers_the_reference_in_both_orders(tmp_path):
    from llamaduo_nb.llm.local import LocalBackend

    cfg = ServiceParams(backend="local", model="smollm2-135m-instruct")
    params = Params(evaluate={"pairwise": True}, service=cfg.model_dump())
    ins = "Based on the passage, what year was the bridge opened? Passage: The Elm Street bridge opened to traffic in 1932."
    refs = {"p": {"instruction": ins, "reference": "The bridge opened in 1932."}}
    resp = pd.DataFrame([
        {"task": "closed_qa", "local_model": "m", "volume": 0, "prompt_id": "p", "k": 0, "response": "Bananas grow in tropical climates."},
        {"task": "closed_qa", "local_model": "m", "volume": 4, "prompt_id": "p", "k": 0, "response": "It opened in 1932."},
    ])
    service = ServiceLLM(cfg, ResponseCache(tmp_path / "c.sqlite"), backend=LocalBackend(cfg))
    rows = pd.DataFrame(pairwise_verdicts.judge_pairs(params, params.judges[0], resp, refs, service))
    assert list(rows["outcome"]) == ["win", "win"]
