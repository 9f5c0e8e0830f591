"""Aggregating judgements the way the paper does.

Levels, in order: the M judgements of one answer are averaged into the answer's score
(failed or invalid judgements are left out and counted); the answers' scores (K per test
prompt, all prompts together) then give the mean, the median and coverage@ζ, the share
(in %) of answers whose score is at least ζ.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = ("similarity", "precision")
GROUP = ["cycle", "task", "local_model", "judge", "volume"]


def coverage_at(scores, zeta: float) -> float:
    """% of scores ≥ zeta (a score exactly at zeta counts)."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0:
        return float("nan")
    return float(100.0 * np.mean(scores >= zeta))


def answer_scores(judgements: pd.DataFrame) -> pd.DataFrame:
    """One row per answer and metric: the mean of its valid judgements, and how many there were."""
    valid = judgements[judgements["valid"]]
    keys = GROUP + ["prompt_id", "k"]
    frames = []
    for metric in METRICS:
        g = valid.groupby(keys)[metric].agg(["mean", "std", "count"]).reset_index()
        frames.append(g.rename(columns={"mean": "score", "std": "judge_std", "count": "judgements"}).assign(metric=metric))
    return pd.concat(frames, ignore_index=True)


def aggregate(judgements: pd.DataFrame, zetas=(50, 70)) -> pd.DataFrame:
    """metrics.csv: one row per (cycle, task, local_model, judge, volume, metric)."""
    scores = answer_scores(judgements)
    failed = judgements.assign(failed=~judgements["valid"]).groupby(GROUP)["failed"].agg(["sum", "size"]).reset_index()
    rows = []
    for key, group in scores.groupby(GROUP + ["metric"]):
        values = group["score"].to_numpy()
        row = dict(zip(GROUP + ["metric"], key))
        row.update(mean=float(np.mean(values)), median=float(np.median(values)))
        for z in zetas:
            row[f"coverage_{z}"] = coverage_at(values, z)
        row["n"] = int(values.size)
        row["judge_std"] = float(group["judge_std"].mean()) if group["judge_std"].notna().any() else 0.0
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    out = out.merge(failed.rename(columns={"sum": "failed_judgements", "size": "judgements"}), on=GROUP, how="left")
    cols = GROUP + ["metric", "mean", "median"] + [f"coverage_{z}" for z in zetas] + ["n", "judge_std", "failed_judgements", "judgements"]
    return out[cols].sort_values(GROUP + ["metric"]).reset_index(drop=True)
