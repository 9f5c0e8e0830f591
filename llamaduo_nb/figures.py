"""The report's figures: publication-ready matplotlib figures drawn from tables (no run-folder IO).

Labelled axes, a log2 volume axis, a panel per task, a line per local model, shaded 95 % CI. The
report stage (`stages/report.py`) reads the run and saves them as PNG + SVG; notebooks draw them inline.

One visual language in every figure, so a reader learns it once:
- a panel per task (tasks never get a colour);
- a colour per local model (`model_colours`: matplotlib's tab10 in the models' sorted order, so a model keeps
  its colour in every figure of a run), lighter shades of it for smaller volumes where volumes share a panel;
- the service LLM always `SERVICE_COLOUR`, a dash-dot line with its 95 % CI as a band;
- the base model (volume 0) always dashed, in its model's colour;
- cycles as shades of viridis (cost, funnel); judges as marker shapes (`JUDGE_MARKERS`);
- pairwise outcomes green / grey / red (win / tie / loss).
"""

from __future__ import annotations

import textwrap

import matplotlib
import matplotlib.patches
import matplotlib.ticker

matplotlib.use("Agg") if matplotlib.get_backend().lower() in ("", "agg") else None
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.lines import Line2D

from llamaduo_nb.methods import verdict
from llamaduo_nb.core.rows import is_service
from llamaduo_nb.core.rows import with_cycle
from llamaduo_nb.core.params import CycleTarget
from llamaduo_nb.methods.metrics import judge_spread

KEY = ["task", "local_model", "judge", "metric"]
CI_ALPHA = 0.18
SERVICE_COLOUR = "0.15"
JUDGE_MARKERS = ("o", "s", "^", "D", "v", "P")
OUTCOME_COLOURS = {"win": "#4c9a5a", "tie": "#b9b9b9", "loss": "#c8553d"}


def model_colours(models) -> dict:
    """A colour per local model: tab10 in sorted order (the same in every figure of a run); the service LLM's
    rows, if passed, get `SERVICE_COLOUR`."""
    names = sorted({str(m) for m in models if not is_service(pd.Series([m])).iloc[0]})
    colours = {name: f"C{i % 10}" for i, name in enumerate(names)}
    colours.update({str(m): SERVICE_COLOUR for m in models if str(m) not in colours})
    return colours


def judge_markers(judges) -> dict:
    return {judge: JUDGE_MARKERS[i % len(JUDGE_MARKERS)] for i, judge in enumerate(sorted(set(judges)))}


def cycle_colours(cycles) -> dict:
    """Cycles as shades of viridis (never a model's colour)."""
    cycles = sorted(set(int(c) for c in cycles)) or [1]
    shades = plt.get_cmap("viridis")(np.linspace(0.15, 0.85, max(2, len(cycles))))
    return {c: shades[i] for i, c in enumerate(cycles)}


def shade_of(colour, share: float):
    """`colour` blended towards white: share 1 is the colour itself, 0.35 a light tint (smaller volumes)."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    return tuple(1 - share * (1 - rgb))


def base_once(metrics: pd.DataFrame) -> pd.DataFrame:
    """Drop the repeats in later cycles of the base model (volume 0) and of the service LLM (answered
    alike in every cycle): their first cycle's row stays."""
    data = with_cycle(metrics)
    once = ((data["volume"] == 0) | is_service(data["local_model"])).to_numpy()
    keys = [k for k in KEY if k in data.columns]
    first = data[once].sort_values("cycle", kind="stable").drop_duplicates(keys)
    return pd.concat([first, data[~once]]).sort_index()


def split_service(metrics: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(the local models' rows, the service LLM's own rows) of a metrics table."""
    mask = is_service(metrics["local_model"]).to_numpy() if len(metrics) else np.zeros(0, dtype=bool)
    return metrics[~mask], metrics[mask]


def service_band(ax, service: pd.DataFrame, statistic: str, color=SERVICE_COLOUR, label: str | None = None) -> bool:
    """The service LLM's value as a horizontal line across the panel, its 95 % CI as a band; True when drawn."""
    if service.empty or statistic not in service.columns or pd.isna(service[statistic].iloc[0]):
        return False
    row = service.iloc[0]
    ax.axhline(float(row[statistic]), ls="-.", lw=1.3, color=color, zorder=2, label=label)
    cols = ci_columns(statistic)
    if cols and set(cols) <= set(service.columns) and pd.notna(row[cols[0]]) and pd.notna(row[cols[1]]):
        ax.axhspan(float(row[cols[0]]), float(row[cols[1]]), color=color, alpha=0.10, lw=0, zorder=0)
    return True


def service_label(local_model: str) -> str:
    return "service LLM " + str(local_model).split(":", 1)[1] if ":" in str(local_model) else str(local_model)


def task_order(tasks) -> list:
    """The tasks in one order for every figure and table (alphabetical, as metrics.csv sorts them)."""
    return sorted({str(t) for t in tasks})


def volume_text(volume) -> str:
    """A training volume as the paper writes it: 1k … 256k from a thousand samples on, 0 as "base"."""
    volume = float(volume)
    if volume == 0:
        return "base"
    if volume >= 1000 and volume % 1000 == 0:
        return f"{volume / 1000:g}k"
    if volume >= 1024 and volume % 1024 == 0:
        return f"{volume / 1024:g}Ki"
    return f"{volume:g}"


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
    data, service = split_service(base_once(metrics[metrics["metric"] == metric]))
    tasks = task_order(data["task"])
    several = data["judge"].nunique() > 1
    fig, axes = _panels(max(1, len(tasks)))
    colours = model_colours(data["local_model"])
    markers = judge_markers(data["judge"])
    later_cycles = shaded = banded = False
    for ax, task in zip(axes, tasks):
        for (name, judge), rows in service[service["task"] == task].groupby(["local_model", "judge"], sort=False):
            label = service_label(name) + (f" (judge {judge})" if several else "")
            banded |= service_band(ax, rows, statistic, label=label)
        sub = data[data["task"] == task]
        for (model, judge), line in sub.groupby(["local_model", "judge"], sort=False):
            tuned = line[line["volume"] > 0].sort_values(["volume", "cycle"], kind="stable")
            color = colours[str(model)]
            ax.plot(tuned["volume"], tuned[statistic], marker=markers[judge], ms=4, zorder=3, color=color,
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
        if not (sub["volume"] > 0).any():  # nothing fine-tuned (e.g. deduplication kept no pair): the base model alone
            ax.set_xlim(1, 2)
            ax.text(0.5, 0.5, "no fine-tuned volume", transform=ax.transAxes, ha="center", va="center", color="0.4")
        ax.set_xscale("log", base=2)
        ticks = sorted(set(sub.loc[sub["volume"] > 0, "volume"].astype(float)))
        ticks = ticks[::-(-len(ticks) // 6)] if ticks else ticks  # at most 6 labelled volumes a panel
        ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: volume_text(v)))
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples (log2 scale)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(stat_label(metric, statistic))
    axes[0].set_ylim(0, 103)
    parts = ["lines: fine-tuned" + (" (shaded: 95% CI)" if shaded else ""), "dashed: base model"]
    if banded:
        parts.append("dash-dot: the service LLM's own answers (band: 95% CI)")
    extra = [Line2D([], [], ls="--", lw=1, color="0.4", label="base model (no fine-tuning)")] if (data["volume"] == 0).any() else []
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
    """coverage@ζ per volume, one panel per task, for one local model and judge (default: the first of each):
    a bar per ζ in the model's colour (lighter for the smaller ζ), the 95 % CI as error bars when metrics.csv
    has it, and the service LLM's coverage@ζ as its dash-dot line with its band, labelled with its ζ at the
    right. Later cycles' volumes are labelled c<t>; the base model appears once, hatched."""
    data, service = split_service(base_once(metrics[metrics["metric"] == metric]))
    local_model = local_model or _first(data["local_model"])
    judge = judge or _first(data["judge"])
    colour = model_colours(data["local_model"]).get(str(local_model), "C0")
    data = data[(data["local_model"] == local_model) & (data["judge"] == judge)]
    service = service[service["judge"] == judge]
    tasks = task_order(data["task"])
    zetas = list(zetas)
    bars = max([int((data["task"] == t).sum()) for t in tasks] or [1])
    fig, axes = _panels(max(1, len(tasks)), width=max(4.2, 1.2 + 0.42 * bars))
    banded = False
    for ax, task in zip(axes, tasks):
        sub = data[data["task"] == task].sort_values(["volume", "cycle"], kind="stable")
        x = np.arange(len(sub))
        width = 0.8 / max(1, len(zetas))
        rows = service[service["task"] == task]
        for i, z in enumerate(zetas):
            share = 1.0 if len(zetas) == 1 else 0.45 + 0.55 * i / (len(zetas) - 1)
            label = f"{service_label(rows['local_model'].iloc[0])}: coverage@{z}" if len(rows) else None
            if service_band(ax, rows, f"coverage_{z}", label=label):
                banded = True
                ax.annotate(f"ζ={z}", (1.0, float(rows[f"coverage_{z}"].iloc[0])), xycoords=("axes fraction", "data"),
                            xytext=(2, 0), textcoords="offset points", va="center", ha="left", fontsize=7, color=SERVICE_COLOUR)
            values = sub[f"coverage_{z}"].to_numpy(dtype=float)
            err = None
            if ci and _has_ci(sub, f"coverage_{z}"):
                low, high = (sub[c].to_numpy(dtype=float) for c in ci_columns(f"coverage_{z}"))
                err = np.nan_to_num(np.clip(np.vstack([values - low, high - values]), 0, None))
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, yerr=err, capsize=2, color=shade_of(colour, share),
                          edgecolor=colour, lw=0.6, error_kw={"elinewidth": 0.8, "ecolor": "0.25"})
            for bar, volume in zip(bars, sub["volume"]):
                if volume == 0:  # the base model: dashed in line figures, hatched (on a light tint, so the hatch shows) here
                    bar.set_hatch("///")
                    bar.set_facecolor(shade_of(colour, 0.3 * share))
        ax.set_xticks(x, [volume_text(r.volume) + (f"\nc{r.cycle}" if r.cycle > 1 else "") for r in sub.itertuples()],
                      fontsize=8 if len(sub) > 6 else 10)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel(f"{metric}: % of answers ≥ ζ")
    axes[0].set_ylim(0, 103)
    title = "; ".join(p for p in ["error bars: 95% CI" if ci else "", "hatched: the base model",
                                  "dash-dot: the service LLM's own answers (band: 95% CI)" if banded else ""] if p)
    shares = [1.0] if len(zetas) == 1 else [0.45 + 0.55 * i / (len(zetas) - 1) for i in range(len(zetas))]
    handles = [matplotlib.patches.Patch(facecolor=shade_of(colour, share), edgecolor=colour, label=f"coverage@{z}")
               for z, share in zip(zetas, shares)]  # the ζ's own colour: a bar container's handle would show the base's hatch
    bottom = _figure_legend(fig, axes, title, handles, ncol=len(zetas))
    fig.suptitle(f"Coverage of {metric} · {local_model} · judge {judge}", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def _rule(rule, judge: str | None = None) -> verdict.Rule:
    """A `verdict.Rule` from a rule, a `CycleTarget`, its text or its mapping."""
    if isinstance(rule, verdict.Rule):
        return rule
    target = rule if isinstance(rule, CycleTarget) else CycleTarget.model_validate(rule)
    return verdict.Rule.from_target(target, verdict.ALPHA, judge)


def _verdict_axis_label(rule: verdict.Rule) -> str:
    if rule.versus_service:
        who = "local − service" if rule.scale == 1 else f"local − {rule.scale:g} × service"
        return f"{who},\n{rule.metric} {rule.statistic.replace('coverage_', 'coverage@')} (points)"  # two lines: a one-panel figure is short
    return stat_label(rule.metric, rule.statistic)


def _show_bound(ax, rule: verdict.Rule) -> None:
    """Keep the bound's dashed line inside the axes with room around it (not on the frame)."""
    if not rule.versus_service:
        return
    low, high = ax.get_ylim()
    pad = 0.08 * (high - low)
    ax.set_ylim(min(low, rule.bound - pad), max(high, rule.bound + pad))


def _bound_label(rule: verdict.Rule) -> str:
    if rule.versus_service:
        return f"margin: −δ = {rule.bound:g}" if rule.scale == 1 else f"bound {rule.bound:g}"
    return f"threshold {rule.threshold:g}"


def _verdict_points(ax, x, rows: pd.DataFrame, color, label: str | None) -> None:
    """Estimates with their interval; filled: passed in the fixed sequence, open: tested and not passed, grey:
    not reached; a cross where no interval could be given (too few prompts)."""
    est = rows["estimate"].astype(float).to_numpy()
    low, high = rows["low"].astype(float).to_numpy(), rows["high"].astype(float).to_numpy()
    ok = np.isfinite(low) & np.isfinite(high)
    x = np.asarray(x, dtype=float)
    ax.plot(x, est, color=color, lw=1, zorder=2, label=label)
    if ok.any():
        ax.errorbar(x[ok], est[ok], yerr=[est[ok] - low[ok], high[ok] - est[ok]], fmt="none", ecolor=color, elinewidth=1.2,
                    capsize=3, zorder=3)
    status = rows["sequence"].to_numpy() if "sequence" in rows else np.array([""] * len(rows))
    for xi, yi, st, has in zip(x, est, status, ok):
        if not np.isfinite(yi):
            continue
        if not has:
            ax.plot(xi, yi, marker="x", ms=7, color=color, zorder=4)
        elif st == verdict.PASSED:
            ax.plot(xi, yi, marker="o", ms=7, color=color, zorder=4)
        elif st in (verdict.NOT_REACHED, verdict.NOT_NEEDED):
            ax.plot(xi, yi, marker="o", ms=6, mfc="white", mec="0.6", zorder=4)
        else:
            ax.plot(xi, yi, marker="o", ms=7, mfc="white", mec=color, mew=1.5, zorder=4)


def _verdict_legend(rule: verdict.Rule) -> list:
    passed, after = ("passed (the search's first)", "trained, not needed") if rule.search else \
        ("passed (fixed sequence)", "not reached (sequence stopped)")
    return [Line2D([], [], ls="none", marker="o", color="0.3", label=passed),
            Line2D([], [], ls="none", marker="o", mfc="white", mec="0.3", mew=1.5, label="tested, not shown"),
            Line2D([], [], ls="none", marker="o", mfc="white", mec="0.6", label=after),
            Line2D([], [], ls="none", marker="x", color="0.3", label="too few prompts to decide"),
            Line2D([], [], ls="--", color="0.25", label=_bound_label(rule))]


def verdict_by_volume(verdicts: pd.DataFrame, rule, judge: str | None = None, grid: list[int] | None = None):
    """The verdict per volume: the estimate (local − service, or the statistic for an absolute target) with its
    (1 − 2α) interval, the bound it must clear dashed, a panel per task, a line per local model; the chosen
    (smallest passed) volume ringed. The base model at the left, at "0". `grid`: the volume search's grid, whose
    volumes it did not train are marked "not trained"."""
    rule = _rule(rule, judge)
    tasks = task_order(verdicts["task"]) if len(verdicts) else []
    fig, axes = _panels(max(1, len(tasks)), sharey=False)
    colours = model_colours(verdicts["local_model"]) if len(verdicts) else {}
    for ax, task in zip(axes, tasks):
        sub = verdicts[verdicts["task"] == task]
        trained = set(sub["volume"].astype(int))
        volumes = sorted(trained | set(grid or []))
        position = {v: i for i, v in enumerate(volumes)}  # evenly spaced: volumes double, and the base model is 0
        for model, line in sub.groupby("local_model", sort=False):
            line = line.sort_values(["volume", "cycle"])
            _verdict_points(ax, [position[int(v)] for v in line["volume"]], line, colours[str(model)], str(model))
            chosen = line[line["chosen"].astype(bool)]
            for r in chosen.itertuples():
                ax.plot(position[int(r.volume)], r.estimate, marker="o", ms=14, mfc="none", mec=colours[str(model)], mew=1.2, zorder=5)
                ax.annotate("chosen", (position[int(r.volume)], r.estimate), textcoords="offset points", xytext=(0, 11),
                            ha="center", fontsize=7, color=colours[str(model)])
        ax.axhline(rule.bound, ls="--", lw=1.2, color="0.25", zorder=1)
        _show_bound(ax, rule)
        if rule.versus_service and rule.bound != 0:
            ax.axhline(0, ls=":", lw=0.8, color="0.5", zorder=1)
        labels = [volume_text(v) + (f"\nc{c}" if c > 1 else "") + ("" if v in trained else "\nnot trained")
                  for v, c in [(v, int(sub.loc[sub["volume"] == v, "cycle"].max()) if v in trained else 1) for v in volumes]]
        ax.set_xticks(range(len(volumes)), labels, fontsize=8)
        for tick, v in zip(ax.get_xticklabels(), volumes):  # the search's untrained volumes, greyed under their tick
            if v not in trained:
                tick.set_color("0.55")
        ax.set_xlim(-0.5, len(volumes) - 0.5)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("training samples")
        ax.grid(alpha=0.3)
        if not rule.versus_service:
            ax.set_ylim(0, 103)
    if not tasks:
        axes[0].text(0.5, 0.5, "no verdict yet", ha="center", va="center", transform=axes[0].transAxes, color="0.4")
    axes[0].set_ylabel(_verdict_axis_label(rule))
    title = f"bars: {100 * rule.level:.3g}% CI ({rule.method}); {rule.alpha_text()} one-sided"
    bottom = _figure_legend(fig, axes, title, _verdict_legend(rule), ncol=3)
    heading = "Not worse than the service LLM?" if rule.versus_service else f"Meets {rule.what()} ≥ {rule.threshold:g}?"
    order = "The volume search: volumes tried smallest first" if rule.search else "Volumes tested largest first"
    fig.suptitle(f"{heading} {order}", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def score_across_cycles(verdicts: pd.DataFrame, rule, judge: str | None = None, stop_reason: str | None = None):
    """The verdict at each cycle's largest volume (what the stop rule reads), a panel per task, a line per local
    model, with its interval and the bound dashed; filled points passed. Works for one cycle (one point per line)."""
    rule = _rule(rule, judge)
    best = verdict.cycle_verdicts(verdicts) if len(verdicts) else verdicts
    tasks = task_order(best["task"]) if len(best) else []
    cycles = int(best["cycle"].max()) if len(best) else 1
    width = max(4.2, 2.6 + 0.5 * cycles)
    reason = textwrap.fill(f"stopped: {stop_reason}", max(50, int(width * max(1, len(tasks)) * 11))) if stop_reason else ""
    fig, axes = _panels(max(1, len(tasks)), width=width, height=3.4 + 0.17 * (reason.count("\n") + bool(reason)), sharey=False)
    colours = model_colours(best["local_model"]) if len(best) else {}
    for ax, task in zip(axes, tasks):
        for model, line in best[best["task"] == task].groupby("local_model", sort=False):
            line = line.assign(sequence=np.where(line["passed"].astype(bool), verdict.PASSED, verdict.FAILED))
            _verdict_points(ax, line["cycle"], line, colours[str(model)], str(model))
        ax.axhline(rule.bound, ls="--", lw=1.2, color="0.25", zorder=1)
        _show_bound(ax, rule)
        volumes = best[best["task"] == task].groupby("cycle")["volume"].agg(lambda v: "/".join(volume_text(x) for x in sorted(set(v))))
        ax.set_xticks(range(1, cycles + 1), [f"{c}\nn={volumes[c]}" if c in volumes.index else str(c) for c in range(1, cycles + 1)])
        ax.set_xlim(0.6, cycles + 0.4)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("cycle (training samples)")
        ax.grid(alpha=0.3)
        if not rule.versus_service:
            ax.set_ylim(0, 103)
    if best.empty:
        axes[0].text(0.5, 0.5, f"no {rule.metric} verdict yet", ha="center", va="center", transform=axes[0].transAxes, color="0.4")
    axes[0].set_ylabel(_verdict_axis_label(rule))
    legend = [h for h in _verdict_legend(rule) if "reached" not in h.get_label() and "not needed" not in h.get_label()]
    title = f"n: training samples at the cycle's largest volume; bars: {100 * rule.level:.3g}% CI"
    bottom = _figure_legend(fig, axes, title, legend, ncol=2)
    heading = f"{rule.what().capitalize()} across cycles"
    fig.suptitle(heading + ("\n" + reason if reason else ""), fontsize=10)  # the reason wrapped to the figure's width
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def cost_per_stage(costs: pd.DataFrame):
    """Service-LLM calls, estimated cost (USD) and wall time per stage, bars grouped by cycle (a
    `stages.report.stage_costs` frame, read from every cycle's manifest.json, stages in the order they run)."""
    stages = list(dict.fromkeys(costs["stage"]))
    cycles = sorted(costs["cycle"].unique()) if not costs.empty else [1]
    minutes = not costs.empty and costs["seconds"].max() > 600
    panels = [("api_calls", "service-LLM API calls", "{:.0f}"), ("cost_usd", "estimated cost (USD)", "{:.2f}"),
              ("seconds", "wall time (min)" if minutes else "wall time (s)", "{:.0f}")]
    fig, axes = _panels(3, width=4.0, height=3.4, sharey=False)
    x = np.arange(len(stages))
    width = 0.8 / max(1, len(cycles))
    shades = cycle_colours(cycles)
    for ax, (column, label, fmt) in zip(axes, panels):
        for i, cycle in enumerate(cycles):
            sub = costs[costs["cycle"] == cycle].set_index("stage")
            values = np.array([float(sub[column].get(s, 0.0)) if s in sub.index else 0.0 for s in stages])
            if column == "seconds" and minutes:
                values = values / 60.0
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, color=shades[int(cycle)], label=f"cycle {cycle}")
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
    "requested": "requested", "input": "valid\nJSON", "after_exact": "after\nexact",
    "after_lsh_rouge": "after LSH\n+ROUGE-L", "after_earlier": "after\nearlier\ncycles", "after_leakage": "after\ntest\nleakage",
}


def funnel_plot(funnel: pd.DataFrame):
    """Pairs left after each step, a panel per task: requested → valid JSON → each filter, a bar per cycle (shades
    of viridis, as in the cost figure; a step a cycle did not run removed nothing there)."""
    funnel = with_cycle(funnel) if not funnel.empty else funnel.assign(cycle=[], task=[])
    steps = [c for c in FUNNEL_LABELS if c in funnel.columns]
    cycles = sorted(int(c) for c in funnel["cycle"].unique()) or [1]
    tasks = task_order(funnel["task"])
    shades = cycle_colours(cycles)
    fig, axes = _panels(max(1, len(tasks)), width=max(4.2, 0.2 + 0.7 * len(steps) + 0.3 * len(steps) * (len(cycles) - 1)))
    x = np.arange(len(steps))
    width = 0.8 / len(cycles)
    for ax, task in zip(axes, tasks):
        sub = funnel[funnel["task"] == task]
        for i, cycle in enumerate(cycles):
            rows = sub[sub["cycle"] == cycle]
            if rows.empty:
                continue
            values = pd.Series([rows.iloc[0][s] for s in steps], dtype=float).ffill().to_numpy()
            bars = ax.bar(x + i * width - 0.4 + width / 2, values, width, color=shades[cycle], label=f"cycle {cycle}")
            ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=6 if len(cycles) > 1 else 7,
                         rotation=90 if len(cycles) > 2 else 0, padding=1)
        ax.set_xticks(x, [FUNNEL_LABELS[s] for s in steps], fontsize=7)
        ax.set_title(task.replace("_", " "))
        ax.grid(axis="y", alpha=0.3)
        ax.margins(y=0.15)
    axes[0].set_ylabel("pairs")
    if funnel.empty:
        axes[0].text(0.5, 0.5, "no deduplication yet", ha="center", va="center", transform=axes[0].transAxes, color="0.4")
    bottom = _figure_legend(fig, axes, "", ncol=len(cycles)) if len(cycles) > 1 else 0.0
    fig.suptitle("Synthesis and deduplication funnel" + (" per cycle" if len(cycles) > 1 else ""), fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def loss_curves(logs: pd.DataFrame):
    """Each adapter's training loss per optimizer step, a panel per task: the model's colour, lighter for smaller
    volumes (a legend entry per volume), later cycles dotted."""
    tasks = task_order(logs["task"]) if not logs.empty else []
    logs = with_cycle(logs) if not logs.empty else logs
    fig, axes = _panels(max(1, len(tasks)), height=3.2)
    colours = model_colours(logs["local_model"]) if not logs.empty else {}
    volumes = sorted(set(int(v) for v in logs["volume"])) if not logs.empty else []
    several_models = len(colours) > 1
    for ax, task in zip(axes, tasks):
        for (model, volume, cycle), log in logs[logs["task"] == task].groupby(["local_model", "volume", "cycle"]):
            share = 1.0 if len(volumes) == 1 else 0.35 + 0.65 * volumes.index(int(volume)) / (len(volumes) - 1)
            label = (f"{model} · " if several_models else "") + f"{volume_text(volume)} samples" + (f" (c{cycle})" if cycle > 1 else "")
            ax.plot(log["step"], log["loss"], marker=".", ms=4, lw=1.3, ls=":" if cycle > 1 else "-",
                    color=shade_of(colours[str(model)], share), label=label)
        ax.set_title(task.replace("_", " "))
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if not tasks:
        axes[0].text(0.5, 0.5, "no training logs yet", ha="center", va="center", transform=axes[0].transAxes, color="0.4")
    axes[0].set_ylabel("training loss")
    if len(volumes) * len(colours) > 8:  # a handle per model: a line per adapter would make a legend longer than the plot
        handles = [Line2D([], [], color=colour, label=model) for model, colour in colours.items()]
        span = f"{volume_text(volumes[0])} … {volume_text(volumes[-1])}"
        bottom = _figure_legend(fig, [], f"lighter: fewer training samples ({span})", handles, ncol=4)
    else:
        bottom = _figure_legend(fig, axes, "darker: more training samples", ncol=4)
    fig.suptitle("Training loss of each adapter", fontsize=11)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


# -- deeper evaluation: judge spread, pairwise verdicts, judge vs reference metrics ----------------


def score_distribution(scores: pd.DataFrame, metric: str, judge: str | None = None):
    """The answer scores (mean of M) per volume as boxes, a column of panels per task and a row per local model,
    for one judge (default: the first): boxes in the model's colour (lighter for smaller volumes), the base model's
    hatched, later cycles labelled c<t>, and the service LLM's own answers as a box in `SERVICE_COLOUR` at the
    right with its median as the dash-dot line across the panel. Whiskers: 1.5 × IQR; points beyond them drawn."""
    data = with_cycle(scores[scores["metric"] == metric]) if len(scores) else scores
    judge = (judge or _first(data["judge"])) if len(data) else None
    data = data[data["judge"] == judge] if len(data) else data
    local, service = split_service(data) if len(data) else (data, data)
    tasks = task_order(data["task"]) if len(data) else []
    models = sorted(set(local["local_model"])) if len(local) else []
    colours = model_colours(models)
    cells = (local[["volume", "cycle"]].drop_duplicates().sort_values(["volume", "cycle"]).itertuples(index=False)
             if len(local) else [])
    cells = [(int(v), int(c)) for v, c in cells if not (v == 0 and c > 1)]  # the base model once
    volumes = sorted({v for v, _ in cells if v > 0})
    fig, grid = _grid(len(models) or 1, len(tasks) or 1, width=max(4.2, 1.0 + 0.42 * (len(cells) + 1)), height=3.0)
    for r, model in enumerate(models):
        for ax, task in zip(grid[r], tasks):
            sub = local[(local["task"] == task) & (local["local_model"] == model)]
            for i, (volume, cycle) in enumerate(cells):
                values = sub.loc[(sub["volume"] == volume) & ((sub["cycle"] == cycle) | (volume == 0)), "score"].dropna().to_numpy(dtype=float)
                if values.size == 0:
                    continue
                share = 1.0 if volume == 0 or len(volumes) < 2 else 0.45 + 0.55 * volumes.index(volume) / (len(volumes) - 1)
                box = ax.boxplot([values], positions=[i], widths=0.6, patch_artist=True, manage_ticks=False,
                                 medianprops={"color": "black", "lw": 1.2}, flierprops={"ms": 3, "mec": colours[model]})
                box["boxes"][0].set(facecolor=shade_of(colours[model], 0.35 if volume == 0 else share), edgecolor=colours[model],
                                    hatch="///" if volume == 0 else None)
            rows = service[service["task"] == task]["score"].dropna().to_numpy(dtype=float) if len(service) else np.array([])
            labels = [volume_text(v) + (f"\nc{c}" if c > 1 else "") for v, c in cells]
            if rows.size:
                box = ax.boxplot([rows], positions=[len(cells)], widths=0.6, patch_artist=True, manage_ticks=False,
                                 medianprops={"color": "white", "lw": 1.2}, flierprops={"ms": 3})
                box["boxes"][0].set(facecolor=SERVICE_COLOUR, edgecolor=SERVICE_COLOUR)
                ax.axhline(float(np.median(rows)), ls="-.", lw=1.2, color=SERVICE_COLOUR, zorder=0)
                labels.append("service\nLLM")
            ax.set_xticks(range(len(labels)), labels, fontsize=8)
            ax.set_xlim(-0.6, len(labels) - 0.4)
            ax.set_title(task.replace("_", " ") if r == 0 else "")
            ax.set_xlabel("training samples" if r == len(models) - 1 else "")
            ax.grid(axis="y", alpha=0.3)
        grid[r][0].set_ylabel((f"{model}\n" if len(models) > 1 else "") + f"{metric} (mean of M)")
    if not tasks:
        grid[0][0].text(0.5, 0.5, f"no judged {metric}", ha="center", va="center", transform=grid[0][0].transAxes, color="0.4")
    grid[0][0].set_ylim(-3, 103)
    handles = [matplotlib.patches.Patch(facecolor=shade_of(colours[m], 0.7), edgecolor=colours[m], label=m) for m in models]
    handles.append(matplotlib.patches.Patch(facecolor="white", edgecolor="0.3", hatch="///", label="base model"))
    if len(service):
        handles.append(Line2D([], [], ls="-.", color=SERVICE_COLOUR, label="service LLM's own answers (median)"))
    bottom = _figure_legend(fig, [], "boxes: quartiles; whiskers: 1.5 × IQR; lighter: fewer training samples", handles, ncol=4)
    fig.suptitle(f"{metric.capitalize()} of each answer · judge {judge}", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def judge_spread_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Judge reliability per metrics.csv row: spread over M (judge_std), failed share, the mean's 95% CI."""

    return judge_spread(metrics)


def _grid(rows: int, columns: int, width: float, height: float):
    """A rows × columns grid of panels sharing the y axis (a row per local model or judge, a column per task)."""
    fig, grid = plt.subplots(max(1, rows), max(1, columns), figsize=(width * max(1, columns), height * max(1, rows)),
                             squeeze=False, sharey=True)
    return fig, grid


def pairwise_bars(summary: pd.DataFrame, baseline: str = "base"):
    """Win / tie / loss of each fine-tuned volume against a baseline (pairwise.csv): the base model (`base`) or
    the service LLM (`service:<label>`), stacked, a column of panels per task and a row per local model and judge
    (one row when there is one of each).

    Each bar is labelled with its position inconsistency (% of pairs whose verdict flips with the order).
    """
    if "baseline" in summary.columns:
        summary = summary[summary["baseline"].fillna("base") == baseline]
    against = "the base model" if baseline == "base" else f"the {service_label(baseline)}"
    tasks = task_order(summary["task"]) if not summary.empty else []
    rows = list(summary[["local_model", "judge"]].drop_duplicates().itertuples(index=False, name=None)) if not summary.empty else []
    several_models = len({m for m, _ in rows}) > 1
    several_judges = len({j for _, j in rows}) > 1
    bars = max([int(((summary["task"] == t) & (summary["local_model"] == m) & (summary["judge"] == j)).sum())
                for t in tasks for m, j in rows] or [1])
    fig, grid = _grid(len(rows), len(tasks), width=max(3.6, 1.2 + 0.5 * bars), height=2.9)
    for r, (model, judge) in enumerate(rows):
        for ax, task in zip(grid[r], tasks):
            sub = summary[(summary["task"] == task) & (summary["local_model"] == model) & (summary["judge"] == judge)]
            sub = sub.sort_values(["volume", "cycle"] if "cycle" in sub else ["volume"])
            x = np.arange(len(sub))
            bottom = np.zeros(len(sub))
            for part in ("win", "tie", "loss"):
                values = sub[part].fillna(0).to_numpy(dtype=float)
                ax.bar(x, values, 0.6, bottom=bottom, color=OUTCOME_COLOURS[part], label=part)
                bottom += values
            if {"win_ci_low", "win_ci_high"} <= set(sub.columns):  # the win share's 95 % CI on top of its segment
                win = sub["win"].fillna(0).to_numpy(dtype=float)
                low, high = sub["win_ci_low"].to_numpy(dtype=float), sub["win_ci_high"].to_numpy(dtype=float)
                ok = np.isfinite(low) & np.isfinite(high)
                ax.errorbar(x[ok], win[ok], yerr=[np.clip(win[ok] - low[ok], 0, None), np.clip(high[ok] - win[ok], 0, None)],
                            fmt="none", ecolor="0.1", elinewidth=1, capsize=3, zorder=3)
            for xi, flip in zip(x, sub["position_inconsistency"]):
                ax.text(xi, 101, "–" if pd.isna(flip) else f"{flip:.0f}%", ha="center", va="bottom", fontsize=7)
            cycles = sub["cycle"] if "cycle" in sub else [1] * len(sub)
            ax.set_xticks(x, [volume_text(v) + (f"\nc{c}" if c > 1 else "") for v, c in zip(sub["volume"], cycles)], fontsize=8)
            ax.set_title(task.replace("_", " ") if r == 0 else "")
            ax.set_xlabel("training samples" if r == len(rows) - 1 else "")
            ax.grid(axis="y", alpha=0.3)
        who = "\n".join(part for part, shown in ((str(model), several_models), (f"judge {judge}", several_judges)) if shown)
        grid[r][0].set_ylabel((who + "\n" if who else "") + "% of valid verdicts")
    grid[0][0].set_ylim(0, 112)
    if not tasks:
        grid[0][0].text(0.5, 0.5, "no pairwise verdicts", ha="center", va="center", transform=grid[0][0].transAxes, color="0.4")
    shown_ci = {"win_ci_low", "win_ci_high"} <= set(summary.columns)
    bottom = _figure_legend(fig, grid.ravel(), ("error bar: the win share's 95% CI; " if shown_ci else "")
                            + "above each bar: position inconsistency (% of pairs flipping with the order)", ncol=3)
    fig.suptitle(f"Pairwise: each fine-tuned volume vs {against} (both orders)", fontsize=10)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig


def judge_vs_reference_scatter(points: pd.DataFrame, correlations: pd.DataFrame, reference_metric: str = "rouge_l",
                               judge_metric: str = "similarity"):
    """The judge's answer-level score against a reference metric (refmetrics.judge_vs_reference), a panel per
    task, a colour per judge, the Spearman rho from correlations.csv in each panel's title."""
    tasks = task_order(points["task"]) if not points.empty else []
    fig, axes = _panels(max(1, len(tasks)), height=3.6)
    for ax, task in zip(axes, tasks):
        sub = points[points["task"] == task]
        rhos = []
        markers = judge_markers(points["judge"])
        for judge, group in sub.groupby("judge"):
            ax.scatter(group[reference_metric], group[judge_metric], s=16, alpha=0.55, marker=markers[judge], color="0.25",
                       label=judge)
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


def judge_vs_human(items: pd.DataFrame, agreement: pd.DataFrame):
    """Each judge's score of the human-labelled answers against people's score, a panel per metric, a colour
    per judge, the diagonal dotted; the legend gives Spearman ρ, Kendall τ and the mean absolute error with
    their 95 % CIs (evaluate/human_labels/agreement.csv)."""
    metrics = [m for m in ("similarity", "precision") if not items.empty and m in set(items["metric"])]
    fig, axes = _panels(max(1, len(metrics)), height=3.8)
    for ax, metric in zip(axes, metrics):
        markers = judge_markers(items["judge"])
        for judge, group in items[items["metric"] == metric].groupby("judge", sort=True):
            row = agreement[(agreement["judge"] == judge) & (agreement["metric"] == metric)] if not agreement.empty else agreement
            text = judge
            if len(row):
                r = row.iloc[0]
                text = (f"{judge}: ρ {r.spearman:.2f} [{r.spearman_ci_low:.2f}, {r.spearman_ci_high:.2f}], "
                        f"τ {r.kendall:.2f}, MAE {r.mae:.1f} (n={int(r['items'])})")
            ax.scatter(group["human_score"], group["judge_score"], s=18, alpha=0.6, marker=markers[judge], color="0.25", label=text)
        ax.plot([0, 100], [0, 100], ls=":", lw=1, color="0.5")
        ax.set_xlim(-3, 103)
        ax.set_ylim(-3, 103)
        ax.set_title(metric)
        ax.set_xlabel("human score (0–100)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)  # below: never over the points
    if not metrics:
        axes[0].text(0.5, 0.5, "no human-labelled answers", ha="center", va="center", transform=axes[0].transAxes, color="0.4")
    axes[0].set_ylabel("judge score (mean of M)")
    fig.suptitle("Judges checked against people: each human-labelled answer", fontsize=10)
    fig.tight_layout()
    return fig


def served_vs_adapter(parity: pd.DataFrame, statistic: str = "mean"):
    """The deploy stage's parity check: per exported cell (a row of panels per metric), the adapter's score
    as evaluated and the served GGUF's, each with its 95 % CI, and the paired difference in the title."""
    metrics = [m for m in ("similarity", "precision") if m in set(parity["metric"])]
    cells = parity.drop_duplicates(["task", "local_model", "volume", "cycle", "judge"])
    fig, axes = _panels(len(metrics), width=max(3.6, 1.6 * len(cells) + 1.6), height=3.4, sharey=True)
    labels = [f"{r.task}\n{r.local_model}\n{volume_text(r.volume)} samples" + (f" (c{r.cycle})" if r.cycle > 1 else "")
              + (f"\n{r.judge}" if parity["judge"].nunique() > 1 else "") for r in cells.itertuples()]
    x = np.arange(len(cells))
    colours = model_colours(parity["local_model"])
    legend = [Line2D([], [], ls="none", marker="o", color="0.3", label="adapter (as evaluated)"),
              Line2D([], [], ls="none", marker="D", mfc="white", mec="0.3", mew=1.5, label="served GGUF (llama.cpp)")]
    for ax, metric in zip(axes, metrics):
        sub = parity[parity["metric"] == metric].set_index(["task", "local_model", "volume", "cycle", "judge"])
        keys = [(r.task, r.local_model, r.volume, r.cycle, r.judge) for r in cells.itertuples()]
        for offset, form in ((-0.12, "adapter"), (0.12, "served")):  # the model's colour; filled: adapter, open: served
            values = np.array([sub.loc[k, f"{form}_{statistic}"] for k in keys], dtype=float)
            low = np.array([sub.loc[k, f"{form}_{statistic}_ci_low"] for k in keys], dtype=float)
            high = np.array([sub.loc[k, f"{form}_{statistic}_ci_high"] for k in keys], dtype=float)
            for xi, value, lo, hi, key in zip(x + offset, values, low, high, keys):
                colour = colours[str(key[1])]
                ax.errorbar([xi], [value], yerr=[[max(value - lo, 0)], [max(hi - value, 0)]], fmt="o" if form == "adapter" else "D",
                            color=colour, mfc=colour if form == "adapter" else "white", mew=1.5, capsize=4)
        diffs = [sub.loc[k] for k in keys]
        ax.set_title(f"{metric}: served − adapter " + ", ".join(
            f"{d['difference']:+.1f} [{d['difference_ci_low']:+.1f}, {d['difference_ci_high']:+.1f}]"
            + (f"\n{d['equivalence']} (margin ±{d['margin']:g})" if "equivalence" in d else "") for d in diffs), fontsize=8)
        ax.set_xticks(x, labels, fontsize=7)
        ax.set_xlim(-0.6, len(cells) - 0.4)
        ax.set_ylim(0, 100)
        ax.set_ylabel(f"{metric} {statistic} (0-100)")
        ax.grid(axis="y", alpha=0.3)
    bottom = _figure_legend(fig, axes[:1], "", extra=legend, ncol=2)
    fig.suptitle("Is the served model the evaluated one? (CIs at 1 − 2α; greedy answers identical: "
                 + ", ".join(f"{v:.0%}" for v in cells["identical_greedy"]) + "; first 5 words agreeing: "
                 + ", ".join(f"{v:.0%}" for v in cells["greedy_agreement"]) + ")", fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return fig
