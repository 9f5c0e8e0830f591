"""Synthetic experiments with a known truth, for measuring the verdict's intervals and decisions.

A test prompt has a difficulty shared by both sides (prompt sd 15 points); each of its K answers adds its own
quality noise (answer sd 12); each of the M judgements of an answer adds the judge's noise (sd 8) and is
rounded to a multiple of 5 and clipped to 0–100, as LLM judges score. An answer's score is the mean of its M
judgements; a prompt's value is the mean of its K answer scores (`mean`) or the % of them at least ζ
(`coverage_ζ`). The truth is the population value, computed once from 400,000 prompts.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

PROMPT_SD, ANSWER_SD, JUDGE_SD = 15.0, 12.0, 8.0


def side(rng, b, mu: float, k: int, m: int, zeta: float):
    """(per-prompt mean, per-prompt coverage_ζ) of one side: arrays of shape b.shape[:2]."""
    reps, n = b.shape[:2]
    quality = mu + b + rng.normal(0, ANSWER_SD, (reps, n, k, 1))
    judged = np.clip(np.round((quality + rng.normal(0, JUDGE_SD, (reps, n, k, m))) / 5) * 5, 0, 100)
    scores = judged.mean(-1)
    return scores.mean(-1), 100.0 * (scores >= zeta).mean(-1)


def paired(rng, reps: int, n: int, mu_service: float, shift: float, k: int = 2, m: int = 2, zeta: float = 50):
    """Per-prompt differences local − service, (mean, coverage_ζ), of `reps` experiments of n prompts each."""
    b = rng.normal(0, PROMPT_SD, (reps, n, 1, 1))
    local_mean, local_cov = side(rng, b, mu_service + shift, k, m, zeta)
    service_mean, service_cov = side(rng, b, mu_service, k, m, zeta)
    return local_mean - service_mean, local_cov - service_cov


@lru_cache(maxsize=None)
def truth(mu_service: float, shift: float, k: int = 2, m: int = 2, zeta: float = 50) -> tuple[float, float]:
    """The population difference (mean, coverage_ζ) of a scenario."""
    rng = np.random.default_rng(20261204)
    d_mean, d_cov = paired(rng, 1, 400_000, mu_service, shift, k, m, zeta)
    return float(d_mean.mean()), float(d_cov.mean())


def percentile_bootstrap(d: np.ndarray, rng, resamples: int = 1000, level: float = 0.95):
    """The interval the workbench used before: a percentile bootstrap of the mean of per-prompt differences."""
    reps, n = d.shape
    picks = rng.integers(0, n, (reps, resamples, n))
    means = np.take_along_axis(np.broadcast_to(d[:, None, :], (reps, resamples, n)), picks, 2).mean(2)
    tail = (1 - level) / 2
    return np.quantile(means, tail, axis=1), np.quantile(means, 1 - tail, axis=1)
