"""Where the noise of a verdict comes from, and how many test prompts it takes.

**Variance components** (Miller, "Adding Error Bars to Evals", the section on resampling): an answer score
is the mean of M judgements of one of K answers to one of n prompts, so a cell's mean has three sources of
noise, nested: between prompts (σ²_prompt), between the K answers of a prompt (σ²_answer) and between the
M judgements of an answer (σ²_judgement). They are estimated by the method of moments of the nested
analysis of variance (within-answer variance of judgements; within-prompt variance of answer means less
the judgement share; variance of prompt means less the answer share; negative estimates set to 0), on the
score scale (0–100 points). Hand-written because statsmodels' MixedLM fits nested components by REML and
fails to converge at 6 prompts with M = 1 or 2; the moments need no iteration and give the same values on a
balanced design. For a verdict against the service LLM the paired difference's variance is
σ²_prompt(difference) + (σ²_answer,local + σ²_answer,service)/K + (σ²_judgement,local + σ²_judgement,service)/(K·M),
over n: the three shares say whether more prompts, more K or more M would narrow the interval.

**The planner**: the power of the one-sided t-test of the verdict (`statsmodels.stats.power.TTestPower`, the
paired/one-sample t-test's power), from the spread of the per-prompt differences of the run's own cells (a
pilot) or, before any run, from `DEFAULT_SD`.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

POWER = 0.8
# The spread of per-prompt differences (local − service) assumed before a run has its own (the planner says which
# it used): the simulation of tests/test_verdict_simulation.py (prompt difficulty sd 15 points, answer sd 12,
# judgement sd 8, K = 2, M = 2, both sides at 60) gives 12.9 points for the mean and 36.1 for coverage_50.
DEFAULT_SD = {"mean": 13.0, "coverage": 36.0}
ABSOLUTE_PLANNING_DISTANCE = 5.0  # points above the threshold an absolute target's planner asks for


def default_sd(statistic: str) -> float:
    return DEFAULT_SD["coverage" if statistic.startswith("coverage_") else "mean"]


# -- variance components ---------------------------------------------------------------------------------------
def _pooled_within(values: pd.Series, groups) -> tuple[float, float]:
    """(pooled within-group variance, harmonic mean of group sizes) over groups with ≥ 2 members."""
    grouped = values.groupby(groups)
    counts = grouped.size()
    variances = grouped.var(ddof=1)
    usable = counts >= 2
    df = (counts[usable] - 1).sum()
    pooled = float(((counts[usable] - 1) * variances[usable]).sum() / df) if df > 0 else float("nan")
    sizes = counts.to_numpy(dtype=float)
    return pooled, float(stats.hmean(sizes)) if len(sizes) else float("nan")


def components(judgements: pd.DataFrame) -> dict:
    """Nested variance components of one side of one cell from its valid judgements (columns prompt_id, k,
    value): {prompt, answer, judgement, observed_answer, prompts, k, m} in points². A level with one member
    per group (M = 1, K = 1) cannot be separated from the level below it: its component is NaN and the
    noise stays in the level above."""
    data = judgements.dropna(subset=["value"])
    nan = float("nan")
    if data.empty:
        return {"prompt": nan, "answer": nan, "judgement": nan, "observed_answer": nan, "prompts": 0, "k": nan, "m": nan}
    answer_key = data["prompt_id"].astype(str) + "\x00" + data["k"].astype(str)
    judgement_var, m = _pooled_within(data["value"].astype(float), answer_key)
    answers = data.groupby(["prompt_id", "k"])["value"].mean().reset_index()
    observed_answer, k = _pooled_within(answers["value"], answers["prompt_id"])
    answer_var = max(0.0, observed_answer - (judgement_var / m if math.isfinite(judgement_var) else 0.0)) if math.isfinite(observed_answer) else nan
    prompt_means = answers.groupby("prompt_id")["value"].mean()
    observed_prompt = float(prompt_means.var(ddof=1)) if len(prompt_means) >= 2 else nan
    within = observed_answer if math.isfinite(observed_answer) else 0.0
    prompt_var = max(0.0, observed_prompt - within / k) if math.isfinite(observed_prompt) else nan
    return {"prompt": prompt_var, "answer": answer_var, "judgement": judgement_var, "observed_answer": observed_answer,
            "prompts": int(len(prompt_means)), "k": k, "m": m}


def paired_components(local: pd.DataFrame, service: pd.DataFrame | None, alpha: float) -> dict:
    """The variance of a verdict's mean difference split into prompts, answers (K) and judgements (M), with the
    half-width of its (1 − 2α) interval now and with twice the prompts, answers or judgements.

    `local`, `service`: judgement-level frames (prompt_id, k, value) of one metric; `service` None for an absolute
    target (the side's own components)."""
    a = components(local)
    nan = float("nan")
    if service is not None and len(service):
        b = components(service)
        la = local.dropna(subset=["value"]).groupby("prompt_id")["value"].mean()
        lb = service.dropna(subset=["value"]).groupby("prompt_id")["value"].mean()
        common = la.index.intersection(lb.index)
        observed = float((la[common] - lb[common]).var(ddof=1)) if len(common) >= 2 else nan
        n = int(len(common))
        judgement = _nansum(a["judgement"], b["judgement"])
        answer = _nansum(a["answer"], b["answer"])
        within = _nansum(a["observed_answer"], b["observed_answer"])
    else:
        observed = float(local.dropna(subset=["value"]).groupby("prompt_id")["value"].mean().var(ddof=1)) if a["prompts"] >= 2 else nan
        n, judgement, answer, within = a["prompts"], a["judgement"], a["answer"], a["observed_answer"]
    k, m = a["k"], a["m"]
    prompt = max(0.0, observed - (within / k if math.isfinite(within) else 0.0)) if math.isfinite(observed) else nan
    out = {"prompts": n, "k": k, "m": m, "var_prompt": prompt, "var_answer": answer, "var_judgement": judgement}
    if not (n >= 2 and math.isfinite(prompt)):
        return {**out, "share_prompt": nan, "share_answer": nan, "share_judgement": nan, "half_width": nan,
                "half_width_2n": nan, "half_width_2k": nan, "half_width_2m": nan}
    terms = {"prompt": prompt, "answer": (answer if math.isfinite(answer) else 0.0) / k,
             "judgement": (judgement if math.isfinite(judgement) else 0.0) / (k * m)}
    per_prompt = sum(terms.values())
    shares = {f"share_{name}": (value / per_prompt if per_prompt > 0 else nan) for name, value in terms.items()}

    def half(n_, k_, m_):
        variance = prompt + terms["answer"] * k / k_ + terms["judgement"] * k * m / (k_ * m_)
        return float(stats.t.ppf(1 - alpha, n_ - 1) * math.sqrt(variance / n_))

    return {**out, **shares, "half_width": half(n, k, m), "half_width_2n": half(2 * n, k, m),
            "half_width_2k": half(n, 2 * k, m), "half_width_2m": half(n, k, 2 * m)}


def _nansum(*values) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(sum(finite)) if finite else float("nan")


def advice(row: dict) -> str:
    """What would narrow the interval most, in words."""
    widths = {"prompts": row.get("half_width_2n"), "answers per prompt (K)": row.get("half_width_2k"),
              "judgements per answer (M)": row.get("half_width_2m")}
    widths = {k: v for k, v in widths.items() if v is not None and math.isfinite(v)}
    if not widths or not math.isfinite(row.get("half_width", float("nan"))):
        return "not enough prompts to split the noise"
    best = min(widths, key=widths.get)
    return (f"doubling the {best} narrows the interval most: ±{row['half_width']:.1f} → ±{widths[best]:.1f} "
            f"(prompts {row['share_prompt']:.0%} of the variance, K {row['share_answer']:.0%}, M {row['share_judgement']:.0%})")


# -- power -----------------------------------------------------------------------------------------------------
def _power_solver():
    from statsmodels.stats.power import TTestPower

    return TTestPower()


def resolvable(sd: float, n: int, alpha: float, power: float = POWER) -> float:
    """The smallest true distance from the test's bound that n prompts detect with `power` (points); NaN when n < 2."""
    if not (n >= 2 and sd > 0 and math.isfinite(sd)):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        effect = _power_solver().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power, alternative="larger")
    return float(np.asarray(effect).item()) * sd


def prompts_needed(sd: float, distance: float, alpha: float, power: float = POWER) -> int | None:
    """Prompts for `power` when the truth is `distance` points past the bound (None when distance ≤ 0)."""
    if not (distance > 0 and sd > 0 and math.isfinite(sd)):
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        n = _power_solver().solve_power(effect_size=distance / sd, nobs=None, alpha=alpha, power=power, alternative="larger")
    return max(2, int(math.ceil(float(np.asarray(n).item()))))


def planner_line(rule, sd: float | None, n: int | None, source: str) -> str:
    """The planner's sentence for a rule (`verdict.Rule`): what the current test set resolves, and the prompts needed."""
    sd_used = sd if sd is not None and math.isfinite(sd) and sd > 0 else default_sd(rule.statistic)
    source = source if sd is not None and math.isfinite(sd) and sd > 0 else f"assumed, no pilot yet: {sd_used:g}"
    head = f"Planner ({100 * POWER:.0f}% power, one-sided α = {rule.test_alpha:.2g}, sd of per-prompt {'differences' if rule.versus_service else 'values'} {sd_used:.1f}: {source})"
    now = ""
    if n:
        r = resolvable(sd_used, n, rule.test_alpha)
        now = (f"with {n} prompts the smallest difference this run can resolve is ±{r:.1f} points; " if math.isfinite(r)
               else f"with {n} prompt{'s' if n != 1 else ''} nothing can be resolved; ")
    if rule.versus_service and rule.scale == 1 and rule.margin > 0:
        need = prompts_needed(sd_used, rule.margin, rule.test_alpha)
        return f"{head}: {now}δ = {rule.margin:g} needs {need} prompts per task (when the local model is truly as good as the service LLM)."
    if rule.versus_service:
        need = prompts_needed(sd_used, 5.0, rule.test_alpha)
        return (f"{head}: {now}with δ = {rule.margin:g} the local model must be shown better, which no number of prompts "
                f"does when the two are equal; a margin of 5 points (`>= service - 5`) needs {need} prompts per task.")
    need = prompts_needed(sd_used, ABSOLUTE_PLANNING_DISTANCE, rule.test_alpha)
    return (f"{head}: {now}showing {rule.what()} ≥ {rule.threshold:g} when the truth is {ABSOLUTE_PLANNING_DISTANCE:g} points "
            f"above it needs {need} prompts per task.")


def pooled_sd(sds) -> float | None:
    """The root mean square of the decided cells' spreads (the run's pilot), None without one."""
    values = np.asarray([s for s in sds if s is not None and math.isfinite(float(s)) and float(s) > 0], dtype=float)
    return float(np.sqrt(np.mean(values ** 2))) if values.size else None
