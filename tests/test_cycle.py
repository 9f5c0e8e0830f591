"""The cycle's stop rule, its folders and tables, and the grid a params file expands into."""

import json

import pandas as pd
import pytest
import yaml

from llamaduo_nb.stages import evaluate
from llamaduo_nb.stages import BY_NAME
from llamaduo_nb.methods import verdict
from llamaduo_nb.stages import deduplicate
from llamaduo_nb.pipeline import cycle as cyc
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import write_json, write_jsonl
from llamaduo_nb.core.params import PROJECT_ROOT, expand_volumes
from llamaduo_nb.core.params_file import load_family, load_params
from llamaduo_nb.pipeline.plan import describe
from llamaduo_nb.pipeline.changes import params_differences, refuse_changed_params
from llamaduo_nb.pipeline.grid import parse_only
from llamaduo_nb.core.units import cycle_folder, cycle_folders, cycle_of, root_of, stage_fingerprint

QUICK = PROJECT_ROOT / "params" / "quickstart.yaml"


def metrics_rows(cycle, values, judge="local:smollm2-135m-instruct", metric="precision"):
    """A metrics.csv fixture, values: {(task, volume): coverage_50}."""
    rows = []
    for (task, volume), value in values.items():
        rows.append({"cycle": cycle, "task": task, "local_model": "m", "judge": judge, "volume": volume, "metric": metric,
                     "mean": value / 2, "median": value, "coverage_50": value, "coverage_70": value / 3})
    return pd.DataFrame(rows)


def verdicts(params, cycle, values, judge="local:smollm2-135m-instruct", metric="precision"):
    """The verdict table of answer scores whose per-prompt means sit around values[(task, volume)] (8 prompts, K = 2)."""
    rows = []
    for (task, volume), value in values.items():
        for p in range(8):
            for k in range(2):
                rows.append({"cycle": cycle, "task": task, "local_model": "m", "judge": judge, "volume": volume, "metric": metric,
                             "prompt_id": f"{task}{p}", "k": k, "score": value + (p % 3 - 1) * 3 + k})
    return verdict.verdict_table(pd.DataFrame(rows), evaluate.verdict_rule(params), 2, 2)


def quick(*sets):
    return load_params(QUICK, ["cycle.target=precision mean >= 70", "cycle.max_cycles=3", *sets])


# -- the stop rule -----------------------------------------------------------------------------------
def test_the_stop_rule_reads_the_largest_volume_and_the_targets_judge_and_metric():
    params = quick()
    table = pd.concat([
        verdicts(params, 1, {("summarization", 0): 99, ("summarization", 4): 90, ("summarization", 16): 40, ("closed_qa", 16): 85}),
        verdicts(params, 1, {("summarization", 16): 100}, judge="other"),
        verdicts(params, 1, {("summarization", 16): 100}, metric="similarity"),
    ])
    decision = cyc.decide(params, 1, table)
    scores = pd.DataFrame(decision.scores).set_index("task")
    assert scores.loc["summarization", "volume"] == 16 and scores.loc["summarization", "estimate"] == pytest.approx(40.125)
    assert not scores.loc["summarization", "passed"] and scores.loc["closed_qa", "passed"]
    assert not decision.met  # summarization's largest volume is below: the sequence stops there, 4 is not reached


def test_decide_goes_on_while_unmet_and_budget_remains():
    params = quick()
    decision = cyc.decide(params, 1, verdicts(params, 1, {("summarization", 16): 60, ("closed_qa", 16): 85}))
    assert not decision.stop
    assert "not met in cycle 1" in decision.reason and "summarization · m: no volume is shown to meet precision mean ≥ 70" in decision.reason
    assert "Cycle 2 synthesises 12 more pairs per task" in decision.reason  # the quickstart's cycle.step


def test_decide_stops_when_every_cell_meets_the_target():
    params = quick()
    decision = cyc.decide(params, 2, verdicts(params, 2, {("summarization", 30): 80, ("closed_qa", 30): 81}), new_pairs={"summarization": 3})
    assert decision.stop and decision.met
    assert decision.reason.startswith("target met in cycle 2: closed_qa · m: 30 training samples (cycle 2) is the smallest volume")


def test_decide_stops_when_the_cycle_budget_is_spent():
    params = quick()
    unmet = verdicts(params, 3, {("summarization", 40): 10, ("closed_qa", 40): 10})
    decision = cyc.decide(params, 3, unmet, new_pairs={"summarization": 4})
    assert decision.stop and not decision.met and "Cycle budget spent (cycle.max_cycles = 3)" in decision.reason
    # the short form (a figure's title) keeps why it stopped and leaves out the verdict sentences
    assert decision.short == f"target {params.cycle.target} not met in cycle 3; cycle budget spent (cycle.max_cycles = 3)"
    assert not cyc.decide(params, 2, unmet.assign(cycle=2), new_pairs={"summarization": 4}).stop


def test_decide_stops_on_cost_budget_and_on_no_new_data():
    params = quick("cycle.max_cost_usd=5")
    unmet = verdicts(params, 2, {("summarization", 30): 10})
    assert "Cost budget spent ($6.00 of cycle.max_cost_usd $5.00)" in cyc.decide(params, 2, unmet, cost_usd=6.0, new_pairs={"x": 1}).reason
    assert not cyc.decide(params, 2, unmet, cost_usd=4.0, new_pairs={"x": 1}).stop
    stalled = cyc.decide(params, 2, unmet, cost_usd=0.0, new_pairs={"summarization": 0, "closed_qa": 0})
    assert stalled.stop and "kept no new pairs" in stalled.reason


def test_decide_without_scores_stops_and_says_so():
    params = quick()
    decision = cyc.decide(params, 1, verdicts(params, 1, {("summarization", 16): 90}, metric="similarity"))
    assert decision.stop and "no precision scores" in decision.reason


def test_target_text_and_mapping_and_errors():
    assert str(quick().cycle.target) == "precision mean ≥ 70"
    params = load_params(QUICK, ["cycle.target={metric: similarity, statistic: mean, threshold: 55.5}"])
    assert (params.cycle.target.metric, params.cycle.target.statistic, params.cycle.target.threshold) == ("similarity", "mean", 55.5)
    with pytest.raises(UserError, match=r"cycle\.target\.statistic: 'coverage_90' is not reported"):
        load_params(QUICK, ["cycle.target=precision coverage_90 >= 70"])  # the verdict reads it, cycling or not
    load_params(QUICK, ["evaluate.zetas=[40]"])  # the quickstart's target is on the mean
    with pytest.raises(UserError, match=r"cycle\.target: 'precision at least 70': expected"):
        load_params(QUICK, ["cycle.target=precision at least 70"])
    with pytest.raises(UserError, match=r"cycle\.target\.judge: 'gpt-9' is not a judge"):
        load_params(QUICK, ["cycle.target={judge: gpt-9}"])


# -- folders and tables ----------------------------------------------------------------------------
def test_cycle_folders(tmp_path):
    run = tmp_path / "run"
    (run / "cycle-3").mkdir(parents=True)
    (run / "cycle-2").mkdir()
    (run / "superseded" / "cycle-4-x").mkdir(parents=True)
    assert cycle_of(run) == 1 and cycle_of(run / "cycle-2") == 2 and root_of(run / "cycle-3") == run
    assert cycle_folder(run / "cycle-2", 3) == run / "cycle-3" and cycle_folder(run / "cycle-3", 1) == run
    assert [c for c, _ in cycle_folders(run)] == [1, 2, 3]


def evaluated(folder, frame) -> None:
    """A cycle whose evaluate finished with `frame` as its metrics."""
    (folder / "evaluate").mkdir(parents=True, exist_ok=True)
    frame.to_csv(folder / "evaluate" / "metrics.csv", index=False)
    write_json(folder / "evaluate" / "DONE.json", {"completion_id": "x"})


def test_run_tables_gather_every_cycle_and_keep_later_cycles_rows_when_cycle_1_is_redone(tmp_path):
    run = tmp_path / "run"
    evaluated(run, metrics_rows(1, {("summarization", 4): 10}))
    evaluated(run / "cycle-2", metrics_rows(2, {("summarization", 9): 20}))
    cyc.publish_run_tables(run)
    assert pd.read_csv(run / "metrics.csv")["cycle"].tolist() == [1, 2]
    assert evaluate.load_metrics(run / "cycle-2")["cycle"].tolist() == [2]  # a cycle folder: its own rows
    evaluated(run / "cycle-2", metrics_rows(2, {("summarization", 9): 30}))  # a redo replaces its rows
    cyc.publish_run_tables(run)
    assert pd.read_csv(run / "metrics.csv")["coverage_50"].tolist() == [10, 30]
    # cycle 1 redone (one cell, `--only`): cycle 2, whose inputs did not change, is not redone and its rows stay
    evaluated(run, metrics_rows(1, {("summarization", 4): 11}))
    cyc.publish_run_tables(run / "cycle-2")
    assert pd.read_csv(run / "metrics.csv")[["cycle", "coverage_50"]].values.tolist() == [[1, 11], [2, 30]]
    (run / "cycle-2" / "evaluate" / "DONE.json").unlink()  # a cycle being redone shows no rows until it finishes
    assert evaluate.load_metrics(run)["cycle"].tolist() == [1]


def test_later_cycles_read_earlier_kept_pairs_and_are_redone_when_they_change(tmp_path):
    params = quick("cycle.step=5")
    run = tmp_path / "run"
    later = run / "cycle-2"
    for folder, ids in ((run, ["a", "b"]), (later, ["c"])):
        write_jsonl(folder / "deduplicate" / "kept.jsonl", [{"id": i, "task": "summarization"} for i in ids])
        write_json(folder / "deduplicate" / "DONE.json", {"content": f"kept-{folder.name}"})
    assert [p["id"] for p in deduplicate.kept_before(later)] == ["a", "b"]
    assert deduplicate.kept_before(run) == []
    assert cyc.pair_counts(later) == {"summarization": 1}
    adjusted = cyc.params_for_cycle(params, later)
    assert adjusted.synthesize.samples_per_task == 5 and params.synthesize.samples_per_task == 20
    assert cyc.params_for_cycle(quick("cycle.step=null"), later).synthesize.samples_per_task == 20  # default: samples_per_task
    assert cyc.params_for_cycle(params, run) is params
    before = stage_fingerprint(BY_NAME["finetune"], adjusted, later)
    write_json(run / "deduplicate" / "DONE.json", {"content": "cycle-1-redone-with-other-pairs"})
    assert stage_fingerprint(BY_NAME["finetune"], adjusted, later) != before
    assert stage_fingerprint(BY_NAME["deduplicate"], adjusted, later) != stage_fingerprint(BY_NAME["deduplicate"], adjusted, run)


def test_record_writes_scores_pairs_cost_and_reason(tmp_path):
    params = quick()
    run = tmp_path / "run"
    for folder, n, cost in ((run, 3, 0.5), (run / "cycle-2", 2, 0.25)):
        write_jsonl(folder / "deduplicate" / "kept.jsonl", [{"id": str(i), "task": "closed_qa"} for i in range(n)])
        write_json(folder / "deduplicate" / "DONE.json", {"completion_id": "x"})
        write_json(folder / "manifest.json", {"llm_totals": {"cost_usd": cost}})
    d1 = cyc.decide(params, 1, verdicts(params, 1, {("closed_qa", 3): 10}))
    d2 = cyc.Decision(True, "target met in cycle 2: …", [], met=True)
    cyc.record(params, run, [(1, d1), (2, d2)], stopped=True)
    body = json.loads((run / "cycles.json").read_text())
    assert body["stop_reason"] == "target met in cycle 2: …" and body["stopped"]
    assert [c["kept_pairs_total"] for c in body["cycles"]] == [{"closed_qa": 3}, {"closed_qa": 5}]
    assert body["cost_usd"] == 0.75 and body["cycles"][1]["folder"] == "cycle-2"
    assert body["cycles"][0]["scores"][0]["estimate"] == pytest.approx(10.125) and body["cycles"][0]["scores"][0]["outcome"] == "not shown"
    assert body["rule"].startswith("Rule: precision mean ≥ 70: one-sided test against the threshold")


def test_retire_later_cycles_moves_folders_and_rows(tmp_path):
    run = tmp_path / "run"
    for c, folder in ((1, run), (2, run / "cycle-2"), (3, run / "cycle-3")):
        evaluated(folder, metrics_rows(c, {("closed_qa", 4): 1}))
    cyc.publish_run_tables(run)
    moved = cyc.retire_later_cycles(run, 2)
    assert len(moved) == 1 and moved[0].parent.name == "superseded" and not (run / "cycle-3").exists()
    assert pd.read_csv(run / "metrics.csv")["cycle"].tolist() == [1, 2]


# -- the grid --------------------------------------------------------------------------------------
def test_volume_ranges():
    assert expand_volumes("2^0..2^8 k") == [1024 * 2**n for n in range(9)]
    assert expand_volumes("2^2..2^4") == [4, 8, 16]
    assert load_params(QUICK, ["finetune.volumes=2^1..2^3"]).finetune.volumes == [2, 4, 8]
    with pytest.raises(UserError, match=r"quickstart.yaml \(with --set finetune.volumes=2\^3..2\^1\): finetune.volumes: .*low ≤ high"):
        load_params(QUICK, ["finetune.volumes=2^3..2^1"])
    with pytest.raises(UserError, match=r"finetune.volumes\[1\]: Input should be greater than 0"):
        load_params(QUICK, ["finetune.volumes=[4, 0]"])


def test_paper_grid_from_one_file():
    family = load_family(PROJECT_ROOT / "params" / "paper.yaml")
    params = family[0]
    assert len(family) == 1 and len(params.tasks) == 4 and len(params.finetune.base_models) == 4
    assert params.finetune.volumes == [1024 * 2**n for n in range(9)] and len(params.judges) == 3
    text = describe(load_family(PROJECT_ROOT / "params" / "paper.yaml", ["coverage.max_test_prompts=100"]))
    assert "tasks (4)" in text and "local models (4)" in text and "volumes (9): 1k, 2k, 4k" in text and "judges (3)" in text
    assert "= 144 adapters to train; 480 (service LLM, task, model, volume, judge) cells" in text
    # (4 tasks × 4 models × 10 volumes (with the base) + 4 tasks of the service LLM's own) × 100 prompts × K=4 × M=10
    assert "656,000 calls per judge" in text and "answers the test prompts: 1,600 calls" in text
    # 282,356 synthesis + 1,600 service answers + 3 judges × (656,000 + 230,400 pairwise: 4 tasks × 4 models × 9 volumes
    # × 100 prompts × K=4 × 2 orders × 2 baselines, the base model and the service LLM)
    assert "total: 2,943,156 calls in the first cycle" in text


def test_service_list_expands_into_a_family(tmp_path):
    path = tmp_path / "sweep.yaml"
    raw = yaml.safe_load(QUICK.read_text())
    raw["service"] = [dict(raw["service"], name="small-a"), dict(raw["service"], name="small-b", model="smollm2-135m-instruct")]
    path.write_text(yaml.safe_dump(raw))
    family = load_family(path)
    assert [p.service.label for p in family] == ["small-a", "small-b"]
    assert family[0].tasks == family[1].tasks and family[0].judges[0].label == "small-a"
    text = describe(family)
    assert "service LLMs (2): small-a, small-b" in text and "= 8 adapters" in text
    with pytest.raises(UserError, match="is a sweep"):
        load_params(path)
    raw["service"][1]["model"] = "no-such-model"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"sweep.yaml: service\[1\]\.model: "):
        load_family(path)
    raw["service"][1] = dict(raw["service"][0])
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="share the label"):
        load_family(path)


def test_only_names_cells_of_the_grid():
    params = quick()
    assert parse_only("task=closed_qa,volume=16", params) == [("closed_qa", "smollm2-135m-instruct", 16)]
    assert len(parse_only("volume=4|16", params)) == 4
    with pytest.raises(UserError, match=r"volume 4096 is not in the grid \(volumes: 4, 16\)"):
        parse_only("task=closed_qa,volume=4096", params)
    with pytest.raises(UserError, match="key one of task, model, volume"):
        parse_only("tusk=coding", params)


def test_a_run_folder_made_with_other_params_is_refused(tmp_path):
    params = quick()
    run = tmp_path / "run"
    run.mkdir()
    (run / "params.yaml").write_text(yaml.safe_dump(params.dump()))
    refuse_changed_params(run, quick("service.max_concurrency=2", "cycle.max_cycles=5"), accepted=False)  # no output changes
    with pytest.raises(UserError, match=r"was made with different params \(infer.k: 2 → 3\); add --force"):
        refuse_changed_params(run, quick("infer.k=3"), accepted=False)
    refuse_changed_params(run, quick("infer.k=3"), accepted=True)
    assert params_differences({"a": {"b": 1}, "run_name": "x"}, {"a": {"b": 2}, "run_name": "y"}) == ["a.b: 1 → 2"]


def test_force_stage_redoes_a_stage_and_does_not_accept_changed_params(tmp_path):
    """`--force STAGE` and a bare `--force` are two things: only the bare one accepts params the folder was not made with."""
    from llamaduo_nb.pipeline import runner

    run = tmp_path / "run"
    run.mkdir()
    made_with = ["cycle.target=precision mean >= 70", "cycle.max_cycles=3"]
    (run / "params.yaml").write_text(yaml.safe_dump(quick().dump()))
    executed = []
    with pytest.raises(UserError, match=r"was made with different params \(infer.k: 2 → 3\); add --force"):
        runner.run(QUICK, run, overrides=[*made_with, "infer.k=3"], force=["finetune"], execute=lambda *a: executed.append(a))
    assert not executed
