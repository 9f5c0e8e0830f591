"""The verdict's claims measured against a known truth (tests/verdict_simulation.py): how often its 95 % intervals
cover the true difference, and how often "not worse" is declared when it is false, at 6, 20 and 100 prompts.

The table this prints (`pytest -s tests/test_verdict_simulation.py`) is in docs/MEASUREMENTS.md."""

from __future__ import annotations

import numpy as np
import pytest

from llamaduo_nb.methods import verdict

from .verdict_simulation import paired, percentile_bootstrap, truth

REPLICATES = 1000  # Monte Carlo standard error of a 95 % coverage: 0.7 points
SIZES = (6, 20, 100)
# (service level, local − service shift) in points: equal, 10 worse, 5 worse, 5 better, around the coverage@50 cut
SCENARIOS = [(60.0, 0.0), (60.0, -10.0), (70.0, -5.0), (50.0, 5.0)]


def t_intervals(d: np.ndarray):
    """The verdict's interval of each experiment (rows of d): `verdict.t_bounds`, which `verdict.t_interval` calls."""
    return verdict.t_bounds(d, verdict.ALPHA)


@pytest.fixture(scope="module")
def coverage_table():
    rows = []
    for s, (mu, shift) in enumerate(SCENARIOS):
        true_mean, true_cov = truth(mu, shift)
        for n in SIZES:
            d_mean, d_cov = paired(np.random.default_rng([s, n]), REPLICATES, n, mu, shift)
            for statistic, d, true in (("mean", d_mean, true_mean), ("coverage_50", d_cov, true_cov)):
                low, high, decided = t_intervals(d)
                covered = (low <= true) & (true <= high)
                row = {"scenario": f"service {mu:g}, local {shift:+g}", "n": n, "statistic": statistic, "truth": true,
                       "t_coverage": covered[decided].mean(), "undecided": 1 - decided.mean()}
                if n == 6:
                    b_low, b_high = percentile_bootstrap(d[:400], np.random.default_rng([s, n, 1]))
                    row["bootstrap_coverage"] = ((b_low <= true) & (true <= b_high)).mean()
                rows.append(row)
    print("\nscenario                    n  statistic     truth   t-interval  undecided  percentile bootstrap")
    for r in rows:
        boot = f"{r['bootstrap_coverage']:.3f}" if "bootstrap_coverage" in r else ""
        print(f"{r['scenario']:26s} {r['n']:3d}  {r['statistic']:12s} {r['truth']:+6.1f}   {r['t_coverage']:.3f}       "
              f"{r['undecided']:.3f}      {boot}")
    return rows


def test_the_t_interval_covers_the_mean_difference_95_percent_of_the_time(coverage_table):
    for r in coverage_table:
        if r["statistic"] == "mean":
            assert 0.93 <= r["t_coverage"] <= 0.97, r
            assert r["undecided"] == 0


def test_the_t_interval_covers_coverage_at_zeta_at_20_and_100_prompts_and_is_conservative_at_6(coverage_table):
    for r in coverage_table:
        if r["statistic"] != "coverage_50":
            continue
        if r["n"] >= 20:
            assert 0.93 <= r["t_coverage"] <= 0.97, r
        else:  # K = 2: a prompt's coverage takes 3 values; some experiments have no spread ("too few prompts to decide")
            assert r["t_coverage"] >= 0.93, r
            assert r["undecided"] < 0.15, r


def test_the_earlier_percentile_bootstrap_under_covers_at_6_prompts(coverage_table):
    at_six = [r for r in coverage_table if r["n"] == 6]
    for r in at_six:  # below the 93 % the t-interval keeps, in every scenario
        assert r["bootstrap_coverage"] < 0.92, r
    assert min(r["bootstrap_coverage"] for r in at_six if r["statistic"] == "coverage_50") < 0.75


def _declared_not_worse(d: np.ndarray, margin: float) -> float:
    """Share of experiments the verdict declares not worse with margin δ (`verdict.decide`'s rule: lower bound ≥ −δ)."""
    low, _, decided = t_intervals(d)
    return float(np.mean(decided & (low >= -margin)))


@pytest.mark.parametrize("n", SIZES)
def test_not_worse_is_declared_at_most_alpha_of_the_time_when_false(n):
    rng = np.random.default_rng(n)
    # at the boundary: the local model truly exactly δ worse (δ set to the true gap), mean and coverage@50
    true_mean, true_cov = truth(60.0, -5.0)
    d_mean, d_cov = paired(rng, REPLICATES, n, 60.0, -5.0)
    assert _declared_not_worse(d_mean, -true_mean) <= verdict.ALPHA + 0.015
    assert _declared_not_worse(d_cov, -true_cov) <= verdict.ALPHA + 0.015
    # δ = 0 and the two truly equal: "not worse" would need the local model shown better
    d_mean, d_cov = paired(rng, REPLICATES, n, 60.0, 0.0)
    assert _declared_not_worse(d_mean, 0.0) <= verdict.ALPHA + 0.015
    assert _declared_not_worse(d_cov, 0.0) <= verdict.ALPHA + 0.015


def test_the_verdict_goes_through_the_same_interval_as_the_simulation():
    """`verdict.decide` on data frames gives the interval the simulation measures on arrays."""
    import pandas as pd

    rng = np.random.default_rng(3)
    local = pd.DataFrame({"prompt_id": np.repeat(list("abcdef"), 2), "k": [0, 1] * 6, "score": rng.uniform(30, 90, 12)})
    service = local.assign(score=rng.uniform(30, 90, 12))
    rule = verdict.Rule(statistic="mean", versus_service=True, offset=-5.0)
    result = verdict.decide(local, service, rule)
    d = local.groupby("prompt_id")["score"].mean() - service.groupby("prompt_id")["score"].mean()
    expected = verdict.t_interval(d.to_numpy(), verdict.ALPHA, -5.0)
    assert (result.low, result.high, result.estimate) == pytest.approx((expected.low, expected.high, expected.estimate))
    # and t_interval is scipy's t-test interval
    from scipy import stats

    scipy_ci = stats.ttest_1samp(d.to_numpy(), 0.0).confidence_interval(0.95)
    assert (expected.low, expected.high) == pytest.approx((scipy_ci.low, scipy_ci.high))


def test_the_earlier_rule_declared_equal_models_not_worse_far_more_often_than_alpha():
    """δ = 0, the two truly equal, 6 prompts: the percentile bootstrap's lower bound reached 0 (the earlier rule's
    "not worse") far more often than the 2.5 % a one-sided 97.5 % claim allows; the verdict's test does not."""
    rng = np.random.default_rng(60)
    d_mean, d_cov = paired(rng, 400, 6, 60.0, 0.0)
    rates = {}
    for statistic, d in (("mean", d_mean), ("coverage_50", d_cov)):
        low, _ = percentile_bootstrap(d, np.random.default_rng(61))
        rates[statistic] = (float(np.mean(low >= 0)), _declared_not_worse(d, 0.0))
    print("\nequal models, δ = 0, 6 prompts: 'not worse' declared (earlier rule, verdict):", rates)
    assert rates["coverage_50"][0] > 0.15 and rates["mean"][0] > 0.04
    assert rates["coverage_50"][1] <= verdict.ALPHA + 0.02 and rates["mean"][1] <= verdict.ALPHA + 0.02
