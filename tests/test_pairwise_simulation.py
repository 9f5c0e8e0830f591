"""How often pairwise.csv's 95 % intervals of the win and loss shares cover the truth, at 6, 20 and 100 test prompts.

A synthetic experiment with a known truth: a test prompt has a difficulty (sd 1 on the logit scale), each of its K
answer pairs its own (sd 0.7), and the judge sees both orders with a preference for the first position (±0.4);
the local answer wins an order with probability 0.85 · logistic(shift + difficulty + pair ± position), ties or
loses otherwise. The truth is the population win share from 400,000 prompts. The interval is the t-interval of
per-prompt shares (`pairwise.summarise` through `verdict.value_interval`); the simulation computes it vectorised,
and `test_summarise_gives_the_simulated_interval` checks the code gives the same numbers on one experiment.
"""

from __future__ import annotations

import itertools
from functools import lru_cache

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from llamaduo_nb.methods import pairwise

K, REPS = 2, 3000
SHIFTS = (-2.0, 0.0, 1.0, 2.5)  # win shares of about 15, 42, 58 and 75 %


def experiments(rng, reps: int, n: int, shift: float) -> np.ndarray:
    """Verdicts of `reps` experiments of n prompts: True where the local answer won, shape (reps, n, K, 2 orders)."""
    difficulty = rng.normal(0, 1.0, (reps, n, 1, 1))
    pair = rng.normal(0, 0.7, (reps, n, K, 1))
    position = np.array([0.4, -0.4])
    p_win = 0.85 / (1 + np.exp(-(shift + difficulty + pair + position)))
    return rng.random((reps, n, K, 2)) < p_win


@lru_cache(maxsize=None)
def truth(shift: float) -> float:
    return float(100.0 * experiments(np.random.default_rng(20261208), 1, 400_000, shift).mean())


def t_intervals(wins: np.ndarray, level: float = 0.95):
    shares = 100.0 * wins.mean(axis=(2, 3))
    n = shares.shape[1]
    centre, sd = shares.mean(1), shares.std(1, ddof=1)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / np.sqrt(n)
    return np.clip(centre - half, 0, 100), np.clip(centre + half, 0, 100), sd > 0


@pytest.fixture(scope="module")
def coverage_table():
    rng = np.random.default_rng(7)
    rows = []
    for shift, n in itertools.product(SHIFTS, (6, 20, 100)):
        low, high, decided = t_intervals(experiments(rng, REPS, n, shift))
        want = truth(shift)
        rows.append({"shift": shift, "n": n, "truth": want, "undecided": float(1 - decided.mean()),
                     "coverage": float(((low <= want) & (want <= high))[decided].mean())})
    print(pd.DataFrame(rows).to_string(index=False))  # the measured table, for the record (pytest -s)
    return rows


def test_the_win_share_interval_covers_95_percent_at_100_prompts(coverage_table):
    for r in coverage_table:
        if r["n"] == 100:
            assert 0.93 <= r["coverage"] <= 0.97, r


def test_the_win_share_interval_stays_near_95_percent_at_6_and_20_prompts(coverage_table):
    for r in coverage_table:  # a few points low at the skewed share (15 %) with 20 prompts, or at 6: said in pairwise.py
        if r["n"] < 100:
            assert 0.90 <= r["coverage"] <= 0.995, r
            assert r["undecided"] < 0.05, r


def test_summarise_gives_the_simulated_interval():
    wins = experiments(np.random.default_rng(3), 1, 20, 1.0)
    rows = [{"cycle": 1, "task": "t", "local_model": "m", "judge": "j", "volume": 4, "baseline": "base", "baseline_volume": 0,
             "prompt_id": f"p{p}", "k": k, "order": order, "identical": False, "verdict": "A",
             "outcome": "win" if wins[0, p, k, o] else "loss"}
            for p in range(20) for k in range(K) for o, order in enumerate(("AB", "BA"))]
    summary = pairwise.summarise(pd.DataFrame(rows)).iloc[0]
    low, high, _ = t_intervals(wins)
    assert summary["win_ci_low"] == pytest.approx(low[0]) and summary["win_ci_high"] == pytest.approx(high[0])
    assert summary["win"] == pytest.approx(100.0 * wins.mean())
