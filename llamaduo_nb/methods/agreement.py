"""How far an LLM judge can be trusted on this task: its scores against people's, and judges against each other.

An *item* is one answer to one test prompt. People scored a sample of items (`evaluate.human_labels`);
each judge scored the same items (the mean of its M valid judgements). Per judge and metric:

- Spearman's ρ and Kendall's τ-b (`scipy.stats`): does the judge rank the items as people do;
- the mean absolute error (0–100 points): is it on the same scale;
- 95 % intervals of all three from a cluster bootstrap (`scipy.stats.bootstrap`, percentile): the test
  prompt is resampled with all its labelled answers, because the answers to one prompt share its
  difficulty and are not independent (a labels file holds a few answers per prompt).

Items whose answer is the prompt's reference answer are reported apart (`reference_items`, their mean
judge and human scores) and left out of the agreement statistics: a judge that compares with the
reference scores the reference near 100 by construction, which would inflate any agreement.

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
MIN_PROMPTS = 3  # a cluster bootstrap of fewer prompts has nothing to resample
HUMAN_COLUMNS = ["judge", "metric", "items", "prompts", "spearman", "spearman_ci_low", "spearman_ci_high", "kendall", "kendall_ci_low",
                 "kendall_ci_high", "mae", "mae_ci_low", "mae_ci_high", "judge_mean", "human_mean", "reference_items",
                 "reference_judge_mean", "reference_human_mean"]
JUDGES_COLUMNS = ["metric", "judge_a", "judge_b", "items", "spearman", "spearman_ci_low", "spearman_ci_high", "mean_abs_difference"]


def _spearman(x, y):
    return stats.spearmanr(x, y).statistic


def _kendall(x, y):
    return stats.kendalltau(x, y).statistic


def _mae(x, y):
    return float(np.mean(np.abs(np.asarray(x, dtype=float) - np.asarray(y, dtype=float))))


def _interval(statistic, x, y, clusters, resamples: int, rng, level: float) -> tuple[float, float]:
    """Cluster-bootstrap percentile interval of statistic(x, y): `scipy.stats.bootstrap` resamples the clusters
    (test prompts), each bringing all its items. NaN when undefined (too few prompts or items, or resamples
    without a defined statistic)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    codes, _ = pd.factorize(pd.Series(list(clusters)))
    members = [np.flatnonzero(codes == c) for c in range(int(codes.max()) + 1)] if len(codes) else []
    if resamples <= 0 or len(x) < MIN_ITEMS or len(members) < MIN_PROMPTS:
        return float("nan"), float("nan")

    def on_prompts(picked):
        rows = np.concatenate([members[int(i)] for i in picked])
        return statistic(x[rows], y[rows])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples whose scores all tie have no rank correlation
        result = stats.bootstrap((np.arange(len(members)),), on_prompts, n_resamples=resamples, vectorized=False,
                                 confidence_level=level, method="percentile", random_state=rng)
    low, high = result.confidence_interval
    return float(low), float(high)


def _point(statistic, x, y) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # constant input: the correlation is undefined (NaN)
        return float(statistic(x, y))


def judge_vs_human(judge_scores, human_scores, prompts=None, resamples: int = 1000, rng: np.random.Generator | int = 0,
                   level: float = CI_LEVEL) -> dict:
    """Spearman, Kendall and mean absolute error of a judge's item scores against people's, with cluster-bootstrap
    CIs over `prompts` (each item its own cluster when None)."""
    x = np.asarray(judge_scores, dtype=float)
    y = np.asarray(human_scores, dtype=float)
    clusters = np.asarray(list(prompts) if prompts is not None else range(len(x)), dtype=object)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, clusters = x[ok], y[ok], clusters[ok]
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    out: dict = {"items": int(len(x)), "prompts": int(len(set(clusters)))}
    for name, statistic in (("spearman", _spearman), ("kendall", _kendall), ("mae", _mae)):
        enough = len(x) >= (1 if name == "mae" else MIN_ITEMS)
        out[name] = _point(statistic, x, y) if enough else float("nan")
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _interval(statistic, x, y, clusters, resamples, rng, level)
    out["judge_mean"] = float(x.mean()) if len(x) else float("nan")
    out["human_mean"] = float(y.mean()) if len(y) else float("nan")
    return out


def agreement_with_humans(items: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """One row per (judge, metric) from item scores (columns judge, metric, item, prompt_id, judge_score, human_score;
    optional `reference`: the item's answer is the prompt's reference answer, reported apart)."""
    rows = []
    flagged = items.assign(_reference=items["reference"].fillna(False).astype(bool) if "reference" in items.columns else False)
    for (judge, metric), group in flagged.groupby(["judge", "metric"], sort=True):
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, len(rows)])
        reference = group[group["_reference"]]
        answers = group[~group["_reference"]]
        prompts = answers["prompt_id"] if "prompt_id" in answers.columns else None
        rows.append({"judge": judge, "metric": metric,
                     **judge_vs_human(answers["judge_score"], answers["human_score"], prompts, resamples, rng),
                     "reference_items": int(len(reference)),
                     "reference_judge_mean": float(reference["judge_score"].mean()) if len(reference) else float("nan"),
                     "reference_human_mean": float(reference["human_score"].mean()) if len(reference) else float("nan")})
    return pd.DataFrame(rows, columns=HUMAN_COLUMNS)


def agreement_between_judges(scores: pd.DataFrame, resamples: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Per metric and pair of judges: Spearman's ρ (cluster-bootstrap CI over prompts) and the mean absolute
    difference, on the items both scored (columns judge, metric, item, score, optional prompt_id and reference).
    Empty with fewer than two judges."""
    rows = []
    if "reference" in scores.columns:
        scores = scores[~scores["reference"].fillna(False).astype(bool)]
    for metric, group in scores.groupby("metric", sort=True):
        wide = group.pivot_table(index="item", columns="judge", values="score", aggfunc="mean")
        prompt_of = group.drop_duplicates("item").set_index("item")["prompt_id"] if "prompt_id" in group.columns else None
        for a, b in itertools.combinations(sorted(wide.columns), 2):
            both = wide[[a, b]].dropna()
            x, y = both[a].to_numpy(dtype=float), both[b].to_numpy(dtype=float)
            clusters = prompt_of[both.index].to_numpy() if prompt_of is not None else np.arange(len(both))
            rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, len(rows)])
            low, high = _interval(_spearman, x, y, clusters, resamples, rng, CI_LEVEL)
            rows.append({"metric": metric, "judge_a": a, "judge_b": b, "items": int(len(both)),
                         "spearman": _point(_spearman, x, y) if len(both) >= MIN_ITEMS else float("nan"),
                         "spearman_ci_low": low, "spearman_ci_high": high,
                         "mean_abs_difference": float(_mae(x, y)) if len(both) else float("nan")})
    return pd.DataFrame(rows, columns=JUDGES_COLUMNS)


# -- the human-labels file ----------------------------------------------------------------------------
