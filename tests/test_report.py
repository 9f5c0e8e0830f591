"""Report figures and notebook explorers, on fake run folders (no model is loaded).

`fake_run` writes what the stages would: coverage, per-cycle synth/dedup/responses/judgements and
manifest.json (cycle t ≥ 2 in `cycle-<t>/`), metrics.csv for every cycle at the top, cycles.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.container import BarContainer

from llamaduo_nb.stages import BY_NAME
from llamaduo_nb import figures
from llamaduo_nb import widgets

from llamaduo_nb.stages import report
from llamaduo_nb.core.io import write_csv, write_json, write_jsonl
from llamaduo_nb.methods import verdict
from llamaduo_nb.methods.metrics import aggregate, answer_scores
from llamaduo_nb.methods.verdict import cycle_verdicts
from llamaduo_nb.stages import evaluate
from llamaduo_nb.core.params import CycleTarget

TASKS = ("summarization", "closed_qa")
MODELS = ("smollm2-135m-instruct", "qwen2.5-0.5b-instruct")
JUDGES = ("openai:gpt-4o",)
VOLUMES = (4, 16, 64)
STEP = 40  # kept pairs per task per later cycle (pool = 64 + 40 (t - 1))
PROMPTS, K, M = 8, 2, 2


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def _cycle_dir(root: Path, cycle: int) -> Path:
    return root if cycle == 1 else root / f"cycle-{cycle}"


def fake_run(root: Path, cycles: int = 2, tasks=TASKS, models=MODELS, judges=JUDGES, cost_per_call: float = 0.002,
             seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    train = [{"prompt_id": f"{t}-seed-{i}", "task": t, "instruction": f"Seed instruction {i} for {t}.",
              "reference": f"Seed answer {i}."} for t in tasks for i in range(3)]
    test = [{"prompt_id": f"{t}-test-{i}", "task": t, "instruction": f"Test prompt {i} of {t}: please do the thing.",
             "reference": f"The human reference {i}."} for t in tasks for i in range(PROMPTS)]
    write_jsonl(root / "coverage" / "train.jsonl", train)
    write_jsonl(root / "coverage" / "test.jsonl", test)
    judgements, summary = [], []
    for cycle in range(1, cycles + 1):
        folder = _cycle_dir(root, cycle)
        pairs, kept, removed, funnel = [], [], [], []
        for t in tasks:
            task_pairs = [{"id": f"{t}-c{cycle}-{i:06d}-0", "task": t, "instruction": f"Synthetic {t} instruction {i} (cycle {cycle})",
                           "response": f"Synthetic response {i}", "seed_prompt_id": f"{t}-seed-{i % 3}", "service_model": "openai:gpt-4o",
                           "prompt": "synthesize", "prompt_version": 1, "cycle": cycle} for i in range(6)]
            pairs += task_pairs
            reasons = ["exact", "near_duplicate"] + (["too_close_to_earlier"] if cycle > 1 else [])
            for i, p in enumerate(task_pairs):
                if i < len(reasons):
                    removed.append(dict(p, reason=reasons[i], partner=f"the partner of {p['id']}", partner_id=f"{t}-partner-{i}",
                                        rouge_l=0.81, jaccard=0.6))
                else:
                    kept.append(p)
            row = {"task": t, "requested": 64, "valid_calls": 30, "calls": 32, "input": 60, "after_exact": 55, "after_lsh_rouge": 48}
            if cycle > 1:
                row["after_earlier"] = 44
            row["after_leakage"] = row.get("after_earlier", 48) - 1
            funnel.append(row)
        write_jsonl(folder / "synthesize" / "pairs.jsonl", pairs)
        write_jsonl(folder / "deduplicate" / "kept.jsonl", kept)
        write_jsonl(folder / "deduplicate" / "removed.jsonl", removed)
        write_csv(folder / "deduplicate" / "funnel.csv", pd.DataFrame(funnel))
        volumes = (0,) + (VOLUMES if cycle == 1 else (VOLUMES[-1] + STEP * (cycle - 1),))
        answer_files = []
        for t in tasks:
            for mi, model in enumerate(models):
                for v in volumes:
                    responses = [{"prompt_id": f"{t}-test-{p}", "k": k, "response": f"{model} answer k={k} at {v}", "task": t,
                                  "local_model": model, "volume": v} for p in range(PROMPTS) for k in range(K)]
                    write_jsonl(folder / "infer" / t / model / f"{v}.jsonl", responses)
                    answer_files.append(f"{t}/{model}/{v}.jsonl")
                    centre = 25 + 7 * np.log2(1 + v) - 10 * mi
                    for r in responses:
                        for judge in judges:
                            for m in range(M):
                                ok = rng.random() > 0.03
                                s = float(np.clip(rng.normal(centre, 18), 0, 100)) if ok else None
                                judgements.append({"cycle": cycle, "task": t, "local_model": model, "judge": judge, "volume": v,
                                                   "prompt_id": r["prompt_id"], "k": r["k"], "m": m, "valid": ok,
                                                   "similarity": None if s is None else round(s + 5), "precision": None if s is None else round(s),
                                                   "similarity_reason": f"sim reason m={m}", "precision_reason": f"prec reason m={m}"})
        for judge in judges:
            write_jsonl(folder / "evaluate" / f"{judge.replace(':', '_')}.jsonl", [j for j in judgements if j["cycle"] == cycle and j["judge"] == judge])
        stages = {}
        calls = {"synthesize": 32 * len(tasks), "evaluate": len(tasks) * len(models) * len(volumes) * PROMPTS * K * M}
        for i, stage in enumerate(["coverage", "synthesize", "deduplicate", "finetune", "infer", "evaluate", "report"]):
            if stage == "coverage" and cycle > 1:
                continue
            llm = {}
            if stage in calls:
                n = calls[stage]
                llm = {"openai:gpt-4o": {"requests": n, "cache_hits": 0, "api_calls": n, "input_tokens": 300 * n,
                                         "output_tokens": 120 * n, "cost_usd": round(cost_per_call * n, 6)}}
                if stage == "evaluate" and len(judges) > 1:
                    llm["other"] = {"requests": 10, "api_calls": 10, "cost_usd": 0.5}
            stages[stage] = {"fingerprint": "x", "completion_id": "y", "finished_at": "", "seconds": 10.0 * (i + 1) + cycle,
                             "counts": {}, "llm": llm}
        write_json(folder / "infer" / "DONE.json", {"stage": "infer", "outputs": answer_files})
        write_json(folder / "manifest.json", {"run_name": "fake", "layout": 2, "stages": stages})
        summary.append({"cycle": cycle, "folder": "." if cycle == 1 else f"cycle-{cycle}", "scores": [], "met": cycle == cycles,
                        "new_pairs": {t: 3 for t in tasks}, "kept_pairs_total": {t: 3 * cycle for t in tasks},
                        "cost_usd": cost_per_call * sum(calls.values())})
    metrics = aggregate(pd.DataFrame(judgements), (50, 70))
    for cycle in range(1, cycles + 1):  # each cycle's evaluate writes its own table; the run's is every cycle's
        folder = root if cycle == 1 else root / f"cycle-{cycle}"
        write_csv(folder / "evaluate" / "metrics.csv", metrics[metrics["cycle"] == cycle])
        write_json(folder / "evaluate" / "DONE.json", {"stage": "evaluate"})
    write_csv(root / "metrics.csv", metrics)
    table = verdict.verdict_table(answer_scores(pd.DataFrame(judgements), unscored=True),
                                  verdict.Rule(statistic="coverage_50", versus_service=False, threshold=70.0))
    for c in summary:
        best = cycle_verdicts(table[table["cycle"] <= c["cycle"]])
        c["scores"] = [{"task": r.task, "local_model": r.local_model, "judge": r.judge, "volume": int(r.volume),
                        "estimate": float(r.estimate), "passed": bool(r.passed)} for r in best[best["cycle"] == c["cycle"]].itertuples()]
    write_json(root / "cycles.json", {"target": "precision coverage_50 ≥ 70", "cycles": summary,
                                      "stop_reason": "target met in cycle 2" if cycles > 1 else "max_cycles reached"})
    return root


@pytest.fixture(scope="module")
def run2(tmp_path_factory) -> Path:
    return fake_run(tmp_path_factory.mktemp("run") / "run", cycles=2)


@pytest.fixture(scope="module")
def metrics2(run2) -> pd.DataFrame:
    return report.load_metrics(run2)


def _task(ax) -> str:
    return ax.get_title().replace(" ", "_")


def _model_lines(ax):
    return [line for line in ax.get_lines() if line.get_label() in MODELS]


def _line(ax, label):
    return next(line for line in ax.get_lines() if line.get_label() == label)


# -- score vs volume ----------------------------------------------------------------------------------


def test_score_vs_volume_shades_the_ci_of_the_mean(metrics2):
    fig = figures.score_vs_volume(metrics2, "precision", "mean")
    ax = fig.axes[0]
    bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
    assert len(bands) == len(MODELS)  # one band per line, in the lines' order and colour
    for band, line in zip(bands, _model_lines(ax)):
        expected = metrics2[(metrics2["metric"] == "precision") & (metrics2["task"] == _task(ax))
                            & (metrics2["local_model"] == line.get_label()) & (metrics2["volume"] > 0)]
        ys = band.get_paths()[0].vertices[:, 1]
        assert ys.min() == pytest.approx(expected["mean_ci_low"].min())
        assert ys.max() == pytest.approx(expected["mean_ci_high"].max())
        xs = band.get_paths()[0].vertices[:, 0]
        assert set(np.round(xs)) == set(expected["volume"])  # every tuned volume, cycle 2's pool included
        assert tuple(band.get_facecolor()[0][:3]) == pytest.approx(matplotlib.colors.to_rgb(line.get_color()))
    assert ax.get_xscale() == "log" and ax.get_xlabel() and fig.axes[0].get_ylabel()


def test_score_vs_volume_coverage_band_and_no_band_for_the_median(metrics2):
    fig = figures.score_vs_volume(metrics2, "similarity", "coverage_50")
    band = next(c for c in fig.axes[0].collections if isinstance(c, PolyCollection))
    expected = metrics2[(metrics2["metric"] == "similarity") & (metrics2["task"] == _task(fig.axes[0]))
                        & (metrics2["local_model"] == _model_lines(fig.axes[0])[0].get_label()) & (metrics2["volume"] > 0)]
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(expected["coverage_50_ci_high"].max())
    fig = figures.score_vs_volume(metrics2, "similarity", "median")
    assert not [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]


def test_score_vs_volume_puts_later_cycles_on_the_line_and_the_base_once(metrics2):
    fig = figures.score_vs_volume(metrics2, "precision")
    ax = fig.axes[0]
    line = _line(ax, MODELS[0])
    pool = VOLUMES[-1] + STEP
    assert list(line.get_xdata()) == [*VOLUMES, pool]
    assert any(t.get_text() == "c2" for t in ax.texts)
    dashed = [ln for ln in ax.get_lines() if ln.get_linestyle() == "--"]
    assert len(dashed) == len(MODELS)  # the base model once per model, not once per cycle


def test_score_vs_volume_without_ci_columns_or_cycle_column(metrics2):
    old = metrics2[metrics2["cycle"] == 1].drop(columns=["cycle"] + [c for c in metrics2.columns if "_ci_" in c])
    fig = figures.score_vs_volume(old, "precision")
    assert not [c for c in fig.axes[0].collections if isinstance(c, PolyCollection)]
    assert list(_line(fig.axes[0], MODELS[0]).get_xdata()) == list(VOLUMES)


def test_coverage_bars_error_bars_are_the_ci(metrics2):
    fig = figures.coverage_bars(metrics2, "precision", (50, 70))
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, BarContainer)][0]  # coverage@50
    first_model = sorted(MODELS)[0]  # the default: the first local model in metrics.csv (sorted)
    assert first_model in fig.get_suptitle()
    rows = metrics2[(metrics2["metric"] == "precision") & (metrics2["task"] == _task(ax)) & (metrics2["local_model"] == first_model)]
    rows = figures.base_once(rows).sort_values(["volume", "cycle"])
    assert [b.get_height() for b in bars] == pytest.approx(rows["coverage_50"].tolist())
    segments = bars.errorbar.lines[2][0].get_segments()
    assert [s[0][1] for s in segments] == pytest.approx(rows["coverage_50_ci_low"].fillna(rows["coverage_50"]).clip(upper=rows["coverage_50"]).tolist())
    assert [s[1][1] for s in segments] == pytest.approx(rows["coverage_50_ci_high"].fillna(rows["coverage_50"]).clip(lower=rows["coverage_50"]).tolist())
    assert [t.get_text() for t in ax.get_xticklabels()] == ["base", "4", "16", "64", f"{VOLUMES[-1] + STEP}\nc2"]


# -- across cycles ---------------------------------------------------------------------------------------


def run_verdicts(run_dir, rule):
    return verdict.verdict_table(answer_scores(evaluate.load_all_judgements(run_dir), unscored=True), rule)


def test_score_across_cycles_has_a_point_per_cycle_and_the_threshold(tmp_path):
    run = fake_run(tmp_path / "r3", cycles=3)
    rule = verdict.Rule(judge=JUDGES[0], statistic="coverage_50", versus_service=False, threshold=70.0)
    table = run_verdicts(run, rule)
    fig = figures.score_across_cycles(table, rule, stop_reason="target met")
    for ax in fig.axes[: len(TASKS)]:
        for model in MODELS:
            line = _line(ax, model)
            assert list(line.get_xdata()) == [1, 2, 3]
        (threshold,) = [line for line in ax.get_lines() if line.get_linestyle() == "--"]
        assert set(threshold.get_ydata()) == {70.0}
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"{c + 1}\nn={VOLUMES[-1] + STEP * c}" for c in range(3)]
    best = cycle_verdicts(table)
    ax = fig.axes[0]
    want = best[(best["task"] == _task(ax)) & (best["local_model"] == MODELS[0])]
    assert list(_line(ax, MODELS[0]).get_ydata()) == pytest.approx(want["estimate"].tolist())
    assert list(want["volume"]) == [VOLUMES[-1], VOLUMES[-1] + STEP, VOLUMES[-1] + 2 * STEP]  # each cycle's largest volume
    assert "stopped: target met" in fig.get_suptitle()
    assert "95% CI" in fig.legends[0].get_title().get_text()


def test_score_across_cycles_single_cycle_and_named_judge(tmp_path):
    run = fake_run(tmp_path / "r1", cycles=1, judges=("a", "b"))
    rule = verdict.Rule(metric="similarity", statistic="mean", judge="b", versus_service=False, threshold=60.0)
    table = run_verdicts(run, rule)
    fig = figures.score_across_cycles(table, rule)
    line = _line(fig.axes[0], MODELS[0])
    want = table[(table["task"] == _task(fig.axes[0])) & (table["local_model"] == MODELS[0]) & (table["volume"] == VOLUMES[-1])]
    assert list(line.get_xdata()) == [1] and list(line.get_ydata()) == pytest.approx(want["estimate"].tolist())
    assert set(table["judge"]) == {"b"}
    colour = matplotlib.colors.to_rgb(line.get_color())  # the interval as an error bar of the line's colour
    bar = next(c for c in fig.axes[0].collections if tuple(c.get_color()[0][:3]) == pytest.approx(colour)).get_segments()[0]
    assert (bar[0][1], bar[1][1]) == pytest.approx((want["low"].iloc[0], want["high"].iloc[0]))


# -- cost per stage ----------------------------------------------------------------------------------------


def test_stage_costs_and_cost_figure_match_the_manifests(run2):
    costs = report.stage_costs(run2)
    manifests = {1: json.loads((run2 / "manifest.json").read_text()), 2: json.loads((run2 / "cycle-2" / "manifest.json").read_text())}
    for cycle, manifest in manifests.items():
        for stage, record in manifest["stages"].items():
            row = costs[(costs["cycle"] == cycle) & (costs["stage"] == stage)].iloc[0]
            assert row["cost_usd"] == pytest.approx(sum(a["cost_usd"] for a in record["llm"].values()))
            assert row["seconds"] == record["seconds"]
    fig = figures.cost_per_stage(report.stage_costs(run2))
    calls_ax, cost_ax, time_ax = fig.axes
    stages = [t.get_text() for t in cost_ax.get_xticklabels()]
    assert stages == ["coverage", "synthesize", "deduplicate", "finetune", "infer", "evaluate", "report"]
    for ax, column in ((calls_ax, "api_calls"), (cost_ax, "cost_usd"), (time_ax, "seconds")):
        assert ax.get_ylabel()
        for container, cycle in zip([c for c in ax.containers if isinstance(c, BarContainer)], (1, 2), strict=True):
            assert container.get_label() == f"cycle {cycle}"
            stage_records = manifests[cycle]["stages"]
            want = [0.0 if s not in stage_records else
                    (stage_records[s]["seconds"] if column == "seconds" else sum(a[column] for a in stage_records[s]["llm"].values()))
                    for s in stages]
            assert [b.get_height() for b in container] == pytest.approx(want)
    assert not any("free" in t.get_text() for t in cost_ax.texts)


def test_cost_figure_notes_a_free_local_stand_in(tmp_path):
    fig = figures.cost_per_stage(report.stage_costs(fake_run(tmp_path / "free", cycles=1, cost_per_call=0.0)))
    assert any("local stand-in" in t.get_text() for t in fig.axes[1].texts)


# -- report stage outputs, table, funnel -------------------------------------------------------------------


def test_report_run_writes_every_figure_as_png_and_svg(run2):
    from llamaduo_nb.core import units
    from llamaduo_nb.core.params_file import load_params

    params = load_params(Path(__file__).resolve().parents[1] / "params" / "quickstart.yaml",
                         ["service.backend=openai", "service.model=gpt-4o"])  # judge openai:gpt-4o, as in fake_run
    for up in BY_NAME["report"].upstream:  # the report only needs its upstream stages to be done
        write_json(units.done_path(run2, up), {"completion_id": up})
    result = report.run(params, run2, force=True)
    figures = run2 / "report"
    for name in ("similarity_vs_volume", "precision_vs_volume", "similarity_coverage", "precision_coverage",
                 "score_across_cycles", "verdict_by_volume", "cost_per_stage", "dedup_funnel"):
        assert (figures / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert b"<svg" in (figures / f"{name}.svg").read_bytes()[:2000]
    assert result.counts["figures"] >= 7
    table = pd.read_csv(figures / "metrics_table.csv")
    assert set(table["cycle"]) == {1, 2}
    assert (table["volume"] == 0).sum() == len(TASKS) * len(MODELS) * len(JUDGES)  # base model once


def test_funnel_plot_one_panel_per_cycle(run2):
    funnels = report.load_funnels(run2)
    assert set(funnels["cycle"]) == {1, 2}
    fig = figures.funnel_plot(funnels)
    assert len(fig.axes) == 2
    cycle1 = [c for c in fig.axes[0].containers if isinstance(c, BarContainer)][0]
    # cycle 1 has no "after earlier cycles" step: that bar repeats the step before it
    assert [b.get_height() for b in cycle1] == [64, 60, 55, 48, 48, 47]


def test_cycles_table(run2):
    table = report.cycles_table(report.load_cycles(run2))
    assert set(table["cycle"]) == {1, 2}
    assert len(table) == 2 * len(TASKS) * len(MODELS)
    assert report.cycles_table(None).empty


# -- widgets -----------------------------------------------------------------------------------------------


def test_synthetic_pairs_join_their_dedup_fate_and_seed(run2):
    frame = widgets.synthetic_pairs(run2)
    assert len(frame) == 2 * len(TASKS) * 6
    assert set(frame["cycle"]) == {1, 2}
    row = frame[frame["id"] == "closed_qa-c2-000002-0"].iloc[0]
    assert (row["fate"], row["reason"], row["partner_id"]) == ("removed", "too_close_to_earlier", "closed_qa-partner-2")
    assert row["seed_instruction"] == "Seed instruction 2 for closed_qa." and row["seed_response"] == "Seed answer 2."
    assert frame[frame["id"] == "closed_qa-c1-000002-0"].iloc[0]["fate"] == "kept"


def test_filter_pairs(run2):
    frame = widgets.synthetic_pairs(run2)
    assert len(widgets.filter_pairs(frame)) == len(frame)
    assert len(widgets.filter_pairs(frame, task="all", fate="all")) == len(frame)
    kept = widgets.filter_pairs(frame, task="summarization", fate="kept", cycle=1)
    assert list(kept["id"]) == [f"summarization-c1-{i:06d}-0" for i in range(2, 6)]
    removed = widgets.filter_pairs(frame, fate="removed")
    assert len(removed) == len(TASKS) * (2 + 3) and set(removed["fate"]) == {"removed"}
    near = widgets.filter_pairs(frame, fate="near_duplicate", cycle=2)
    assert list(near["id"]) == ["summarization-c2-000001-0", "closed_qa-c2-000001-0"]
    by_seed = widgets.filter_pairs(frame, seed="closed_qa-seed-0", cycle="2")
    assert list(by_seed["id"]) == ["closed_qa-c2-000000-0", "closed_qa-c2-000003-0"]
    counts = widgets.fate_counts(frame)
    assert counts.set_index(["cycle", "task"]).loc[(2, "closed_qa"), "removed: too_close_to_earlier"] == 1


def test_synthetic_pairs_pending_before_dedup(tmp_path):
    root = fake_run(tmp_path / "p", cycles=2)
    (root / "cycle-2" / "deduplicate" / "kept.jsonl").unlink()
    (root / "cycle-2" / "deduplicate" / "removed.jsonl").unlink()
    frame = widgets.synthetic_pairs(root)
    assert set(widgets.filter_pairs(frame, cycle=2)["fate"]) == {"pending"}


def test_pair_browser_filters_live(run2):
    box = widgets.pair_browser(run2)
    (task_box, fate_box, cycle_box), seed_box, (pick, count), out = box.children[0].children, box.children[1], box.children[2].children, box.children[3]
    assert count.value.startswith(f"<b>{2 * len(TASKS) * 6}</b>") and pick.max == 2 * len(TASKS) * 6
    task_box.value = "closed_qa"
    assert len(seed_box.options) == 1 + 3
    fate_box.value = "removed"
    assert count.value.startswith("<b>5</b>") and pick.max == 5
    pick.value = 5
    assert "closed_qa-c2-000002-0" in out.value and "too_close_to_earlier" in out.value and "closed_qa-partner-2" in out.value
    assert "Seed instruction 2 for closed_qa." in out.value
    fate_box.value = "near_duplicate"
    cycle_box.value = 1
    assert count.value.startswith("<b>1</b>") and pick.value == 1 and "closed_qa-c1-000001-0" in out.value
    seed_box.value = "closed_qa-seed-0"
    assert count.value.startswith("<b>0</b>") and "no pair matches" in out.value
    assert len(repr(box)) < 200  # a static page shows one line, not the widget tree


def test_answer_table_every_judge_and_k_answers_per_volume(tmp_path):
    root = fake_run(tmp_path / "j", cycles=2, judges=("a", "b"))
    judgements, responses = widgets.load_answers(root)
    table = widgets.answer_table(root, "closed_qa-test-3", judgements, responses)
    per_answer = table.groupby(["local_model", "volume", "cycle", "k"]).size()
    assert set(per_answer) == {2}  # both judges on every answer
    assert set(table["judge"]) == {"a", "b"}
    volumes = sorted(table.loc[table["local_model"] == MODELS[0], "volume"].unique())
    assert volumes == [0, *VOLUMES, VOLUMES[-1] + STEP]  # the base model once, cycle 2's pool included
    assert (table.groupby(["local_model", "volume", "cycle"])["k"].nunique() == K).all()
    assert table["similarity_reason"].notna().any() and table["precision_reason"].notna().any()
    html = widgets._render({"instruction": "i", "reference": "r"}, table)
    assert html.count("<tr>") == 1 + len(MODELS) * (len(VOLUMES) + 2) * K
    assert "<b>a</b>" in html and "<b>b</b>" in html and "prec reason" in html and "(cycle 2)" in html


def test_coverage_table_recomputes_coverage(run2, metrics2):
    from llamaduo_nb.methods.metrics import answer_scores

    judgements, _ = widgets.load_answers(run2)
    scores = answer_scores(judgements)
    table = widgets.coverage_table(scores, 50, "precision", JUDGES[0], MODELS[0])
    want = metrics2[(metrics2["metric"] == "precision") & (metrics2["local_model"] == MODELS[0]) & (metrics2["task"] == "closed_qa")]
    want = figures.base_once(want).sort_values(["volume", "cycle"])
    assert list(table.index) == ["base", "4", "16", "64", f"{VOLUMES[-1] + STEP} (cycle 2)"]
    assert table["closed_qa"].tolist() == pytest.approx(want["coverage_50"].tolist())
    assert widgets.zeta_slider(run2) is not None


def test_zeta_slider_redraws_the_report_figure_with_its_intervals(run2, metrics2, monkeypatch):
    shown = []
    monkeypatch.setattr("IPython.display.display", lambda obj, *a, **k: shown.append(obj))
    live = widgets.zeta_slider(run2).children[0]
    zeta = next(c for c in live.children if getattr(c, "description", "") == "ζ")
    model = next(c for c in live.children if getattr(c, "description", "") == "local model")
    assert list(model.options) == sorted(MODELS)
    zeta.value, model.value = 50, MODELS[0]
    live.update()
    fig = shown[-1]
    ax = next(a for a in fig.axes if a.get_title() == "closed qa")
    bars = [c for c in ax.containers if isinstance(c, BarContainer)][0]
    want = metrics2[(metrics2["metric"] == "precision") & (metrics2["local_model"] == MODELS[0]) & (metrics2["task"] == "closed_qa")]
    want = figures.base_once(want).sort_values(["volume", "cycle"])
    assert [b.get_height() for b in bars] == pytest.approx(want["coverage_50"].tolist())  # the static figure's values
    assert bars.errorbar is not None  # with its 95 % CIs


def test_score_across_cycles_without_a_verdict_says_so():
    fig = figures.score_across_cycles(pd.DataFrame(), verdict.Rule(statistic="coverage_50"))
    assert any("no precision verdict yet" in t.get_text() for t in fig.axes[0].texts)


def test_report_pdf_is_printed_by_a_real_chromium(tmp_path):
    if report.find_browser() is None:
        pytest.skip("no Chrome or Chromium on PATH")
    html = tmp_path / "report.html"
    html.write_text("<html><body><h1>quickstart: from gpt-4o to a local model</h1>" + "<p>verdict</p>" * 200 + "</body></html>")
    pdf = report.export_pdf(html, tmp_path / "report.pdf").read_bytes()
    import re

    assert pdf[:5] == b"%PDF-" and len(re.findall(rb"/Type\s*/Page\b", pdf)) >= 2  # a real document of several pages
    assert not list(tmp_path.glob("tmp*"))  # the browser's scratch profile is gone


def test_report_pdf_without_a_browser_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("LLAMADUO_BROWSER", raising=False)
    with pytest.raises(report.UserError, match="Chrome or Chromium"):
        report.export_pdf(tmp_path / "report.html", tmp_path / "report.pdf")
    assert not (tmp_path / "report.pdf").exists()
