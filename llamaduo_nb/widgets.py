"""ipywidgets explorers for the notebooks (they render in JupyterLab and classic Jupyter)."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from . import coverage, evaluate, infer
from .metrics import answer_scores, coverage_at


def answer_table(run_dir: Path | str, prompt_id: str, judgements: pd.DataFrame, responses: pd.DataFrame) -> pd.DataFrame:
    """Every answer to one prompt, with its mean judge scores and the first repeat's reasons."""
    answers = responses[responses["prompt_id"] == prompt_id][["local_model", "volume", "k", "response"]]
    j = judgements[(judgements["prompt_id"] == prompt_id) & judgements["valid"]]
    scores = j.groupby(["local_model", "volume", "k", "judge"]).agg(
        similarity=("similarity", "mean"), precision=("precision", "mean"),
        similarity_reason=("similarity_reason", "first"), precision_reason=("precision_reason", "first"),
    ).reset_index()
    return answers.merge(scores, on=["local_model", "volume", "k"], how="left").sort_values(["local_model", "volume", "k"])


def _render(prompt: dict, table: pd.DataFrame) -> str:
    esc = lambda s: html.escape(str(s)).replace("\n", "<br>")  # noqa: E731
    rows = "".join(
        f"<tr><td>{esc(r.local_model)}</td><td>{'base' if r.volume == 0 else r.volume}</td><td>{r.k}</td>"
        f"<td style='text-align:left'>{esc(r.response)}</td><td>{esc(r.judge)}</td>"
        f"<td>{r.similarity:.0f}</td><td>{r.precision:.0f}</td>"
        f"<td style='text-align:left;font-size:85%'>{esc(r.similarity_reason)}<br>{esc(r.precision_reason)}</td></tr>"
        for r in table.fillna({"similarity": float("nan"), "precision": float("nan")}).itertuples()
    )
    return (
        f"<h4>Instruction</h4><div style='white-space:pre-wrap'>{esc(prompt['instruction'])}</div>"
        f"<h4>Human reference</h4><div style='white-space:pre-wrap'>{esc(prompt['reference'])}</div>"
        "<h4>Answers</h4><table><tr><th>model</th><th>volume</th><th>k</th><th>answer</th><th>judge</th>"
        f"<th>similarity</th><th>precision</th><th>reasons</th></tr>{rows}</table>"
    )


def answer_browser(run_dir: Path | str):
    """Pick a task and a test prompt; see the reference, the K answers per volume and the judges' scores and reasons."""
    import ipywidgets as w

    test = coverage.load(run_dir, "test")
    by_id = {p["prompt_id"]: p for p in test}
    judgements = evaluate.load_judgements(run_dir)
    responses = infer.load_responses(run_dir)
    tasks = sorted({p["task"] for p in test})
    task_box = w.Dropdown(options=tasks, description="task")
    prompt_box = w.Dropdown(description="prompt", layout=w.Layout(width="70%"))
    out = w.HTML()

    def options(task):
        return [(f"{i + 1}. {p['instruction'][:70]}…", p["prompt_id"]) for i, p in enumerate(p for p in test if p["task"] == task)]

    def show(*_):
        if prompt_box.value:
            out.value = _render(by_id[prompt_box.value], answer_table(run_dir, prompt_box.value, judgements, responses))

    def on_task(change):
        prompt_box.options = options(change["new"])
        prompt_box.value = prompt_box.options[0][1] if prompt_box.options else None

    task_box.observe(on_task, names="value")
    prompt_box.observe(show, names="value")
    prompt_box.options = options(tasks[0])
    prompt_box.value = prompt_box.options[0][1]
    show()
    return w.VBox([w.HBox([task_box, prompt_box]), out])


def zeta_slider(run_dir: Path | str, metric: str = "precision"):
    """A ζ slider that recomputes coverage@ζ per task and volume from the answer scores."""
    import ipywidgets as w
    import matplotlib.pyplot as plt

    scores = answer_scores(evaluate.load_judgements(run_dir))
    scores = scores[scores["metric"] == metric]

    def draw(zeta):
        table = scores.groupby(["task", "volume"])["score"].apply(lambda s: coverage_at(s, zeta)).unstack("task")
        ax = table.plot(kind="bar", figsize=(7, 3.2), ylim=(0, 100), rot=0)
        ax.set_xticklabels(["base" if v == 0 else str(v) for v in table.index])
        ax.set_xlabel("training samples")
        ax.set_ylabel(f"% of answers with {metric} ≥ {zeta}")
        ax.grid(axis="y", alpha=0.3)
        plt.show()

    return w.interactive(draw, zeta=w.IntSlider(value=50, min=0, max=100, step=5, description="ζ"))
