"""Tables for reading: the deciding columns first, estimates with their interval in one cell, rounded, outcomes
coloured, long texts whole, constant columns said once; the frame itself (what the CSVs hold) unchanged."""

import numpy as np
import pandas as pd

from llamaduo_nb import tables


def verdicts() -> pd.DataFrame:
    return pd.DataFrame({
        "task": ["closed_qa", "closed_qa", "summarization"], "local_model": ["m"] * 3, "judge": ["openai:gpt-4o"] * 3,
        "volume": [4, 16, 16], "cycle": [1, 1, 1], "p_value": [0.2, 0.01, np.nan], "estimate": [-12.345678, -3.21, np.nan],
        "low": [-20.0, -8.5, np.nan], "high": [-4.0, 2.0, np.nan],
        "outcome": ["not shown", "not worse", "too few prompts to decide"], "chosen": [False, True, False],
        "why": ["the smallest volume the verdict passed " * 6] * 3,
    })


def test_deciding_columns_first_intervals_in_one_cell_and_the_frame_untouched():
    frame = verdicts()
    before = frame.copy()
    style = tables.for_reading(frame, lead=["outcome", "chosen", "estimate"], intervals={"estimate": ("low", "high")})
    shown = style.data
    assert list(shown.columns[:5]) == ["task", "local_model", "volume", "outcome", "chosen"]
    assert shown["estimate"].tolist() == ["-12.3 [-20.0, -4.0]", "-3.2 [-8.5, 2.0]", "–"]
    assert "low" not in shown and "high" not in shown
    pd.testing.assert_frame_equal(frame, before)  # full precision stays with the caller (and the CSV)


def test_a_shared_judge_and_cycle_are_said_once_and_outcomes_are_coloured():
    html = tables.for_reading(verdicts(), caption="The verdict").to_html()
    assert "The verdict (cycle 1 · judge openai:gpt-4o)" in html
    assert tables.SHOWN in html and tables.OPEN in html  # not worse: green; not shown / too few prompts: amber
    assert ("the smallest volume the verdict passed " * 6).strip() in html  # never cut with "…"
    assert "0.01" in html and "0.010000" not in html


def test_ci_columns_of_metrics_csv_are_joined_and_an_index_becomes_a_column():
    metrics = pd.DataFrame({"task": ["a", "b"], "mean": [61.833333, 50.0], "mean_ci_low": [55.2, np.nan],
                            "mean_ci_high": [68.44, np.nan]})
    assert tables.for_reading(metrics).data["mean"].tolist() == ["61.8 [55.2, 68.4]", "50.0 [–]"]
    calls = pd.DataFrame({"requests": [3]}, index=pd.Index(["gpt-4o"], name="service LLM"))
    assert list(tables.for_reading(calls).data.columns) == ["service LLM", "requests"]


def test_a_missing_value_is_not_coloured_as_a_refusal():
    frame = pd.DataFrame({"task": ["a", "b"], "met": [None, "no"]})
    html = tables.for_reading(frame).to_html()
    assert html.count(tables.REFUTED) == 1  # "no", never "None"


def test_the_papers_wide_table_groups_its_columns_by_metric():
    wide = pd.DataFrame({"task": ["a"], "volume": [4], "similarity_mean": [61.84], "precision_mean": [50.0],
                         "precision_coverage_50": [75.0]})
    style = tables.for_reading(wide, grouped_by=("similarity", "precision"))
    assert list(style.data.columns) == [("", "task"), ("", "volume"), ("similarity", "mean"), ("precision", "mean"),
                                        ("precision", "coverage_50")]
    html = style.to_html()
    assert "61.8" in html and "61.84" not in html and 'colspan="2"' in html  # precision spans its two columns
