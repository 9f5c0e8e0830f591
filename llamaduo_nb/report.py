"""Stage 7 · report: the paper's figures, the metrics table, and the answer browser.

Reads: `metrics.csv` (at the run folder's top, every cycle), each cycle's `dedup/funnel.csv`,
`models/` training logs and `manifest.json`, and `cycles.json` when the run cycled. Writes
`figures/*.png` and `figures/*.svg` (publication-ready: labelled axes, log2 volume axis, a panel
per task, a line per local model, shaded 95 % CI), `figures/metrics_table.csv`, DONE.json.

Cycles: cycle 1 is the run folder itself, cycle t ≥ 2 is `<run>/cycle-<t>/`. metrics.csv holds
the rows of every cycle (column `cycle`); a cycle ≥ 2 trains one adapter per (task, local model)
on everything kept so far, so its volume is the pool size. The base model (volume 0) is
answered again in every cycle; the figures and the table show it once (its first cycle).
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from . import cycle as _cycle
from . import evaluate, finetune
from .cycle import with_cycle
from .io import read_json, save_figure, write_csv
from .params import CycleTarget, Params
from .stage import STAGES, StageResult, StageRun, cycle_folders, root_of, stage_dir

NOT_THE_PAPER = (
    "Offline stand-in: the judge is the local model itself, scoring by likelihood. "
    "These numbers show the pipeline works; they are not the paper's numbers."
)
KEY = ["task", "local_model", "judge", "metric"]
CI_ALPHA = 0.18


# -- reading a run (every cycle) -------------------------------------------------------------------


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """metrics.csv of the run (the top folder's, which holds every cycle), with a `cycle` column."""
    return with_cycle(evaluate.load_metrics(root_of(run_dir)))


def base_once(metrics: pd.DataFrame) -> pd.DataFrame:
    """Drop the base model's (volume 0) repeats in later cycles: its first cycle's row stays."""
    data = with_cycle(metrics)
    base = data["volume"] == 0
    keys = [k for k in KEY if k in data.columns]
    first = data[base].sort_values("cycle", kind="stable").drop_duplicates(keys)
    return pd.concat([first, data[~base]]).sort_index()


def load_cycles(run_dir: Path | str) -> dict | None:
    """`<run>/cycles.json` (written by the runner when it cycles), or None."""
    path = root_of(run_dir) / _cycle.CYCLES_JSON
    return read_json(path) if path.exists() else None


def cycles_table(cycles: dict | None) -> pd.DataFrame:
    """cycles.json as a table: one row per (cycle, task, local model, judge) score checked against the target."""
    cols = ["cycle", "task", "local_model", "judge", "volume", "value", "met", "cycle_met", "new_pairs", "kept_pairs_total", "cost_usd"]
    rows = []
    for c in (cycles or {}).get("cycles", []):
        new, kept = c.get("new_pairs") or {}, c.get("kept_pairs_total") or {}
        for s in c.get("scores") or [{}]:
            task = s.get("task")
            rows.append({"cycle": c.get("cycle"), "task": task, "local_model": s.get("local_model"), "judge": s.get("judge"),
                         "volume": s.get("volume"), "value": s.get("value"), "met": s.get("met"), "cycle_met": c.get("met"),
                         "new_pairs": new.get(task) if task else sum(new.values()),
                         "kept_pairs_total": kept.get(task) if task else sum(kept.values()), "cost_usd": c.get("cost_usd")})
    return pd.DataFrame(rows, columns=cols)


def load_funnels(run_dir: Path | str) -> pd.DataFrame:
    """Every cycle's dedup/funnel.csv, with a `cycle` column."""
    frames = []
    for cycle, folder in cycle_folders(run_dir):
        path = stage_dir(folder, "deduplicate") / "funnel.csv"
        if path.exists():
            frames.append(pd.read_csv(path).assign(cycle=cycle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def load_train_logs(run_dir: Path | str) -> pd.DataFrame:
    """Every cycle's training logs, with a `cycle` column."""
    frames = []
    for cycle, folder in cycle_folders(run_dir):
        if stage_dir(folder, "finetune").exists():
            logs = finetune.load_train_logs(folder)
            if not logs.empty:
                frames.append(logs.assign(cycle=cycle))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


LLM_KEYS = ("requests", "cache_hits", "api_calls", "input_tokens", "output_tokens", "cost_usd")


def stage_costs(run_dir: Path | str) -> pd.DataFrame:
    """One row per (cycle, stage) from every cycle's manifest.json: wall time and the service-LLM
    accounting summed over services (judges included)."""
    cols = ["cycle", "stage", "seconds", *LLM_KEYS]
    rows = []
    for cycle, folder in cycle_folders(run_dir):
        path = Path(folder) / "manifest.json"
        if not path.exists():
            continue
        for stage, record in (read_json(path).get("stages") or {}).items():
            row = {"cycle": cycle, "stage": stage, "seconds": float(record.get("seconds") or 0.0)}
            for key in LLM_KEYS:
                row[key] = sum(float((acc or {}).get(key) or 0) for acc in (record.get("llm") or {}).values())
            rows.append(row)
    frame = pd.DataFrame(rows, columns=cols)
    order = {s: i for i, s in enumerate(STAGES)}
    return frame.sort_values(["cycle", "stage"], key=lambda s: s.map(order).fillna(len(order)) if s.name == "stage" else s,
                             kind="stable").reset_index(drop=True)


# -- figure helpers ----------------------------------------------------------------------------------


def _panels(n: int, width: float = 4.2, height: float = 3.4, sharey: bool = True):
    fig, axes = plt.subplots(1, n, figsize=(width * n, height), squeeze=False, sharey=sharey)
    return fig, axes[0]


def ci_columns(statistic: str) -> tuple[str, str] | None:
    """The metrics.csv columns of the 95 % CI of a statistic (mean, coverage_<ζ>); None for the median."""
    if statistic == "mean" or statistic.startswith("coverage_"):
        return f"{statistic}_ci_low", f"{statistic}_ci_high"
    return None


def stat_label(metric: str, statistic: str) -> str:
    if statistic.startswith("coverage_"):
        return f"{metric} coverage@{statistic.split('_', 1)[1]} (%)"
    return f"{metric} ({statistic}, 0–100)"


def _colours(keys) -> dict:
    """One colour per line key, the same in every panel."""
    return {key: f"C{i % 10}" for i, key in enumerate(dict.fromkeys(keys))}


def _line_label(model: str, judge: str, several_judges: bool) -> str:
    return f"{model} (judge {judge})" if several_judges else str(model)


def _shade(ax, x, frame: pd.DataFrame, statistic: str, color) -> None:
    cols = ci_columns(statistic)
    if not cols or not set(cols) <= set(frame.columns):
        return
    low, high = (pd.to_numeric(frame[c], errors="coerce").to_numpy(dtype=float) for c in cols)
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.fill_between(np.asarray(x, dtype=float)[ok], low[ok], high[ok], color=color, alpha=CI_ALPHA, lw=0, zorder=1)


def _has_ci(frame: pd.DataFrame, statistic: str) -> bool:
    cols = ci_columns(statistic)
    return bool(cols) and set(cols) <= set(frame.columns) and frame[list(cols)].notna().all(axis=1).any()


def _figure_legend(fig, axes, title: str, extra: list | None = None, ncol: int = 2) -> float:
    """One legend under the panels (lines of every panel, once); returns the bottom margin it needs."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels and not lab.startswith("_"):
                handles.append(h)
                labels.append(lab)
    for h in extra or []:
        handles.append(h)
        labels.append(h.get_label())
    if not handles:
        return 0.0
    ncol = min(ncol, len(labels))
    rows = -(-len(labels) // ncol)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, title=title, title_fontsize=7, frameon=False)
    height = fig.get_figheight()
    return min(0.45, (0.22 + 0.15 * rows) / height)


def score_vs_volume(metrics: pd.DataFrame, metric: str, statistic: str = "mean", ci: bool = True):
    """Score vs training volume (log2 axis), a panel per task, a line per local model (and judge,
    when there are several), the 95 % CI of the statistic shaded (none for the median); the base
    model (volume 0) as a dashed line. Points of cycles ≥ 2 (trained on the whole pool kept so far)
    sit on the same line, sorted by volume, drawn as open squares labelled c<t>."""
    data = base_once(metrics[metrics["metric"] == metric])
    tasks = list(dict.fromkeys(data["task"]))
    several = data["judge"].nunique() > 1
    fig, axes = _panels(max(1, len(tasks)))
    colours = _colours(data[["local_model", "judge"]].drop_duplicates().itertuples(index=False, name=None))
    later_cycles = shaded = False
    for ax, task in zip(axes, tasks):
        sub = data[data["task"] == task]
        for (model, judge), line in sub.groupby(["local_model", "judge"], sort=False):
            tuned = line[line["volume"] > 0].sort_values(["volume", "cycle"], kind="stable")
            color = colours[(model, judge)]
            ax.plot(tuned["volume"], tuned[statistic], marker="o", ms=4, zorder=3, color=color,
                    label=_line_label(model, judge, several))
            if ci and _has_ci(tuned, statistic):
                _shade(ax, tuned["volume"], tuned, statistic, color)
                shaded = True
            later = tuned[tuned["cycle"] > 1]
            if not later.empty:
                later_cycles = True
                ax.plot(later["volume"], later[statistic], ls="none", marker="s", ms=6, mfc="white", mec=color, mew=1.2, zorder=4)
            base = line[line["volume"] == 0]
            if not base.empty:
                ax.axhline(float(base[statistic].iloc[0]), ls="--", lw=1, color=color, alpha=0.7, zorder=2)
        for volume, cycle in sub.loc[(sub["cycle"] > 1) & (sub["volume"] > 0), ["volume", "cycle"]].drop_duplicates().itertuples(index=False):
            ax.axvline(volume, ls=":", lw=0.8, color="0.55", zorder=1)
            ax.text(volume, 1.5, f"c{cycle}", ha="center", va="bottom", fontsize=7, color="0.35",
                    bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none"})
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples (log2 scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(stat_label(metric, statistic))
    axes[0].set_ylim(0, 103)
    parts = ["lines: fine-tuned" + (" (shaded: 95% CI)" if shaded else ""), "dashed: base model"]
    extra = []
    if later_cycles:
        extra.append(Line2D([], [], ls="none", marker="s", mfc="white", mec="0.3", label="cycle ≥ 2 (c<t>: trained on the whole pool kept so far)"))
    bottom = _figure_legend(fig, axes, "; ".join(parts), extra)
    what = "mean" if statistic == "mean" else statistic.replace("coverage_", "coverage@")
    fig.suptitle(f"{metric.capitalize()} ({what}) vs data volume", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _first(values) -> str | None:
    values = list(dict.fromkeys(values))
    return values[0] if values else None


def coverage_bars(metrics: pd.DataFrame, metric: str, zetas=(50, 70), local_model: str | None = None,
                  judge: str | None = None, ci: bool = True):
    """coverage@ζ per volume, one panel per task, for one local model and judge (default: the first
    of each), with the 95 % CI as error bars when metrics.csv has it. Later cycles' volumes are
    labelled c<t>; the base model appears once."""
    data = base_once(metrics[metrics["metric"] == metric])
    local_model = local_model or _first(data["local_model"])
    judge = judge or _first(data["judge"])
    data = data[(data["local_model"] == local_model) & (data["judge"] == judge)]
    tasks = list(dict.fromkeys(data["task"]))
    fig, axes = _panels(max(1, len(tasks)))
    for ax, task in zip(axes, tasks):
        sub = data[data["task"] == task].sort_values(["volume", "cycle"], kind="stable")
        x = np.arange(len(sub))
        width = 0.8 / max(1, len(zetas))
        for i, z in enumerate(zetas):
            values = sub[f"coverage_{z}"].to_numpy(dtype=float)
            err = None
            if ci and _has_ci(sub, f"coverage_{z}"):
                low, high = (sub[c].to_numpy(dtype=float) for c in ci_columns(f"coverage_{z}"))
                err = np.nan_to_num(np.clip(np.vstack([values - low, high - values]), 0, None))
            ax.bar(x + i * width - 0.4 + width / 2, values, width, yerr=err, capsize=2,
                   error_kw={"elinewidth": 0.8, "ecolor": "0.25"}, label=f"coverage@{z}")
        ax.set_xticks(x, ["base" if r.volume == 0 else f"{r.volume}" + (f"\n(c{r.cycle})" if r.cycle > 1 else "")
                          for r in sub.itertuples()])
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{metric}: % of answers ≥ ζ")
    axes[0].set_ylim(0, 103)
    bottom = _figure_legend(fig, axes, "error bars: 95% CI" if ci else "", ncol=len(zetas))
    fig.suptitle(f"Coverage of {metric} · {local_model} · judge {judge}", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _target(target) -> CycleTarget:
    if isinstance(target, CycleTarget):
        return target
    return CycleTarget.model_validate(target)


def cycle_scores(metrics: pd.DataFrame, target, judge: str | None = None) -> pd.DataFrame:
    """`cycle.cycle_scores` (what the stop rule reads) for a target given as text, a mapping or a CycleTarget."""
    return _cycle.cycle_scores(metrics, _target(target), judge)


def score_across_cycles(metrics: pd.DataFrame, target, judge: str | None = None, stop_reason: str | None = None):
    """The target statistic of the target metric at each cycle's largest volume, a panel per task, a
    line per local model, the 95 % CI shaded, the threshold dashed; filled points met the target.
    Works for one cycle (one point per line)."""
    target = _target(target)
    best = cycle_scores(metrics, target, judge)
    tasks = list(dict.fromkeys(best["task"])) if not best.empty else []
    cycles = int(best["cycle"].max()) if not best.empty else 1
    width = max(4.2, 2.6 + 0.5 * cycles)
    reason = textwrap.fill(f"stopped: {stop_reason}", max(60, int(width * max(1, len(tasks)) * 15))) if stop_reason else ""
    fig, axes = _panels(max(1, len(tasks)), width=width, height=3.4 + 0.17 * (reason.count("\n") + bool(reason)))
    colours = _colours(best["local_model"]) if not best.empty else {}
    shaded = False
    for ax, task in zip(axes, tasks):
        for model, line in best[best["task"] == task].groupby("local_model", sort=False):
            color = colours[model]
            ax.plot(line["cycle"], line["value"], marker="o", ms=6, mfc="white", zorder=3, color=color, label=str(model))
            hit = line[line["met"]]
            ax.plot(hit["cycle"], hit["value"], ls="none", marker="o", ms=6, color=color, zorder=4)
            if _has_ci(line, target.statistic):
                shaded = True
                if len(line) > 1:
                    _shade(ax, line["cycle"], line, target.statistic, color)
                else:  # one cycle: a band has no width, so an error bar
                    low, high = (float(line[c].iloc[0]) for c in ci_columns(target.statistic))
                    value = float(line["value"].iloc[0])
                    ax.errorbar(line["cycle"], line["value"], yerr=[[max(0.0, value - low)], [max(0.0, high - value)]],
                                fmt="none", ecolor=color, elinewidth=1, capsize=3, zorder=2)
        ax.axhline(target.threshold, ls="--", lw=1.2, color="0.25", zorder=2, label=f"target: {target}")
        volumes = best[best["task"] == task].groupby("cycle")["volume"].agg(lambda v: "/".join(f"{x:g}" for x in sorted(set(v))))
        ax.set_xticks(range(1, cycles + 1), [f"{c}\nn={volumes[c]}" if c in volumes.index else str(c) for c in range(1, cycles + 1)])
        ax.set_xlim(0.6, cycles + 0.4)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("cycle (training samples)")
        ax.grid(alpha=0.3)
    if best.empty:
        axes[0].text(0.5, 0.5, f"no {target.metric} {target.statistic} scores\n(is ζ in evaluate.zetas?)", ha="center",
                     va="center", transform=axes[0].transAxes, color="0.4")
    axes[0].set_ylabel(stat_label(target.metric, target.statistic))
    axes[0].set_ylim(0, 103)
    title = "n: training samples at the cycle's largest volume; filled: target met" + (
        ("; shaded: 95% CI" if cycles > 1 else "; bars: 95% CI") if shaded else "")
    bottom = _figure_legend(fig, axes, title)
    heading = f"{stat_label(target.metric, target.statistic).split(' (')[0].capitalize()} across cycles"
    fig.suptitle(heading + ("\n" + reason if reason else ""), fontsize=10)  # the reason wrapped to the figure's width
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def cost_per_stage(run_dir_or_costs):
    """Service-LLM calls, estimated cost (USD) and wall time per stage, bars grouped by cycle, from every
    cycle's manifest.json (or a `stage_costs` frame)."""
    costs = run_dir_or_costs if isinstance(run_dir_or_costs, pd.DataFrame) else stage_costs(run_dir_or_costs)
    stages = [s for s in STAGES if s in set(costs["stage"])] + sorted(set(costs["stage"]) - set(STAGES))
    cycles = sorted(costs["cycle"].unique()) if not costs.empty else [1]
    minutes = not costs.empty and costs["seconds"].max() > 600
    panels = [("api_calls", "service-LLM API calls", "{:.0f}"), ("cost_usd", "estimated cost (USD)", "{:.2f}"),
              ("seconds", "wall time (min)" if minutes else "wall time (s)", "{:.0f}")]
    fig, axes = _panels(3, width=4.0, height=3.4, sharey=False)
    x = np.arange(len(stages))
    width = 0.8 / max(1, len(cycles))
    colours = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, max(2, len(cycles))))
    for ax, (column, label, fmt) in zip(axes, panels):
        for i, cycle in enumerate(cycles):
            sub = costs[costs["cycle"] == cycle].set_index("stage")
            values = np.array([float(sub[column].get(s, 0.0)) if s in sub.index else 0.0 for s in stages])
            if column == "seconds" and minutes:
                values = values / 60.0
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, color=colours[i], label=f"cycle {cycle}")
            if len(cycles) <= 4 and column != "seconds":
                ax.bar_label(bars, labels=[fmt.format(v) if v else "" for v in values], fontsize=6, padding=2,
                             rotation=90 if len(cycles) > 1 else 0)
        ax.set_xticks(x, stages, rotation=35, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.18)
    if costs.empty or costs["cost_usd"].sum() == 0:
        note = ("no service cost recorded:\nlocal stand-in, or prices\n(service.price_*_per_mtok) not set"
                if not costs.empty and costs["requests"].sum() else "no service cost recorded")
        axes[1].text(0.5, 0.6, note, transform=axes[1].transAxes, ha="center", va="center", fontsize=8, color="0.35")
        axes[1].set_ylim(0, 1)
    bottom = _figure_legend(fig, axes[-1:], "", ncol=len(cycles)) if len(cycles) > 1 else 0.0
    fig.suptitle("Service-LLM calls, estimated cost and wall time per stage" + (" and cycle" if len(cycles) > 1 else ""), fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


FUNNEL_LABELS = {
    "requested": "requested", "input": "valid JSON", "after_exact": "after exact",
    "after_lsh_rouge": "after LSH +\nROUGE-L", "after_earlier": "after earlier\ncycles", "after_leakage": "after test\nleakage",
}


def funnel_plot(funnel: pd.DataFrame):
    """Pairs left after each step, per task: requested → valid JSON → each filter; a panel per cycle
    when the frame has several (a step a cycle did not run removed nothing there)."""
    funnel = with_cycle(funnel) if not funnel.empty else funnel.assign(cycle=[])
    steps = [c for c in FUNNEL_LABELS if c in funnel.columns]
    cycles = sorted(funnel["cycle"].unique()) or [1]
    ncols = min(3, len(cycles))
    nrows = -(-len(cycles) // ncols)
    width = 7.5 if len(cycles) == 1 else 5.2
    fig, grid = plt.subplots(nrows, ncols, figsize=(width * ncols, 3.4 * nrows), squeeze=False, sharey=True)
    axes = grid.ravel()
    for ax in axes[len(cycles):]:
        ax.set_visible(False)
    x = np.arange(len(steps))
    for ax, cycle in zip(axes, cycles):
        sub = funnel[funnel["cycle"] == cycle]
        width = 0.8 / max(1, len(sub))
        for i, (_, row) in enumerate(sub.iterrows()):
            values = pd.Series([row[s] for s in steps], dtype=float).ffill().to_numpy()
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, label=row["task"].replace("_", " "), color=f"C{i}")
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=6 if len(sub) > 2 else 7)
        ax.set_xticks(x, [FUNNEL_LABELS[s] for s in steps], fontsize=7.5 if len(cycles) > 1 else 8)
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.1)
        if len(cycles) > 1:
            ax.set_title(f"cycle {cycle}", fontsize=9)
    for row in grid:
        row[0].set_ylabel("pairs")
    if not funnel.empty:
        axes[len(cycles) - 1].legend(fontsize=8)
    if len(cycles) > 1:
        fig.suptitle("Synthesis and deduplication funnel per cycle", fontsize=11)
    else:
        axes[0].set_title("Synthesis and deduplication funnel")
    fig.tight_layout()
    return fig


def loss_curves(logs: pd.DataFrame):
    tasks = list(dict.fromkeys(logs["task"])) if not logs.empty else []
    logs = with_cycle(logs) if not logs.empty else logs
    fig, axes = _panels(max(1, len(tasks)), height=3.0)
    for ax, task in zip(axes, tasks):
        for (model, volume, cycle), log in logs[logs["task"] == task].groupby(["local_model", "volume", "cycle"]):
            ax.plot(log["step"], log["loss"], marker=".", label=f"{model} · {volume}" + (f" (c{cycle})" if cycle > 1 else ""))
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
    metrics = load_metrics(run_dir)
    zetas = params.evaluate.zetas
    written = []
    for metric in ("similarity", "precision"):
        written += save_figure(score_vs_volume(metrics, metric), out / f"{metric}_vs_volume")
        written += save_figure(coverage_bars(metrics, metric, zetas), out / f"{metric}_coverage")
    target = params.cycle.target
    cycles = load_cycles(run_dir)
    written += save_figure(score_across_cycles(metrics, target, judge=params.judges[0].label,
                                               stop_reason=(cycles or {}).get("stop_reason")), out / "score_across_cycles")
    written += save_figure(cost_per_stage(root_of(run_dir)), out / "cost_per_stage")
    funnels = load_funnels(run_dir)
    if not funnels.empty:
        written += save_figure(funnel_plot(funnels), out / "dedup_funnel")
    logs = load_train_logs(run_dir)
    if not logs.empty:
        written += save_figure(loss_curves(logs), out / "training_loss")
    plt.close("all")
    write_csv(out / "metrics_table.csv", metrics_table(metrics, zetas))
    return stage.finish({"figures": len(written) // 2}, outputs={"figures": [str(p) for p in written]})


def metrics_table(metrics: pd.DataFrame, zetas=(50, 70)) -> pd.DataFrame:
    """The paper's table: one row per (cycle, task, model, judge, volume), similarity and precision side
    by side (the base model once, in its first cycle)."""
    cols = ["mean", "median"] + [f"coverage_{z}" for z in zetas]
    index = ["cycle", "task", "local_model", "judge", "volume"]
    wide = base_once(metrics).pivot_table(index=index, columns="metric", values=cols)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    ordered = [f"{m}_{c}" for m in ("similarity", "precision") for c in cols if f"{m}_{c}" in wide.columns]
    return wide[ordered].round(1).reset_index()


def compare_runs(run_dirs: list[Path | str], out_dir: Path | str) -> list[Path]:
    """Overlay several runs: one line per (run, local model, judge) in the score-vs-volume figures."""
    frames = []
    for run_dir in run_dirs:
        metrics = load_metrics(run_dir)
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
