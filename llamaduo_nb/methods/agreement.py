"""How far an LLM judge can be trusted on this task: its scores against people's, and judges against each other.

An *item* is one answer to one test prompt. People scored a sample of items (`evaluate.human_labels`);
each judge scored the same items (the mean of its M valid judgements). Per judge and metric:

- Spearman's ρ and Kendall's τ-b (`scipy.stats`): does the judge rank the items as people do;
- the mean absolute error (0–100 points): is it on the same scale;
- 95 % percentile bootstrap intervals of all three, resampling items (`scipy.stats.bootstrap`, paired).

Between judges (when there are several), per metric and pair of judges: Spearman's ρ with its interval
and the mean absolute difference, on every item both scored.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from llamaduo_nb.methods.metrics import CI_LEVEL

MIN_ITEMS = 3  # a rank correlation of fewer items says nothing
HUMAN_COLUMNS = ["judge", "metric", "items", "spearman", "spearman_ci_low", "spearman_ci_high", "kendall", "kendall_ci_low",
                 "kendall_ci_high", "mae", "mae_ci_low", "mae_ci_high", "judge_mean", "human_mean"]
JUDGES_COLUMNS = ["metric", "judge_a", "judge_b", "items", "spearman", "spearman_ci_low", "spearman_ci_high", "mean_abs_difference"]


def _spearman(x, y, axis=-1):
    return stats.spearmanr(x, y).statistic


def _kendall(x, y, axis=-1):
    return stats.kendalltau(x, y).statistic


def _mae(x, y, axis=-1):
    return np.mean(np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float)), axis=axis)


def _interval(statistic, x, y, resamples: int, rng, level: float) -> tuple[float, float]:
    """Percentile bootstrap interval of statistic(x, y), items resampled in pairs; NaN when undefined.

    Not scipy.stats.bootstrap: its interval is NaN as soon as one resample has no rank correlation (all
    scores equal, common with a few labelled items); such resamples are left out here instead."""
    if resamples <= 0 or len(x) < MIN_ITEMS:
        return float("nan"), float("nan")
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    picks = np.random.default_rng(rng).integers(0, len(x), size=(resamples, len(x)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = np.array([statistic(x[i], y[i]) for i in picks], dtype=float)
    values = values[np.isfinite(values)]
    if len(values) < resamples / 2:  # mostly undefined: no honest interval
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def _point(statistic, x, y) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: the correlation is undefined (NaN)
        return float(statistic(x, y))


def judge_vs_human(judge_scores, human_scores, resamples: int = 1000, rng: np.random.Generator | int = 0,
                   level: float = CI_LEVEL) -> dict:
    """Spearman, Kendall and mean absolute error of a judge's item scores against people's, with bootstrap CIs."""
    x = np.asarray(judge_scores, dtype=float)
    y = np.asarray(human_scores, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out: dict = {"items": int(len(x))}
    for name, statistic in (("spearman", _spearman), ("kendall", _kendall), ("mae", _mae)):
        enough = len(x) >= (1 if name == "mae" else MIN_ITEMS)
        out[name] = _point(statistic, x, y) if enough else float("nan")
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _interval(statistic, x, y, resamples, rng, level)
    out["judge_mean"] = float(x.mean()) if len(x) else float("nan")
    out["human_mean"] = float(y.mean()) if len(y) else float("nan")
    return out


def agreement_with_humans(items: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (judge, metric) from item scores (columns judge, metric, item, judge_score, human_score)."""
    rows = []
    for (judge, metric), group in items.groupby(["judge", "metric"], sort=True):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, len(rows)])
        rows.append({"judge": judge, "metric": metric,
                     **judge_vs_human(group["judge_score"], group["human_score"], resamples, rng)})
    return pd.DataFrame(rows, columns=HUMAN_COLUMNS)


def agreement_between_judges(scores: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per metric and pair of judges: Spearman's ρ (bootstrap CI) and the mean absolute difference, on the
    items both scored (columns judge, metric, item, score). Empty with fewer than two judges."""
    rows = []
    for metric, group in scores.groupby("metric", sort=True):
        wide = group.pivot_table(index="item", columns="judge", values="score", aggfunc="mean")
        for a, b in itertools.combinations(sorted(wide.columns), 2):
            both = wide[[a, b]].dropna()
            x, y = both[a].to_numpy(dtype=float), both[b].to_numpy(dtype=float)
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, len(rows)])
            low, high = _interval(_spearman, x, y, resamples, rng, CI_LEVEL)
            rows.append({"metric": metric, "judge_a": a, "judge_b": b, "items": int(len(both)),
                         "spearman": _point(_spearman, x, y) if len(both) >= MIN_ITEMS else float("nan"),
                         "spearman_ci_low": low, "spearman_ci_high": high,
                         "mean_abs_difference": float(_mae(x, y)) if len(both) else float("nan")})
    return pd.DataFrame(rows, columns=JUDGES_COLUMNS)


# -- the human-labels file ----------------------------------------------------------------------------
LABEL_METRICS = ("similarity", "precision")


def read_human_labels(path) -> list[dict]:
    """The rows of a human-labels file (JSONL: prompt_id; answer (its text) or answer_id (as the answer browser
    shows it); similarity and/or precision, 0–100; optional rater). A bad line raises ValueError naming the file,
    the line and the field."""
    import json
    from pathlib import Path

    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt_id, answer or answer_id, similarity and/or precision")
        if not isinstance(row.get("prompt_id"), str) or not row["prompt_id"]:
            raise ValueError(f"{where}: prompt_id: missing (the test prompt the answer belongs to)")
        if not isinstance(row.get("answer"), str) and not isinstance(row.get("answer_id"), str):
            raise ValueError(f"{where}: answer: missing; give the answer's text (answer) or its id (answer_id)")
        if not any(m in row for m in LABEL_METRICS):
            raise ValueError(f"{where}: similarity: missing; give similarity and/or precision (0–100)")
        for metric in LABEL_METRICS:
            if metric not in row or row[metric] is None:
                continue
            value = row[metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{where}: {metric}: {value!r} is not a score within 0–100")
        if "rater" in row and row["rater"] is not None and not isinstance(row["rater"], str):
            raise ValueError(f"{where}: rater: expected text, got {row['rater']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no labels (one JSON object per line)")
    return rows
