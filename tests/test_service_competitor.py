"""The service LLM as a competitor, targets relative to it, and judges checked against people.

Hand-made answer scores and judgements (no model) for the statistics, the stop rule, the figures and the
offline report page; one slow check runs the evaluate and report stages with the real local stand-in as
service LLM on hand-written answers.
"""

from __future__ import annotations

import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.patches import Polygon, Rectangle

from llamaduo_nb.stages.evaluate import people
from llamaduo_nb.stages import evaluate
from llamaduo_nb.core.rows import read_human_labels
from llamaduo_nb import figures
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.methods import agreement, verdict
from llamaduo_nb.methods.metrics import aggregate
from llamaduo_nb.pipeline import cycle
from llamaduo_nb.core.params import BUNDLED_HUMAN_LABELS, CycleTarget, Params

SERVICE = "service:openai:gpt-4o"


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


# -- the smallest volume not worse than the service LLM -----------------------------------------------------


def scores_fixture(prompts: int = 12) -> pd.DataFrame:
    """Answer scores, K = 2: the service LLM scores 60 + p on prompt p; volume 4 is 14–15 points below it on
    every prompt, volume 16 one to three points below, volume 64 four to five points above (none worse)."""
    rows = []
    offsets = {4: lambda p: -15.0 + p % 2, 16: lambda p: -(1 + p % 3), 64: lambda p: 4.0 + p % 2}
    for p in range(prompts):
        for k in range(2):
            base = 60.0 + p + (k - 0.5)  # the K answers of a prompt differ a little
            rows.append({"task": "closed_qa", "local_model": SERVICE, "judge": "j", "volume": -1, "prompt_id": f"p{p}", "k": k,
                         "score": base, "metric": "precision", "cycle": 1})
            for volume, offset in offsets.items():
                rows.append({"task": "closed_qa", "local_model": "smol", "judge": "j", "volume": volume, "prompt_id": f"p{p}",
                             "k": k, "score": base + offset(p), "metric": "precision", "cycle": 1})
    return pd.DataFrame(rows)


def test_smallest_volume_not_worse_than_the_service():
    table = verdict.verdict_table(scores_fixture(), verdict.Rule(judge="j", offset=0.0))
    assert list(table["volume"]) == [4, 16, 64]
    assert list(table["passed"]) == [False, False, True]  # 16 is a little below on every prompt: not shown
    found = verdict.summary(table)
    assert found.loc[0, "found"] and int(found.loc[0, "volume"]) == 64
    line = verdict.sentence(found.iloc[0], verdict.Rule(judge="j", offset=0.0), "openai:gpt-4o")
    assert line.startswith("closed_qa · smol: 64 training samples is the smallest volume not worse than the service LLM")
    # with a margin of 5 points (`>= service - 5`), volume 16 is enough
    relaxed = verdict.summary(verdict.verdict_table(scores_fixture(), verdict.Rule(judge="j", offset=-5.0)))
    assert int(relaxed.loc[0, "volume"]) == 16


def test_no_volume_not_worse_yet_says_so():
    scores = scores_fixture()
    scores = scores[scores["volume"] != 64]
    rule = verdict.Rule(judge="j", offset=0.0)
    found = verdict.summary(verdict.verdict_table(scores, rule))
    assert not found.loc[0, "found"] and int(found.loc[0, "volume"]) == 16
    assert "no volume is shown to be not worse" in verdict.sentence(found.iloc[0], rule)


def test_coverage_statistic_per_prompt():
    frame = pd.DataFrame({"prompt_id": ["a", "a", "b", "b"], "score": [40, 80, 90, 100]})
    assert verdict.per_prompt(frame, "coverage_50").to_dict() == {"a": 50.0, "b": 100.0}
    assert verdict.per_prompt(frame, "mean").to_dict() == {"a": 60.0, "b": 95.0}


# -- judges against people ------------------------------------------------------------------------------------


def test_agreement_perfect_reversed_and_noise():
    rng = np.random.default_rng(0)
    human = rng.uniform(0, 100, 60)
    perfect = agreement.judge_vs_human(human, human, resamples=200)
    assert perfect["spearman"] == pytest.approx(1.0) and perfect["kendall"] == pytest.approx(1.0) and perfect["mae"] == 0
    assert perfect["spearman_ci_low"] == pytest.approx(1.0)
    reversed_ = agreement.judge_vs_human(100 - human, human, resamples=200)
    assert reversed_["spearman"] == pytest.approx(-1.0) and reversed_["kendall"] == pytest.approx(-1.0)
    noise = agreement.judge_vs_human(rng.uniform(0, 100, 60), human, resamples=400)
    assert abs(noise["spearman"]) < 0.35 and noise["spearman_ci_low"] < 0 < noise["spearman_ci_high"]
    assert 20 < noise["mae"] < 45 and noise["mae_ci_low"] < noise["mae"] < noise["mae_ci_high"]
    shifted = agreement.judge_vs_human(human * 0.5, human, resamples=50)  # same ranking, other scale
    assert shifted["spearman"] == pytest.approx(1.0) and shifted["mae"] == pytest.approx(np.mean(human) / 2)


def test_agreement_tables_per_judge_and_between_judges():
    human = np.linspace(0, 100, 20)
    items = pd.concat([
        pd.DataFrame({"judge": "good", "metric": "precision", "item": range(20), "judge_score": human + 1, "human_score": human}),
        pd.DataFrame({"judge": "contrary", "metric": "precision", "item": range(20), "judge_score": 100 - human, "human_score": human}),
    ])
    table = agreement.agreement_with_humans(items, resamples=100).set_index("judge")
    assert table.loc["good", "spearman"] == pytest.approx(1.0) and table.loc["good", "mae"] == pytest.approx(1.0)
    assert table.loc["contrary", "kendall"] == pytest.approx(-1.0)
    between = agreement.agreement_between_judges(items.rename(columns={"judge_score": "score"}), resamples=100)
    assert len(between) == 1 and between.loc[0, "spearman"] == pytest.approx(-1.0) and between.loc[0, "items"] == 20
    assert agreement.judge_vs_human([50, 60], [40, 70])["spearman"] != agreement.judge_vs_human([50, 60], [40, 70])["spearman"]  # NaN: too few


def test_bundled_labels_are_valid_and_name_bundled_test_prompts():
    labels = read_human_labels(BUNDLED_HUMAN_LABELS)
    test_ids = {json.loads(line)["prompt_id"] for line in (BUNDLED_HUMAN_LABELS.parent / "coverage.jsonl").read_text().splitlines()
                if json.loads(line).get("split") == "test"}
    assert len(labels) >= 24 and {row["prompt_id"] for row in labels} <= test_ids
    assert all(row["rater"] == "llamaduo-dev" for row in labels)


@pytest.mark.parametrize("line,field", [
    ("not json", "not JSON"),
    ('{"answer": "x", "precision": 50}', "prompt_id"),
    ('{"prompt_id": "p", "precision": 50}', "answer"),
    ('{"prompt_id": "p", "answer": "x"}', "similarity"),
    ('{"prompt_id": "p", "answer": "x", "precision": 130}', "precision: 130 is not a score within 0–100"),
    ('{"prompt_id": "p", "answer": "x", "similarity": "high"}', "similarity"),
])
def test_a_bad_labels_file_names_the_file_the_line_and_the_field(tmp_path, line, field):
    from llamaduo_nb.core.params_file import load_params

    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt_id": "p", "answer": "fine", "similarity": 50}\n' + line + "\n")
    params_file = tmp_path / "x.yaml"
    params_file.write_text(f"evaluate: {{human_labels: {labels}}}\n")
    with pytest.raises(UserError) as info:
        load_params(params_file)
    message = str(info.value)
    assert "\n" not in message and "evaluate.human_labels" in message and f"{labels}: line 2" in message and field in message


def test_labels_of_prompts_outside_the_run_are_refused_for_your_file_and_skipped_for_the_bundled_one(tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"prompt_id": "elsewhere", "answer": "x", "precision": 50}\n')
    references = {"p1": {"task": "closed_qa", "instruction": "i", "reference": "r"}}
    params = Params(evaluate={"human_labels": str(labels)})
    with pytest.raises(UserError, match=r"labels.jsonl: label 1: prompt_id: 'elsewhere' is not a test prompt of this run"):
        people.human_labels(params, references)
    assert people.human_labels(Params(coverage={"source": "bundled"}), references) is None  # none of the bundled prompts here
    assert people.human_labels(Params(coverage={"source": "hub"}), references) is None  # bundled labels: bundled prompts only


def test_an_answer_id_is_looked_up_among_the_runs_answers():
    references = {"p1": {"task": "closed_qa", "instruction": "i", "reference": "r"}}
    responses = pd.DataFrame([{"task": "closed_qa", "local_model": "smol", "volume": 4, "prompt_id": "p1", "k": 1, "response": "hi"},
                              {"task": "closed_qa", "local_model": SERVICE, "volume": -1, "prompt_id": "p1", "k": 0, "response": "yo"}])
    labels = [{"prompt_id": "p1", "answer_id": "smol/4/1", "precision": 80, "label": 1},
              {"prompt_id": "p1", "answer_id": f"{SERVICE}/-1/0", "similarity": 70, "precision": 60, "label": 2},
              {"prompt_id": "p1", "answer_id": "smol/4/1@c2", "precision": 10, "label": 3}]  # cycle 2's: left to it
    rows = people.labelled_answers(labels, references, responses)
    assert list(rows["answer"]) == ["hi", "yo", "yo"] and list(rows["metric"]) == ["precision", "similarity", "precision"]
    with pytest.raises(UserError, match="answer_id: 'smol/16/0' is not an answer"):
        people.labelled_answers([{"prompt_id": "p1", "answer_id": "smol/16/0", "precision": 1, "label": 4}], references, responses)


# -- targets relative to the service LLM -----------------------------------------------------------------------


@pytest.mark.parametrize("text,words", [
    ("precision mean >= service", "margin δ = 0 (the local model must be shown better)"),
    ("precision mean >= service - 5", "non-inferiority margin δ = 5 points"),
    ("precision mean >= 0.95 * service", "precision mean ≥ 0.95 × service: one-sided non-inferiority test"),
    ("precision mean >= 60", "precision mean ≥ 60: one-sided test against the threshold"),
])
def test_every_target_says_how_it_is_decided(text, words):
    rule = verdict.Rule.from_target(CycleTarget.model_validate(text), 0.025, "j")
    assert words in rule.describe() and "α = 0.025" in rule.describe()


def test_decide_stops_without_the_service_llms_answers():
    params = Params(cycle={"target": "precision mean >= service", "max_cycles": 3}, evaluate={"judges": [{"name": "j"}]})
    scores = scores_fixture()
    without = verdict.verdict_table(scores[scores["volume"] != -1], evaluate.verdict_rule(params))
    stopped = cycle.decide(params, 1, without)
    assert stopped.stop and "needs the service LLM's own judged answers" in stopped.reason


def test_target_text_round_trip_and_errors():
    assert str(CycleTarget.model_validate("precision mean >= service - 5")) == "precision mean ≥ service − 5"
    assert str(CycleTarget.model_validate("precision mean >= 0.9 * service")) == "precision mean ≥ 0.9 × service"
    with pytest.raises(ValueError, match="expected"):
        CycleTarget.model_validate("precision mean >= servic")
    with pytest.raises(ValueError, match="needs evaluate.service_answers"):
        Params(cycle={"target": "precision mean >= service"}, evaluate={"service_answers": False})


# -- figures and the answer browser ------------------------------------------------------------------------------


def judged_metrics() -> pd.DataFrame:
    rows = []
    for p in range(6):
        for k in range(2):
            for model, volume, score in (("smol", 0, 30), ("smol", 4, 50), ("smol", 16, 70), (SERVICE, -1, 80)):
                for m in range(2):
                    rows.append({"cycle": 1, "task": "closed_qa", "local_model": model, "judge": "j", "volume": volume,
                                 "prompt_id": f"p{p}", "k": k, "m": m, "valid": True, "similarity": score + p,
                                 "precision": score - p})
    return aggregate(pd.DataFrame(rows))


def _service_lines(ax):
    return [line for line in ax.get_lines() if line.get_linestyle() == "-." and line.get_label().startswith("service LLM")]


def test_score_vs_volume_draws_the_service_band_and_no_service_line():
    metrics = judged_metrics()
    fig = figures.score_vs_volume(metrics, "precision")
    ax = fig.axes[0]
    service = metrics[(metrics["local_model"] == SERVICE) & (metrics["metric"] == "precision")].iloc[0]
    (line,) = _service_lines(ax)
    assert line.get_ydata()[0] == pytest.approx(service["mean"])
    bands = [p for p in ax.patches if isinstance(p, (Polygon, Rectangle)) and p.get_alpha() == pytest.approx(0.10)]
    assert bands and bands[0].get_extents().height > 0  # the CI band
    assert all(SERVICE not in (l.get_label() or "") for l in ax.get_lines() if l.get_marker() == "o")


def test_coverage_bars_draw_the_service_band_per_zeta_and_tables_show_it():
    metrics = judged_metrics()
    fig = figures.coverage_bars(metrics, "precision", (50, 70))
    assert fig.axes[0].get_title() == "closed qa" and len(_service_lines(fig.axes[0])) == 2
    assert "smol" in fig._suptitle.get_text()  # the local model, not the service LLM, is the panel's subject
    table = figures.base_once(metrics)
    assert (table["local_model"] == SERVICE).sum() == 2  # once per metric
    from llamaduo_nb.stages import report

    wide = report.metrics_table(metrics)
    assert -1 in set(wide["volume"]) and set(wide.loc[wide["volume"] == -1, "local_model"]) == {SERVICE}


def test_score_across_cycles_and_the_verdict_figure_draw_the_margin_of_a_relative_target():
    rule = verdict.Rule(judge="j", offset=-5.0)
    table = verdict.verdict_table(scores_fixture(), rule)
    for fig in (figures.score_across_cycles(table, rule), figures.verdict_by_volume(table, rule)):
        dashed = [line for line in fig.axes[0].get_lines() if line.get_linestyle() == "--"]
        assert dashed and dashed[0].get_ydata()[0] == pytest.approx(-5.0)
        assert "local − service" in fig.axes[0].get_ylabel()
    fig = figures.verdict_by_volume(table, rule)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["4", "16", "64"]
    assert any(t.get_text() == "chosen" for t in fig.axes[0].texts)


def test_pairwise_bars_per_baseline():
    summary = pd.DataFrame([{"cycle": 1, "task": "closed_qa", "local_model": "smol", "judge": "j", "volume": 4, "baseline": b,
                             "win": w, "tie": 0.0, "loss": 100.0 - w, "position_inconsistency": 0.0} for b, w in (("base", 75.0), (SERVICE, 25.0))])
    fig = figures.pairwise_bars(summary, SERVICE)
    assert "service LLM openai:gpt-4o" in fig._suptitle.get_text()
    assert [p.get_height() for p in fig.axes[0].patches][:1] == [25.0]


def test_judge_vs_human_figure():
    items = pd.DataFrame({"judge": "j", "metric": ["precision"] * 5, "item": range(5), "human_score": [0, 25, 50, 75, 100],
                          "judge_score": [10, 20, 60, 70, 90]})
    table = agreement.agreement_with_humans(items, resamples=50)
    fig = figures.judge_vs_human(items, table)
    assert "ρ 1.00" in fig.axes[0].get_legend().get_texts()[0].get_text()


# -- report.html reads offline ------------------------------------------------------------------------------------


def test_widgets_carry_a_static_form_and_the_exported_page_needs_no_network(tmp_path):
    import ipywidgets as w
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook, new_output

    from llamaduo_nb import widgets
    from llamaduo_nb.stages import report

    box = widgets._explorer("answer browser", [w.HTML("live")], "<table><tr><td>STATIC ANSWERS</td></tr></table>")
    bundle = box._repr_mimebundle_()
    assert report.WIDGET_VIEW in bundle and "STATIC ANSWERS" in bundle["text/html"]
    notebook = new_notebook()
    cell = new_code_cell("widgets.answer_browser(run_dir)")
    cell.outputs = [new_output("display_data", data={k: v for k, v in bundle.items()})]
    notebook.cells.append(cell)
    notebook.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": {}, "version_major": 2, "version_minor": 0}}
    source = tmp_path / "07.ipynb"
    nbformat.write(notebook, source)
    page = report.export_html(source, tmp_path / "report.html").read_text()
    assert_reads_offline(page)
    assert "STATIC ANSWERS" in page
    assert report.PRINT_STYLE in page  # printed, outputs flow across pages


def assert_reads_offline(page: str) -> None:
    """No script or stylesheet is fetched, no widget is left to a widget manager, every output area has content."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    assert not [s for s in soup.find_all("script") if s.get("src")]
    assert not [link for link in soup.find_all("link") if (link.get("href") or "").startswith("http")]
    assert "application/vnd.jupyter.widget-view+json" not in page and "widget-state+json" not in page
    for area in soup.select(".jp-OutputArea-output"):
        assert area.get_text(strip=True) or area.find("img"), area


# -- end to end: the local stand-in as service LLM ------------------------------------------------------------------


@pytest.mark.slow
def answered_run(run_dir, prompts: int, k: int) -> list[dict]:
    """A run folder as infer leaves it: `prompts` bundled closed-QA test prompts answered K times by a 'local model'
    at volume 0 ("I do not know.") and 4 (the reference), earlier stages marked done. Returns the test prompts."""
    from llamaduo_nb.core.io import read_jsonl, write_json, write_jsonl
    from llamaduo_nb.core.units import stage_dir

    test = [{"prompt_id": r["prompt_id"], "task": "closed_qa", "instruction": r["messages"][0]["content"],
             "reference": r["messages"][1]["content"], "split": "test"} for r in read_jsonl(BUNDLED_HUMAN_LABELS.parent / "coverage.jsonl")
            if r.get("split") == "test" and r["category"] == "Closed QA"][:prompts]
    write_jsonl(stage_dir(run_dir, "coverage") / "test.jsonl", test)
    files = []
    for volume in (0, 4):
        rows = [{"task": "closed_qa", "local_model": "smol", "volume": volume, "prompt_id": r["prompt_id"], "k": j,
                 "response": r["reference"] if volume else "I do not know.", "output_tokens": 5, "input_tokens": 50,
                 "finish_reason": "stop", "latency_s": 0.1} for r in test for j in range(k)]
        write_jsonl(stage_dir(run_dir, "infer") / "closed_qa" / "smol" / f"{volume}.jsonl", rows)
        files.append(f"closed_qa/smol/{volume}.jsonl")
    write_json(stage_dir(run_dir, "coverage") / "DONE.json", {"stage": "coverage", "content": "c"})
    write_json(stage_dir(run_dir, "infer") / "DONE.json", {"stage": "infer", "content": "i", "outputs": files})
    for stage in ("deduplicate", "finetune"):
        write_json(stage_dir(run_dir, stage) / "DONE.json", {"stage": stage, "content": stage})
    return test


def test_evaluate_and_report_with_the_local_stand_in_as_service_llm(tmp_path):
    """Hand-written answers of a 'local model' at volumes 0 and 4; the packaged SmolLM2 answers as the service
    LLM and judges everything: metrics.csv has its rows, pairwise has local-vs-service rows, the figures
    draw its band, the report says which volume is not worse, the bundled labels are checked."""
    from llamaduo_nb.core.units import stage_dir
    from llamaduo_nb.stages import evaluate, report

    run_dir = tmp_path / "run"
    answered_run(run_dir, prompts=1, k=1)
    params = Params(tasks=["closed_qa"], coverage={"source": "bundled"},
                    service={"backend": "local", "model": "smollm2-135m-instruct", "batch_size": 8},
                    infer={"k": 1, "max_new_tokens": 24}, finetune={"base_models": ["smollm2-135m-instruct"], "volumes": [4]},
                    evaluate={"m": 1, "pairwise": True, "reference_metrics": False, "bootstrap": 50},
                    cycle={"target": "precision mean >= service - 5"})
    result = evaluate.run(params, run_dir)
    assert result.counts["service_answers"] == 1 and result.counts["human_labelled_items"] == 4  # the prompt's 4 labelled answers
    metrics = evaluate.load_metrics(run_dir)
    service = metrics[metrics["local_model"] == "service:local:smollm2-135m-instruct"]
    assert set(service["volume"]) == {-1} and set(service["metric"]) == {"similarity", "precision"} and (service["n"] == 1).all()
    pair = evaluate.load_pairwise(run_dir)
    assert set(pair["baseline"]) == {"base", "service:local:smollm2-135m-instruct"} and set(pair["volume"]) == {4}
    human = people.load_human_check(run_dir)
    assert set(human["agreement"]["metric"]) == {"similarity", "precision"} and (human["agreement"]["items"] == 3).all()
    assert (human["agreement"]["reference_items"] == 1).all()  # the reference answer, reported apart

    report.run(params, run_dir)
    out = stage_dir(run_dir, "report")
    assert {"judge_vs_human.png", "verdicts.csv", "noise.csv", "verdict_by_volume.png", "precision_vs_volume.svg"} <= {p.name for p in out.iterdir()}
    assert "service LLM" in (out / "precision_vs_volume.svg").read_text()  # the band's legend entry
    lines = report.headline(params, run_dir)
    assert lines[0].startswith("Rule: precision mean ≥ service − 5") and lines[1].startswith("closed_qa · smol:")
    assert "too few prompts to decide" in lines[1] and "1 test prompt: no spread to measure" in lines[1]  # one test prompt
    assert "with 1 prompt nothing can be resolved" in lines[2]
    from llamaduo_nb import widgets

    judgements, responses = widgets.load_answers(run_dir)
    assert len(judgements) == len(responses) * 1 and "service:local:smollm2-135m-instruct" in set(responses["local_model"])
    page = widgets.static_answers(run_dir)
    assert "service LLM local:smollm2-135m-instruct: its answer (same k)" in page and "id smol/4/0" in page

    # notebook 08 on this run, exported as report.html: every section present, readable offline
    import papermill as pm

    from llamaduo_nb.core.io import write_yaml
    from llamaduo_nb.pipeline.runner import NOTEBOOK_DIR

    write_yaml(run_dir / "params.yaml", params.dump())
    executed = tmp_path / "08_report.ipynb"
    pm.execute_notebook(str(NOTEBOOK_DIR / "08_report.ipynb"), str(executed), kernel_name="python3", cwd=str(NOTEBOOK_DIR),
                        parameters={"params_file": str(run_dir / "params.yaml"), "run_dir": str(run_dir)}, progress_bar=False)
    page = report.export_html(executed, run_dir / "report.html").read_text()
    assert_reads_offline(page)
    assert "Is the local model as good as the service LLM?" in page and "closed_qa · smol:" in page
    assert "the project&#39;s own" in page or "the project's own" in page  # the bundled labels say whose they are
    assert page.count("llamaduo-static") == 3  # the ζ slider's, the verdict explorer's and the answer browser's static forms
    assert "coverage@50 of precision" in page and "its answer (same k)" in page
    # a page to hand in: titled by the run, no code, no parameter cells, no settings section
    title = f"{params.run_name}: from {params.service.model} to a local model"
    assert f"<title>{title}</title>" in page and "<h1" in page and "LlamaDuo report of" in page
    assert "params_file" not in page and "nb.setup(" not in page and "0 · Settings" not in page and "08 · Report" not in page
    assert "Data and training" in page
