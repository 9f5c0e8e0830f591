"""Aggregation as the paper does it, checked on hand-computed cases."""

import math

import pandas as pd
import pytest

from llamaduo_nb.methods.metrics import aggregate, answer_scores, coverage_at


def _j(prompt, k, m, sim, prec, valid=True, volume=8):
    return {"cycle": 1, "task": "t", "local_model": "lm", "judge": "j", "volume": volume, "prompt_id": prompt, "k": k, "m": m,
            "similarity": sim if valid else None, "precision": prec if valid else None, "valid": valid}


def test_coverage_at_counts_the_boundary():
    assert coverage_at([50, 49.99, 70, 100], 50) == 75.0
    assert coverage_at([70], 70) == 100.0
    assert coverage_at([69.999], 70) == 0.0
    assert math.isnan(coverage_at([], 50))


def test_mean_over_m_then_over_answers():
    rows = [
        # prompt a, k=0: M=2 judgements 40 and 60 -> 50 ; k=1: 80, 100 -> 90
        _j("a", 0, 0, 40, 10), _j("a", 0, 1, 60, 30),
        _j("a", 1, 0, 80, 70), _j("a", 1, 1, 100, 70),
        # prompt b, k=0: 20 (second judgement failed: excluded, counted) ; k=1: 70, 70 -> 70
        _j("b", 0, 0, 20, 0), _j("b", 0, 1, None, None, valid=False),
        _j("b", 1, 0, 70, 100), _j("b", 1, 1, 70, 100),
    ]
    m = aggregate(pd.DataFrame(rows), zetas=(50, 70))
    sim = m[m.metric == "similarity"].iloc[0]
    # answer scores: 50, 90, 20, 70
    assert sim["mean"] == pytest.approx(57.5)
    assert sim["median"] == pytest.approx(60.0)
    assert sim["coverage_50"] == pytest.approx(75.0)  # 50 counts
    assert sim["coverage_70"] == pytest.approx(50.0)  # 70 counts
    assert sim["n"] == 4
    assert sim["failed_judgements"] == 1 and sim["judgements"] == 8
    prec = m[m.metric == "precision"].iloc[0]
    # answer scores: 20, 70, 0, 100
    assert prec["mean"] == pytest.approx(47.5)
    assert prec["median"] == pytest.approx(45.0)
    assert prec["coverage_50"] == pytest.approx(50.0)
    assert prec["coverage_70"] == pytest.approx(50.0)


def test_one_row_per_group_and_metric():
    rows = [_j("a", 0, 0, 10, 10, volume=v) for v in (0, 8, 16)]
    m = aggregate(pd.DataFrame(rows))
    assert len(m) == 6
    assert set(m.volume) == {0, 8, 16}
    required = ["cycle", "task", "local_model", "judge", "volume", "metric", "mean", "median", "coverage_50", "coverage_70", "n"]
    assert list(m.columns[: len(required)]) == required


def test_judge_spread_over_m():
    rows = [_j("a", 0, 0, 40, 50), _j("a", 0, 1, 60, 50)]
    s = answer_scores(pd.DataFrame(rows))
    assert s[s.metric == "similarity"]["judge_std"].iloc[0] == pytest.approx(14.1421, rel=1e-3)
    assert s[s.metric == "precision"]["judge_std"].iloc[0] == pytest.approx(0.0)


# -- the paper's aggregates, edge cases ----------------------------------------------------

PAPER_COLUMNS = ["cycle", "task", "local_model", "judge", "volume", "metric", "mean", "median", "coverage_50", "coverage_70", "n"]


def test_paper_columns_first_then_the_new_ones():
    m = aggregate(pd.DataFrame([_j("a", 0, 0, 10, 10)]), zetas=(50, 70))
    assert list(m.columns[:11]) == PAPER_COLUMNS
    rest = list(m.columns[11:])
    assert rest[:3] == ["judge_std", "failed_judgements", "judgements"]
    for col in ("failed_share", "prompts", "unscored_answers", "mean_ci_low", "mean_ci_high",
                "coverage_50_ci_low", "coverage_50_ci_high", "coverage_70_ci_low", "coverage_70_ci_high"):
        assert col in rest
    # coverage columns follow the zetas asked for
    m = aggregate(pd.DataFrame([_j("a", 0, 0, 10, 10)]), zetas=(40, 90))
    assert list(m.columns[:11]) == PAPER_COLUMNS[:8] + ["coverage_40", "coverage_90", "n"]
    assert "coverage_90_ci_high" in m.columns


def test_ties_at_the_boundary_and_in_the_median():
    # answer scores (M = 1): 70, 70, 70, 40 -> median of the tied middle values is 70, all three 70s count for ζ=70
    rows = [_j("a", 0, 0, 70, 50), _j("a", 1, 0, 70, 50), _j("b", 0, 0, 70, 49), _j("b", 1, 0, 40, 49)]
    m = aggregate(pd.DataFrame(rows), zetas=(50, 70))
    sim = m[m.metric == "similarity"].iloc[0]
    assert sim["mean"] == pytest.approx(62.5)
    assert sim["median"] == pytest.approx(70.0)
    assert sim["coverage_70"] == pytest.approx(75.0)
    assert sim["coverage_50"] == pytest.approx(75.0)
    prec = m[m.metric == "precision"].iloc[0]
    # 50, 50, 49, 49: median between two ties = 49.5; ζ=50 counts exactly the two 50s
    assert prec["median"] == pytest.approx(49.5)
    assert prec["coverage_50"] == pytest.approx(50.0)
    assert prec["coverage_70"] == pytest.approx(0.0)


def test_mean_over_m_is_averaged_before_the_boundary():
    # M = 2 judgements 40 and 60 -> answer score 50: counts at ζ=50 although one judgement is below it
    rows = [_j("a", 0, 0, 40, 0), _j("a", 0, 1, 60, 0)]
    sim = aggregate(pd.DataFrame(rows), zetas=(50, 70)).query("metric == 'similarity'").iloc[0]
    assert sim["coverage_50"] == 100.0 and sim["n"] == 1


def test_failed_judgements_are_excluded_and_counted():
    rows = [
        _j("a", 0, 0, 80, 80), _j("a", 0, 1, None, None, valid=False), _j("a", 0, 2, 60, 60),  # score 70 from 2 valid of 3
        _j("a", 1, 0, None, None, valid=False), _j("a", 1, 1, None, None, valid=False), _j("a", 1, 2, None, None, valid=False),  # unscored
        _j("b", 0, 0, 10, 10), _j("b", 0, 1, 10, 10), _j("b", 0, 2, 10, 10),
    ]
    m = aggregate(pd.DataFrame(rows), zetas=(50, 70))
    sim = m[m.metric == "similarity"].iloc[0]
    assert sim["mean"] == pytest.approx(40.0)  # (70 + 10) / 2: the unscored answer is not a zero
    assert sim["n"] == 2 and sim["unscored_answers"] == 1 and sim["prompts"] == 2
    assert sim["failed_judgements"] == 4 and sim["judgements"] == 9
    assert sim["failed_share"] == pytest.approx(100 * 4 / 9)
    assert sim["judge_std"] == pytest.approx((14.1421356 + 0.0) / 2)  # spread over M, averaged over answers


def test_a_group_whose_judgements_all_failed_is_still_reported():
    rows = [_j("a", 0, 0, 50, 50, volume=8), _j("a", 0, 0, None, None, valid=False, volume=16)]
    m = aggregate(pd.DataFrame(rows))
    dead = m[(m.volume == 16) & (m.metric == "similarity")].iloc[0]
    assert dead["n"] == 0 and dead["failed_share"] == 100.0 and dead["unscored_answers"] == 1
    assert math.isnan(dead["mean"]) and math.isnan(dead["coverage_50"]) and math.isnan(dead["mean_ci_low"])


def test_valid_flag_may_come_back_as_missing():
    rows = [_j("a", 0, 0, 50, 50), dict(_j("a", 0, 1, None, None), valid=None)]
    sim = aggregate(pd.DataFrame(rows)).query("metric == 'similarity'").iloc[0]
    assert sim["n"] == 1 and sim["failed_judgements"] == 1


# -- confidence intervals over prompts ------------------------------------------------------

def _prompts(scores_per_prompt, volume=8):
    """One judgement (M=1) per answer; scores_per_prompt: [[k0, k1, ...], ...]."""
    return pd.DataFrame([_j(f"p{i}", k, 0, s, s, volume=volume) for i, ks in enumerate(scores_per_prompt) for k, s in enumerate(ks)])


def test_interval_contains_the_mean_and_coverage():
    import numpy as np

    rng = np.random.default_rng(7)
    data = _prompts(rng.integers(0, 101, size=(20, 4)).tolist())
    row = aggregate(data, zetas=(50, 70)).query("metric == 'similarity'").iloc[0]
    assert row["mean_ci_low"] <= row["mean"] <= row["mean_ci_high"]
    assert row["mean_ci_low"] < row["mean_ci_high"]
    for z in (50, 70):
        assert 0 <= row[f"coverage_{z}_ci_low"] <= row[f"coverage_{z}"] <= row[f"coverage_{z}_ci_high"] <= 100


def test_interval_narrows_with_more_prompts():
    pattern = [[0, 20], [40, 60], [80, 100], [30, 90], [10, 70]]
    few = aggregate(_prompts(pattern)).query("metric == 'similarity'").iloc[0]
    many = aggregate(_prompts(pattern * 10)).query("metric == 'similarity'").iloc[0]
    assert few["mean"] == pytest.approx(many["mean"])
    assert (many["mean_ci_high"] - many["mean_ci_low"]) < 0.5 * (few["mean_ci_high"] - few["mean_ci_low"])
    assert (many["coverage_50_ci_high"] - many["coverage_50_ci_low"]) < (few["coverage_50_ci_high"] - few["coverage_50_ci_low"])


def test_interval_is_the_t_interval_of_per_prompt_values():
    """Prompts, not answers, are the unit: the per-prompt means' t-interval (scipy), clipped to 0–100."""
    import numpy as np
    from scipy import stats

    pattern = [[0, 20], [40, 60], [80, 100], [30, 90], [10, 70]]
    row = aggregate(_prompts(pattern)).query("metric == 'similarity'").iloc[0]
    per_prompt = np.array([np.mean(p) for p in pattern])
    low, high = stats.t.interval(0.95, len(per_prompt) - 1, loc=per_prompt.mean(), scale=stats.sem(per_prompt))
    assert (row["mean_ci_low"], row["mean_ci_high"]) == pytest.approx((max(0, low), min(100, high)))
    # two prompts of 10 identical answers each: resampling answers would give a narrow interval around 50
    wide = aggregate(_prompts([[0] * 10, [100] * 10])).query("metric == 'similarity'").iloc[0]
    assert (wide["mean_ci_low"], wide["mean_ci_high"]) == (0.0, 100.0)


def test_no_interval_without_spread():
    from llamaduo_nb.methods.metrics import prompt_intervals

    one = prompt_intervals([40, 60], ["a", "a"], zetas=(50,))
    assert all(math.isnan(v) for pair in one.values() for v in pair)  # one prompt: the spread is unknown
    same = prompt_intervals([40, 60, 40, 60], ["a", "a", "b", "b"], zetas=(50,))
    assert all(math.isnan(v) for pair in same.values() for v in pair)  # every prompt the same value
    empty = prompt_intervals([], [], zetas=(50,))
    assert all(math.isnan(v) for pair in empty.values() for v in pair)


def test_judge_spread_view():
    from llamaduo_nb.methods.metrics import judge_spread

    m = aggregate(pd.DataFrame([_j("a", 0, 0, 40, 50), _j("a", 0, 1, 60, 50), _j("a", 0, 2, None, None, valid=False)]))
    spread = judge_spread(m)
    assert {"judge_std", "failed_share"} <= set(spread.columns)
    assert spread.query("metric == 'similarity'")["judge_std"].iloc[0] == pytest.approx(14.14)
    assert spread["failed_share"].iloc[0] == pytest.approx(33.33)
