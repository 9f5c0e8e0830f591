"""Stage 7 · report: the paper's figures, the metrics table, and the answer browser.

Reads: `metrics.csv`, `dedup/funnel.csv`, `models/` training logs. Writes `figures/*.png` and
`figures/*.svg` (publication-ready: labelled axes, log2 volume axis, a panel per task, a line
per local model and judge), `figures/metrics_table.csv`, DONE.json.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import evaluate, finetune
from .io import save_figure, write_csv
from .params import Params
from .stage import StageResult, StageRun, stage_dir

NOT_THE_PAPER = (
    "Offline stand-in: the judge is the local model itself, scoring by likelihood. "
    "These numbers show the pipeline works; they are not the paper's numbers."
)


def _panels(n: int, width: float = 4.2, height: float = 3.4):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, sharey=True)
    return fig, axes[0]


def score_vs_volume(metrics: pd.DataFrame, metric: str, statistic: str = "mean"):
    """Score vs training volume (log2 axis); the base model (volume 0) as a dashed line."""
    data = metrics[metrics["metric"] == metric]
    tasks = list(dict.fromkeys(data["task"]))
    fig, axes = _panels(max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        sub = data[data["task"] == task]
        for (model, judge), line in sub.groupby(["local_model", "judge"]):
            tuned = line[line["volume"] > 0].sort_values("volume")
            label = f"{model} (judge {judge})"
            handle = ax.plot(tuned["volume"], tuned[statistic], marker="o", label=label)[0]
            base = line[line["volume"] == 0]
            if not base.empty:
                ax.axhline(float(base[statistic].iloc[0]), ls="--", lw=1, color=handle.get_color(), alpha=0.7)
        ax.set_xscale("log", base=2)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples (log2)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} ({statistic}, 0–100)")
    axes[0].set_ylim(0, 100)
    handles, labels = axes[0].get_legend_handles_labels()
    for ax in axes[1:]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    rows = max(1, -(-len(labels) // 2))
    fig.legend(handles, labels, loc="lower center", ncol=min(2, max(1, len(labels))), fontsize=7,
               title="lines: fine-tuned; dashed: base model", title_fontsize=7, frameon=False)
    fig.suptitle(f"{metric.capitalize()} vs data volume", fontsize=11)
    fig.tight_layout(rect=(0, 0.06 + 0.05 * rows, 1, 1))
    return fig


def coverage_bars(metrics: pd.DataFrame, metric: str, zetas=(50, 70)):
    """coverage@ζ per volume, one panel per task (first local model and judge of each task)."""
    data = metrics[metrics["metric"] == metric]
    tasks = list(dict.fromkeys(data["task"]))
    fig, axes = _panels(max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        sub = data[data["task"] == task].sort_values("volume")
        volumes = sub["volume"].drop_duplicates().tolist()
        x = np.arange(len(volumes))
        width = 0.8 / max(1, len(zetas))
        for i, z in enumerate(zetas):
            values = [sub[sub["volume"] == v][f"coverage_{z}"].mean() for v in volumes]
            ax.bar(x + i * width - 0.4 + width / 2, values, width, label=f"coverage@{z}")
        ax.set_xticks(x, ["base" if v == 0 else str(v) for v in volumes])
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{metric}: % of answers ≥ ζ")
    axes[0].set_ylim(0, 100)
    axes[-1].legend(fontsize=8)
    fig.suptitle(f"Coverage of {metric}", fontsize=11)
    fig.tight_layout()
    return fig


FUNNEL_LABELS = {
    "requested": "requested", "input": "valid JSON", "after_exact": "after exact",
    "after_lsh_rouge": "after LSH +\nROUGE-L", "after_earlier": "after earlier\ncycles", "after_leakage": "after test\nleakage",
}


def funnel_plot(funnel: pd.DataFrame):
    """Pairs left after each step, per task: requested → valid JSON → each filter."""
    steps = [c for c in FUNNEL_LABELS if c in funnel.columns]
    x = np.arange(len(steps))
    width = 0.8 / max(1, len(funnel))
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    for i, (_, row) in enumerate(funnel.iterrows()):
        values = [row[s] for s in steps]
        bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=row["task"].replace("_", " "))
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x, [FUNNEL_LABELS[s] for s in steps], fontsize=8)
    ax.set_ylabel("pairs")
    ax.set_title("Synthesis and deduplication funnel")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def loss_curves(logs: pd.DataFrame):
    tasks = list(dict.fromkeys(logs["task"])) if not logs.empty else []
    fig, axes = _panels(max(1, len(tasks)), height=3.0)
    for ax, task in zip(axes, tasks):
        for (model, volume), log in logs[logs["task"] == task].groupby(["local_model", "volume"]):
            ax.plot(log["step"], log["loss"], marker=".", label=f"{model} · {volume}")
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("training loss")
    fig.tight_layout()
    return fig


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("report", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    stage.begin()
    out = stage_dir(run_dir, "report")
    metrics = evaluate.load_metrics(run_dir)
    zetas = params.evaluate.zetas
    written = []
    for metric in ("similarity", "precision"):
        written += save_figure(score_vs_volume(metrics, metric), out / f"{metric}_vs_volume")
        written += save_figure(coverage_bars(metrics, metric, zetas), out / f"{metric}_coverage")
    written += save_figure(funnel_plot(pd.read_csv(stage_dir(run_dir, "deduplicate") / "funnel.csv")), out / "dedup_funnel")
    logs = finetune.load_train_logs(run_dir)
    if not logs.empty:
        written += save_figure(loss_curves(logs), out / "training_loss")
    plt.close("all")
    write_csv(out / "metrics_table.csv", metrics_table(metrics, zetas))
    return stage.finish({"figures": len(written) // 2}, outputs={"figures": [str(p) for p in written]})


def metrics_table(metrics: pd.DataFrame, zetas=(50, 70)) -> pd.DataFrame:
    """The paper's table: one row per (task, model, judge, volume), similarity and precision side by side."""
    cols = ["mean", "median"] + [f"coverage_{z}" for z in zetas]
    wide = metrics.pivot_table(index=["task", "local_model", "judge", "volume"], columns="metric", values=cols)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    ordered = [f"{m}_{c}" for m in ("similarity", "precision") for c in cols if f"{m}_{c}" in wide.columns]
    return wide[ordered].round(1).reset_index()


def compare_runs(run_dirs: list[Path | str], out_dir: Path | str) -> list[Path]:
    """Overlay several runs: one line per (run, local model, judge) in the score-vs-volume figures."""
    frames = []
    for run_dir in run_dirs:
        metrics = evaluate.load_metrics(run_dir)
        frames.append(metrics.assign(local_model=Path(run_dir).name + ": " + metrics["local_model"].astype(str)))
    merged = pd.concat(frames, ignore_index=True)
    out_dir = Path(out_dir)
    written = []
    for metric in ("similarity", "precision"):
        written += save_figure(score_vs_volume(merged, metric), out_dir / f"{metric}_vs_volume")
    plt.close("all")
    write_csv(out_dir / "metrics.csv", merged)
    return written


# -- deeper evaluation: judge spread, pairwise verdicts, judge vs reference metrics ----------------


def judge_spread_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Judge reliability per metrics.csv row: spread over M (judge_std), failed share, the mean's 95% CI."""
    from .metrics import judge_spread

    return judge_spread(metrics)


def pairwise_bars(summary: pd.DataFrame):
    """Win / tie / loss of each fine-tuned volume against the base model (pairwise.csv), stacked, a panel per task.

    Each bar is labelled with its position inconsistency (% of pairs whose verdict flips with the order).
    """
    tasks = list(dict.fromkeys(summary["task"])) if not summary.empty else []
    fig, axes = _panels(max(1, len(tasks)))
    colours = {"win": "#4c9a5a", "tie": "#b9b9b9", "loss": "#c8553d"}
    for ax, task in zip(axes, tasks):
        sub = summary[summary["task"] == task].sort_values(["local_model", "judge", "volume"])
        labels = [f"{r.volume}" + (f"\n{r.local_model}" if sub["local_model"].nunique() > 1 else "")
                  + (f"\n{r.judge}" if sub["judge"].nunique() > 1 else "") for r in sub.itertuples()]
        x = np.arange(len(sub))
        bottom = np.zeros(len(sub))
        for part in ("win", "tie", "loss"):
            values = sub[part].fillna(0).to_numpy(dtype=float)
            ax.bar(x, values, 0.6, bottom=bottom, color=colours[part], label=part)
            bottom += values
        for xi, flip in zip(x, sub["position_inconsistency"]):
            ax.text(xi, 101, "–" if pd.isna(flip) else f"{flip:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x, labels, fontsize=8)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples (vs base model)")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("% of valid verdicts (both orders)")
    axes[0].set_ylim(0, 112)
    axes[-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("Pairwise vs the base model (numbers above bars: position inconsistency)", fontsize=10)
    fig.tight_layout()
    return fig


def judge_vs_reference_scatter(points: pd.DataFrame, correlations: pd.DataFrame, reference_metric: str = "rouge_l",
                               judge_metric: str = "similarity"):
    """The judge's answer-level score against a reference metric (refmetrics.judge_vs_reference), a panel per
    task, a colour per judge, the Spearman rho from correlations.csv in each panel's title."""
    tasks = list(dict.fromkeys(points["task"])) if not points.empty else []
    fig, axes = _panels(max(1, len(tasks)), height=3.6)
    for ax, task in zip(axes, tasks):
        sub = points[points["task"] == task]
        rhos = []
        for judge, group in sub.groupby("judge"):
            ax.scatter(group[reference_metric], group[judge_metric], s=14, alpha=0.6, label=judge)
            c = correlations
            match = c[(c["task"] == task) & (c["judge"] == judge) & (c["judge_metric"] == judge_metric)
                      & (c["reference_metric"] == reference_metric)] if not c.empty else c
            rho = float(match["spearman_rho"].iloc[0]) if len(match) else float("nan")
            rhos.append(f"ρ = {rho:.2f}" if not np.isnan(rho) else "ρ undefined")
        ax.set_title(f"{task.replace('_', ' ')} · Spearman {', '.join(rhos)}", fontsize=9)
        ax.set_xlabel(reference_metric.replace("_", "-").replace("rouge-l", "ROUGE-L F"))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"judge {judge_metric} (mean of M)")
    axes[0].set_ylim(-3, 103)
    if tasks:
        axes[-1].legend(fontsize=7, title="judge", title_fontsize=7)
    fig.suptitle(f"Judge {judge_metric} vs {axes[0].get_xlabel() or reference_metric} per answer", fontsize=10)
    fig.tight_layout()
    return fig
