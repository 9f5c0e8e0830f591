"""Every report figure, drawn at its default size for the quickstart's shape (2 tasks, 1 model, 1 judge) and the
paper's (4 tasks, 2 local models, 2 judges, 2^n k volumes, the service LLM as a competitor, 2 cycles): no two
labels overlap (tick labels, axis labels, titles, the suptitle, legends: their rendered bounding boxes, as
matplotlib lays them out) and no label leaves the figure. And one visual language: a local model has the same
colour in every figure, the service LLM is always the dark dash-dot line.
"""

from __future__ import annotations

import itertools

import matplotlib
import matplotlib.text

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.colors import to_hex

from llamaduo_nb import figures
from llamaduo_nb.methods import pairwise, verdict
from llamaduo_nb.methods.metrics import aggregate, answer_scores

SERVICE = "service:gpt-4o"
SHAPES = {
    "quickstart": dict(tasks=("summarization", "closed_qa"), models=("smollm2-135m-instruct",), judges=("local:smollm2-135m-instruct",),
                       volumes=(4, 16), cycles=1, prompts=6),
    "paper": dict(tasks=("summarization", "classification", "coding", "closed_qa"), models=("gemma-2b-it", "mistral-7b-instruct-v0.3"),
                  judges=("openai:gpt-4o", "anthropic:claude-3-5-sonnet"), volumes=(1000, 2000, 4000, 8000, 16000, 32000, 64000, 128000, 256000),
                  cycles=2, prompts=20),
}


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def judgements_for(shape: dict, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for cycle in range(1, shape["cycles"] + 1):
        cells = [(m, v) for m in shape["models"] for v in ((0,) + shape["volumes"] if cycle == 1 else (shape["volumes"][-1] * 2,))]
        cells += [(SERVICE, -1)]
        for task, (model, volume), judge in itertools.product(shape["tasks"], cells, shape["judges"]):
            centre = 80 if volume < 0 else 30 + 4 * np.log2(1 + volume)
            for p, k, m in itertools.product(range(shape["prompts"]), range(2), range(2)):
                score = float(np.clip(rng.normal(centre, 15), 0, 100))
                rows.append({"cycle": cycle, "task": task, "local_model": model, "judge": judge, "volume": volume,
                             "prompt_id": f"{task}-{p}", "k": k, "m": m, "valid": True, "similarity": score, "precision": score - 3})
    return pd.DataFrame(rows)


def pairwise_for(shape: dict) -> pd.DataFrame:
    rows = []
    for baseline, task, model, judge, volume in itertools.product(("base", SERVICE), shape["tasks"], shape["models"], shape["judges"],
                                                                 shape["volumes"]):
        rows.append({"cycle": 1, "task": task, "local_model": model, "judge": judge, "volume": volume, "baseline": baseline,
                     "win": 40.0, "tie": 20.0, "loss": 40.0, "win_ci_low": 30.0, "win_ci_high": 50.0, "position_inconsistency": 12.5})
    return pd.DataFrame(rows)


def funnel_for(shape: dict) -> pd.DataFrame:
    steps = {"requested": 300, "input": 290, "after_exact": 280, "after_lsh_rouge": 250, "after_earlier": 240, "after_leakage": 239}
    return pd.DataFrame([dict(steps, task=t, cycle=c) for t in shape["tasks"] for c in range(1, shape["cycles"] + 1)])


def logs_for(shape: dict) -> pd.DataFrame:
    return pd.DataFrame([{"task": t, "local_model": m, "volume": v, "cycle": 1, "step": s, "loss": 2.5 / (1 + s)}
                         for t in shape["tasks"] for m in shape["models"] for v in shape["volumes"] for s in range(1, 6)])


def costs_for(shape: dict) -> pd.DataFrame:
    stages = ["coverage", "synthesize", "deduplicate", "finetune", "infer", "evaluate", "deploy", "report"]
    return pd.DataFrame([{"cycle": c, "stage": s, "seconds": 100.0 * (i + 1), "requests": 10 * i, "cache_hits": 0, "api_calls": 10 * i,
                          "input_tokens": 1000 * i, "output_tokens": 100 * i, "cost_usd": 0.5 * i}
                         for c in range(1, shape["cycles"] + 1) for i, s in enumerate(stages)])


def parity_for(shape: dict) -> pd.DataFrame:
    rows = []
    for task, model, metric in itertools.product(shape["tasks"][:2], shape["models"], ("similarity", "precision")):
        rows.append({"task": task, "local_model": model, "volume": shape["volumes"][-1], "cycle": 1, "judge": shape["judges"][0],
                     "metric": metric, "adapter_mean": 60.0, "adapter_mean_ci_low": 50.0, "adapter_mean_ci_high": 70.0,
                     "served_mean": 58.0, "served_mean_ci_low": 48.0, "served_mean_ci_high": 68.0, "difference": -2.0,
                     "difference_ci_low": -5.0, "difference_ci_high": 1.0, "equivalence": "equivalent", "margin": 5.0,
                     "identical_greedy": 0.5, "greedy_agreement": 0.8})
    return pd.DataFrame(rows)


def every_figure(shape: dict) -> dict:
    judgements = judgements_for(shape)
    metrics = aggregate(judgements, (50, 70))
    scores = answer_scores(judgements)
    rule = verdict.Rule(statistic="mean", versus_service=True, offset=-10.0)
    table = verdict.verdict_table(answer_scores(judgements, unscored=True), rule, 2, 2, "gpt-4o")
    pairs = pairwise_for(shape)
    human = pd.DataFrame([{"judge": j, "metric": m, "human_score": 10.0 * i, "judge_score": 10.0 * i + 3}
                          for j in shape["judges"] for m in ("similarity", "precision") for i in range(10)])
    agreement = pd.DataFrame([{"judge": j, "metric": m, "spearman": 0.8, "spearman_ci_low": 0.6, "spearman_ci_high": 0.9,
                               "kendall": 0.7, "mae": 5.0, "items": 10} for j in shape["judges"] for m in ("similarity", "precision")])
    points = pd.DataFrame([{"task": t, "judge": j, "rouge_l": i / 10, "similarity": 10.0 * i} for t in shape["tasks"]
                           for j in shape["judges"] for i in range(10)])
    correlations = pd.DataFrame([{"task": t, "judge": j, "judge_metric": "similarity", "reference_metric": "rouge_l", "spearman_rho": 0.5}
                                 for t in shape["tasks"] for j in shape["judges"]])
    return {
        "score_vs_volume": figures.score_vs_volume(metrics, "precision"),
        "coverage_bars": figures.coverage_bars(metrics, "precision", (50, 70)),
        "verdict_by_volume": figures.verdict_by_volume(table, rule),
        "score_across_cycles": figures.score_across_cycles(table, rule, stop_reason="the target was met in cycle 2 for every task"),
        "cost_per_stage": figures.cost_per_stage(costs_for(shape)),
        "funnel_plot": figures.funnel_plot(funnel_for(shape)),
        "loss_curves": figures.loss_curves(logs_for(shape)),
        "score_distribution": figures.score_distribution(scores, "precision"),
        "pairwise_vs_base": figures.pairwise_bars(pairs, "base"),
        "pairwise_vs_service": figures.pairwise_bars(pairs, SERVICE),
        "judge_vs_reference": figures.judge_vs_reference_scatter(points, correlations),
        "judge_vs_human": figures.judge_vs_human(human, agreement),
        "served_vs_adapter": figures.served_vs_adapter(parity_for(shape)),
    }


def labels_of(fig) -> list:
    """(name, text artist) of every visible label of the figure."""
    found = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):  # the ticks drawn: those within the view limits
            found += [(f"{which} tick {tick.label1.get_text()!r}", tick.label1) for tick in axis._update_ticks()]
        found += [("title", ax.title), ("x label", ax.xaxis.label), ("y label", ax.yaxis.label)]
    found += [(f"figure text {t.get_text()[:30]!r}", t) for t in fig.texts if t is not fig._suptitle]
    if fig._suptitle is not None:
        found.append(("suptitle", fig._suptitle))
    return [(name, t) for name, t in found if t.get_visible() and t.get_text().strip()]


def outline(text, box) -> np.ndarray:
    """The four corners of a label as drawn: its bounding box, or for rotated text the rectangle inscribed in that
    box at the text's angle (a one-line label; matplotlib only reports the axis-aligned box)."""
    theta = np.deg2rad(text.get_rotation() % 180)
    if np.isclose(np.sin(theta), 0) or np.isclose(np.cos(theta), 0) or "\n" in text.get_text():
        return np.array([[box.x0, box.y0], [box.x1, box.y0], [box.x1, box.y1], [box.x0, box.y1]])
    c, s = abs(np.cos(theta)), abs(np.sin(theta))
    # box.width = w c + h s, box.height = w s + h c: solve for the text's own width w and height h
    w, h = np.linalg.solve([[c, s], [s, c]], [box.width, box.height])
    if np.cos(theta) > 0:  # rising to the right: the lowest corner sits h·s right of the box's left edge
        return np.array([[box.x0 + h * s, box.y0], [box.x1, box.y0 + w * s], [box.x1 - h * s, box.y1], [box.x0, box.y0 + h * c]])
    return np.array([[box.x1 - h * s, box.y0], [box.x1, box.y0 + h * c], [box.x0 + h * s, box.y1], [box.x0, box.y0 + w * s]])


def polygons_overlap(a: np.ndarray, b: np.ndarray, tolerance: float = 1.0) -> bool:
    """Two convex polygons overlap by more than `tolerance` pixels: no separating axis (the separating axis theorem)."""
    for poly in (a, b):
        for i in range(len(poly)):
            edge = poly[(i + 1) % len(poly)] - poly[i]
            normal = np.array([-edge[1], edge[0]]) / (np.hypot(*edge) or 1.0)
            pa, pb = a @ normal, b @ normal
            if pa.max() <= pb.min() + tolerance or pb.max() <= pa.min() + tolerance:
                return False
    return True


def overlaps(fig) -> list[str]:
    """Pairs of labels whose drawn outlines overlap by more than a pixel, and labels or legends outside the figure."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = [(name, t, t.get_window_extent(renderer)) for name, t in labels_of(fig)]
    shapes = [(name, outline(t, box)) for name, t, box in drawn]
    legends = [(f"legend {i}", legend.get_window_extent(renderer)) for i, legend in enumerate(fig.legends)]
    shapes += [(name, outline(matplotlib.text.Text(), box)) for name, box in legends]
    problems = [f"{a} overlaps {b}" for (a, pa), (b, pb) in itertools.combinations(shapes, 2) if polygons_overlap(pa, pb)]
    boxes = [(name, box) for name, _, box in drawn] + legends
    frame = fig.bbox.padded(1.0)
    problems += [f"{name} leaves the figure" for name, box in boxes
                 if box.x0 < frame.x0 or box.x1 > frame.x1 or box.y0 < frame.y0 or box.y1 > frame.y1]
    return problems


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_no_figure_has_overlapping_or_cut_labels(shape):
    problems = {name: overlaps(fig) for name, fig in every_figure(SHAPES[shape]).items()}
    assert not {name: p for name, p in problems.items() if p}


def test_the_overlap_check_sees_overlapping_tick_labels():
    fig, ax = plt.subplots(figsize=(2, 2))
    ax.set_xticks(range(8), [f"long label {i}" for i in range(8)])
    assert any("x tick" in p for p in overlaps(fig))


def test_a_model_keeps_its_colour_and_the_service_llm_its_line_in_every_figure():
    shape = SHAPES["paper"]
    drawn = every_figure(shape)
    want = {m: to_hex(f"C{i}") for i, m in enumerate(sorted(shape["models"]))}
    for name in ("score_vs_volume", "verdict_by_volume"):
        ax = drawn[name].axes[0]
        for model, colour in want.items():
            lines = [line for line in ax.get_lines() if line.get_label().startswith(model)]
            assert lines and {to_hex(line.get_color()) for line in lines} == {colour}, name
    service_lines = [line for line in drawn["score_vs_volume"].axes[0].get_lines() if line.get_label().startswith("service LLM")]
    assert service_lines and all(line.get_linestyle() == "-." and to_hex(line.get_color()) == to_hex(figures.SERVICE_COLOUR)
                                 for line in service_lines)
    base = [line for line in drawn["score_vs_volume"].axes[0].get_lines() if line.get_linestyle() == "--"]
    assert {to_hex(line.get_color()) for line in base} == set(want.values())  # the base model: dashed, its model's colour
    # the coverage bars are the first model's colour (shades of it), the loss curves and boxes too
    first = np.array(matplotlib.colors.to_rgb(want[sorted(shape["models"])[0]]))
    bar = drawn["coverage_bars"].axes[0].patches[-1]
    assert np.allclose(matplotlib.colors.to_rgb(bar.get_edgecolor()), first)
    for row, colour in zip(drawn["score_distribution"].axes[::len(shape["tasks"])], want.values()):  # a row per model
        assert {to_hex(p.get_edgecolor()) for p in row.patches} == {colour, to_hex(figures.SERVICE_COLOUR)}
