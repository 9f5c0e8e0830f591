"""Aggregating judgements the way the paper does, plus their uncertainty.

Levels, in order (exactly the paper's):

1. **over M** — the M judgements of one answer (one test prompt, one of its K answers) are
   averaged into that answer's score. Failed or invalid judgements (`valid` false: the call
   failed, or its JSON broke the contract after the re-asks) are left out of the average and
   counted (`failed_judgements`, `failed_share`); an answer none of whose judgements is valid
   has no score and is counted in `unscored_answers`, not in `n`.
2. **over K and prompts** — the answer scores of one (cycle, task, local model, judge, volume),
   all K answers of all test prompts pooled, give the `mean`, the `median` and
   `coverage_ζ`: the share (in %) of answers whose score is at least ζ (a score exactly at ζ
   counts). `n` is the number of answers pooled. Each answer weighs the same, so a prompt
   weighs by how many of its answers have a score.

Beside the paper's columns (which come first, in the paper's order), metrics.csv carries:

- `judge_std`: the judge's spread over M, the standard deviation of an answer's M valid
  judgements, averaged over answers (0 for a deterministic judge or M = 1);
- `failed_judgements`, `judgements`, `failed_share` (%): failed or invalid judgements;
- `prompts`, `unscored_answers`;
- 95 % confidence intervals of the mean and of each coverage@ζ (`mean_ci_low`,
  `mean_ci_high`, `coverage_50_ci_low`, ...): Student-t intervals over per-prompt values,
  because the test prompt is the unit of independence (the K answers of one prompt and
  their M judgements are correlated). A percentile bootstrap of the same values covers the
  truth in ~87 % of experiments at 6 prompts, the t-interval in ~95 % (`methods/verdict.py`
  and tests/test_verdict_simulation.py). NaN bounds when there is no spread to measure.
  These describe a cell; whether a volume is as good as the service LLM is the verdict's
  (`methods/verdict.py`), which also counts answers without a valid judgement.
"""

from __future__ import annotations

import zlib

import numpy as np
import pandas as pd

from llamaduo_nb.methods.verdict import value_interval

METRICS = ("similarity", "precision")
GROUP = ["cycle", "task", "local_model", "judge", "volume"]
ANSWER = GROUP + ["prompt_id", "k"]
CI_LEVEL = 0.95


def coverage_at(scores, zeta: float) -> float:
    """% of scores ≥ zeta (a score exactly at zeta counts)."""
    scores = np.asarray(scores, dtype=float)
    if scores.size == 0:
        return float("nan")
    return float(100.0 * np.mean(scores >= zeta))


def _valid_mask(judgements: pd.DataFrame) -> pd.Series:
    return judgements["valid"].fillna(False).astype(bool)


def answer_scores(judgements: pd.DataFrame, unscored: bool = False) -> pd.DataFrame:
    """One row per answer and metric: the mean of its valid judgements (level 1: over M), their
    standard deviation (`judge_std`) and how many there were (`judgements`). With `unscored`, an answer
    none of whose judgements is valid is kept with score NaN (the verdict counts it; the paper's
    aggregates leave it out)."""
    valid = judgements if unscored else judgements[_valid_mask(judgements)]
    mask = _valid_mask(valid)
    frames = []
    for metric in METRICS:
        values = pd.to_numeric(valid[metric], errors="coerce").where(mask)
        g = valid.assign(**{metric: values}).groupby(ANSWER, dropna=False)[metric].agg(["mean", "std", "count"]).reset_index()
        frames.append(g.rename(columns={"mean": "score", "std": "judge_std", "count": "judgements"}).assign(metric=metric))
    return pd.concat(frames, ignore_index=True)


def row_seed(seed: int, key) -> np.random.Generator:
    """A Generator for one row, seeded from the run's seed and the row's key."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, zlib.crc32(repr(tuple(key)).encode())])


def prompt_intervals(scores, prompts, zetas=(50, 70), level: float = CI_LEVEL) -> dict:
    """Student-t intervals of the mean and coverage@ζ of answer scores, over per-prompt values (the prompt is
    the cluster: `methods/verdict.py` says why, and measures it), clipped to 0–100.

    `scores[i]` is answer i's score, `prompts[i]` its test prompt. Returns {"mean": (low, high),
    "coverage_50": (low, high), ...}; NaN bounds when there is no spread to measure (fewer than 2 prompts,
    or every prompt with the same value)."""

    scores = np.asarray(scores, dtype=float)
    keys = [f"coverage_{z}" for z in zetas]
    if scores.size == 0:
        return {k: (float("nan"), float("nan")) for k in ["mean"] + keys}
    frame = pd.DataFrame({"prompt_id": list(prompts), "score": scores})
    alpha = (1.0 - level) / 2.0
    return {key: value_interval(frame, key, alpha) for key in ["mean"] + keys}


def aggregate(judgements: pd.DataFrame, zetas=(50, 70), level: float = CI_LEVEL) -> pd.DataFrame:
    """metrics.csv: one row per (cycle, task, local_model, judge, volume, metric), with `level` intervals."""
    zetas = list(zetas)
    cov = [f"coverage_{z}" for z in zetas]
    cols = GROUP + ["metric", "mean", "median"] + cov + ["n", "judge_std", "failed_judgements", "judgements",
                                                         "failed_share", "prompts", "unscored_answers", "mean_ci_low",
                                                         "mean_ci_high"] + [f"{c}_ci_{e}" for c in cov for e in ("low", "high")]
    if judgements.empty:
        return pd.DataFrame(columns=cols)
    valid = _valid_mask(judgements)
    scores = answer_scores(judgements)
    by_group = {key: g for key, g in scores.groupby(GROUP + ["metric"])}
    rows = []
    for key, group in judgements.assign(_valid=valid).groupby(GROUP):
        n_judgements = int(len(group))
        failed = int((~group["_valid"]).sum())
        answers = group[ANSWER].drop_duplicates()
        for metric in METRICS:
            sub = by_group.get(tuple(key) + (metric,), scores.iloc[0:0])
            values = sub["score"].to_numpy(dtype=float)
            row = dict(zip(GROUP + ["metric"], tuple(key) + (metric,)))
            nan = float("nan")
            row.update(mean=float(np.mean(values)) if values.size else nan, median=float(np.median(values)) if values.size else nan)
            for z, c in zip(zetas, cov):
                row[c] = coverage_at(values, z)
            row["n"] = int(values.size)
            row["judge_std"] = float(sub["judge_std"].fillna(0.0).mean()) if values.size else nan
            row.update(failed_judgements=failed, judgements=n_judgements, failed_share=100.0 * failed / n_judgements,
                       prompts=int(sub["prompt_id"].nunique()), unscored_answers=int(len(answers) - values.size))
            ci = prompt_intervals(values, sub["prompt_id"].tolist(), zetas, level)
            row["mean_ci_low"], row["mean_ci_high"] = ci["mean"]
            for c in cov:
                row[f"{c}_ci_low"], row[f"{c}_ci_high"] = ci[c]
            rows.append(row)
    out = pd.DataFrame(rows)
    return out[cols].sort_values(GROUP + ["metric"]).reset_index(drop=True)


def judge_spread(metrics: pd.DataFrame) -> pd.DataFrame:
    """The judge-reliability view of metrics.csv: spread over M and failed judgements, per row."""
    cols = [c for c in ["task", "local_model", "judge", "volume", "metric", "judge_std", "failed_share", "failed_judgements",
                        "judgements", "unscored_answers", "mean", "mean_ci_low", "mean_ci_high"] if c in metrics.columns]
    return metrics[cols].round(2)
