"""The local model against the service LLM, paired over test prompts.

Both answered the same test prompts K times and were judged alike (`evaluate.service_answers`). Per
prompt, each side's value is the mean of its answer scores (statistic `mean`), their median
(`median`) or the % of its answers scoring at least ζ (`coverage_ζ`). The paired difference is
local − (scale × service + offset), averaged over the prompts both answered; `scale` and `offset`
come from a relative cycle target (`precision mean >= 0.95 * service`, `>= service - 5`), else 1 and 0.

Its 95 % interval is a percentile bootstrap that resamples prompts (the unit of independence: the K
answers of one prompt are correlated); pairing takes each prompt's own difficulty out of the comparison.

A volume is **not worse than the service LLM** when the interval's lower bound is at least 0: the data
show, at 95 %, that the local model reaches the service LLM's level (or the relative target). A lower
bound below 0 means "not shown yet", which with few prompts is the common and honest answer.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from llamaduo_nb.methods.metrics import CI_LEVEL, is_service, row_seed

RESAMPLES = 2000
COLUMNS = ["task", "local_model", "judge", "cycle", "volume", "metric", "statistic", "prompts", "local", "service", "required",
           "difference", "ci_low", "ci_high", "not_worse"]


def per_prompt(scores: pd.DataFrame, statistic: str = "mean") -> pd.Series:
    """One value per prompt_id from answer scores (columns prompt_id, score)."""
    grouped = scores.groupby("prompt_id")["score"]
    if statistic.startswith("coverage_"):
        zeta = float(statistic.split("_", 1)[1])
        return grouped.apply(lambda s: 100.0 * float(np.mean(s.to_numpy(dtype=float) >= zeta)))
    return grouped.median() if statistic == "median" else grouped.mean()


def paired_difference(local: pd.DataFrame, service: pd.DataFrame, statistic: str = "mean", scale: float = 1.0,
                      offset: float = 0.0, resamples: int = RESAMPLES, rng: np.random.Generator | int = 0,
                      level: float = CI_LEVEL) -> dict:
    """local − (scale × service + offset) over the prompts both answered, with its bootstrap interval.

    `local`, `service`: answer scores (columns prompt_id, score; several answers per prompt allowed)."""
    a, b = per_prompt(local, statistic), per_prompt(service, statistic)
    common = a.index.intersection(b.index)
    nan = float("nan")
    if len(common) == 0:
        return {"prompts": 0, "local": nan, "service": nan, "required": nan, "difference": nan, "ci_low": nan,
                "ci_high": nan, "not_worse": False}
    local_values = a[common].to_numpy(dtype=float)
    service_values = b[common].to_numpy(dtype=float)
    differences = local_values - (scale * service_values + offset)
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    draws = rng.integers(0, len(differences), size=(resamples, len(differences)))
    alpha = (1.0 - level) / 2.0
    low, high = np.quantile(differences[draws].mean(axis=1), [alpha, 1.0 - alpha])
    return {"prompts": int(len(common)), "local": float(local_values.mean()), "service": float(service_values.mean()),
            "required": float(scale * service_values.mean() + offset), "difference": float(differences.mean()),
            "ci_low": float(low), "ci_high": float(high), "not_worse": bool(low >= 0)}


def compare_with_service(scores: pd.DataFrame, metric: str = "precision", statistic: str = "mean", judge: str | None = None,
                         scale: float = 1.0, offset: float = 0.0, resamples: int = RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Every (task, local model, cycle, volume) against the service LLM's answers to the same prompts.

    `scores`: answer scores (`metrics.answer_scores`, with a `cycle` column when the run cycled); the
    service's rows are those whose local_model is `service:<label>` (its first cycle's, when answered again)."""
    data = scores[scores["metric"] == metric]
    if "cycle" not in data.columns:
        data = data.assign(cycle=1)
    judge = judge or (data["judge"].iloc[0] if len(data) else None)
    data = data[data["judge"] == judge]
    service_mask = is_service(data["local_model"]).to_numpy()
    service, local = data[service_mask], data[~service_mask]
    rows = []
    for task, task_local in local.groupby("task", sort=False):
        task_service = service[service["task"] == task]
        if task_service.empty:
            continue
        task_service = task_service[task_service["cycle"] == task_service["cycle"].min()]
        for (model, cycle, volume), cell in task_local.groupby(["local_model", "cycle", "volume"], sort=True):
            key = (task, model, judge, int(cycle), int(volume), metric, statistic)
            result = paired_difference(cell, task_service, statistic, scale, offset, resamples, row_seed(seed, key))
            rows.append(dict(zip(COLUMNS, key), **result))
    return pd.DataFrame(rows, columns=COLUMNS)


def smallest_not_worse(comparison: pd.DataFrame) -> pd.DataFrame:
    """Per (task, local model): the smallest volume not worse than the service LLM (NaN when none is yet),
    with that volume's row (or, when none is, the largest volume's, so the gap shows)."""
    cols = ["task", "local_model", "judge", "metric", "statistic", "volume", "cycle", "difference", "ci_low", "ci_high",
            "local", "service", "required", "prompts", "found"]
    rows = []
    for (task, model), group in comparison.groupby(["task", "local_model"], sort=False):
        ordered = group.sort_values(["volume", "cycle"], kind="stable")
        hits = ordered[ordered["not_worse"]]
        row = (hits.iloc[0] if len(hits) else ordered.iloc[-1]).to_dict()
        row["found"] = bool(len(hits))
        rows.append({c: row.get(c) for c in cols})
    return pd.DataFrame(rows, columns=cols)


def headline(summary: pd.DataFrame, service_label: str | None = None) -> list[str]:
    """One sentence per (task, local model): the smallest volume not worse than the service LLM, or that none is yet."""
    who = f"the service LLM ({service_label})" if service_label else "the service LLM"
    lines = []
    for r in summary.itertuples():
        what = f"{r.metric} {r.statistic}"
        gap = f"local − service {r.difference:+.1f} [95% CI {r.ci_low:+.1f}, {r.ci_high:+.1f}] over {r.prompts} prompts"
        if r.required != r.service:
            gap = f"local − required {r.difference:+.1f} [95% CI {r.ci_low:+.1f}, {r.ci_high:+.1f}] over {r.prompts} prompts"
        if r.found:
            volume = "the base model (no fine-tuning)" if int(r.volume) == 0 else f"{int(r.volume)} training samples"
            lines.append(f"{r.task} · {r.local_model}: {volume} is the smallest volume not worse than {who} on {what} "
                         f"({r.local:.1f} vs {r.service:.1f}; {gap}).")
        else:
            lines.append(f"{r.task} · {r.local_model}: no volume is shown to be not worse than {who} on {what} yet "
                         f"(largest, {int(r.volume)}: {r.local:.1f} vs {r.service:.1f}; {gap}).")
    return lines
