"""Aggregation as the paper does it, checked on hand-computed cases."""

import math

import pandas as pd
import pytest

from llamaduo_nb.metrics import aggregate, answer_scores, coverage_at


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
