"""Tables for reading, in the notebooks and report.html: pandas Stylers, rounded, the deciding columns first,
each interval in one cell beside its estimate, outcomes coloured, long texts wrapped (never cut with "…"), no
index. Only what is shown is rounded: the CSVs under the run keep full precision.

The colours follow the figures' language (`figures.OUTCOME_COLOURS`): green where the claim was shown (not worse,
meets the target, passed, equivalent, met), red where it was refuted or stopped the sequence (worse, different,
stopped here), amber where it could not be decided (too few prompts, not shown, not reached).
"""

from __future__ import annotations

import html
import math

import pandas as pd
from pandas.io.formats.style import Styler

from llamaduo_nb.methods import verdict

SHOWN, REFUTED, OPEN = "#d9eedc", "#f6d5cf", "#fbeccb"
OUTCOME_SHADES = {
    verdict.PASS_RELATIVE: SHOWN, verdict.PASS_ABSOLUTE: SHOWN, verdict.PASSED: SHOWN, verdict.EQUIVALENT: SHOWN, "yes": SHOWN,
    verdict.NOT_SHOWN: OPEN, verdict.UNDECIDED: OPEN, verdict.NOT_REACHED: OPEN, verdict.NOT_SHOWN_EQUIVALENT: OPEN,
    verdict.WENT_ON: OPEN, verdict.NOT_NEEDED: "", verdict.FAILED: REFUTED, "worse": REFUTED, verdict.DIFFERENT: REFUTED,
    "no": REFUTED, "true": SHOWN, "false": REFUTED,
}
PHRASES = sorted(OUTCOME_SHADES, key=len, reverse=True)  # "not shown equivalent" before "equivalent"
OUTCOME_COLUMNS = ("outcome", "sequence", "equivalence", "parity", "met", "cycle_met", "passed", "chosen", "outcome_if_dropped")
TEXT_COLUMNS = ("why", "parity", "advice", "warning", "stop_reason", "failure_reasons", "instruction", "reference", "partner",
                "response", "served", "adapter")
COUNT_ENDINGS = ("requests", "hits", "calls", "tokens", "pairs", "judgements", "prompts", "errors", "answers", "items")
SIGNIFICANT_DIGITS = ("p_value", "alpha", "cost_usd")  # shown with 3 significant digits, whatever `digits` says
ONE_VALUE_TO_CAPTION = ("cycle", "judge", "baseline")  # a column with one value in every row says it once, above the table
IDENTITY = ("cycle", "task", "local_model", "judge", "volume", "metric", "baseline")


def _shade(value) -> str:
    if isinstance(value, bool):
        return f"background-color: {SHOWN if value else REFUTED}"
    text = str(value).strip().lower()
    for phrase in PHRASES:
        if text.startswith(phrase) and not text[len(phrase):len(phrase) + 1].isalnum():  # a word: "no", never "none"
            return f"background-color: {OUTCOME_SHADES[phrase]}"
    return ""


def estimate_with_interval(estimate, low, high, digits: int = 1) -> str:
    """"61.8 [55.2, 68.4]": an estimate with its interval in one cell; "61.8 [–]" where none could be given."""
    if estimate is None or (isinstance(estimate, float) and math.isnan(estimate)):
        return "–"
    bounds = [low, high]
    if any(b is None or (isinstance(b, float) and math.isnan(b)) for b in bounds):
        return f"{estimate:.{digits}f} [–]"
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def with_intervals(frame: pd.DataFrame, pairs: dict, digits: int = 1) -> pd.DataFrame:
    """Each `estimate column → (low column, high column)` of `pairs` as one text column "<estimate> [95% CI]" in the
    estimate's place, its bounds dropped."""
    out = frame.copy()
    for estimate, (low, high) in pairs.items():
        if not {estimate, low, high} <= set(out.columns):
            continue
        out[estimate] = [estimate_with_interval(e, lo, hi, digits) for e, lo, hi in zip(out[estimate], out[low], out[high])]
        out = out.drop(columns=[low, high])
    return out


def ci_pairs(frame: pd.DataFrame) -> dict:
    """metrics.csv's `<statistic>` → (`<statistic>_ci_low`, `<statistic>_ci_high`) pairs present in `frame`."""
    return {c[: -len("_ci_low")]: (c, c[: -len("_ci_low")] + "_ci_high") for c in frame.columns
            if c.endswith("_ci_low") and c[: -len("_ci_low")] in frame.columns and c[: -len("_ci_low")] + "_ci_high" in frame.columns}


def for_reading(frame: pd.DataFrame, lead=(), digits: int = 1, caption: str | None = None, intervals: dict | None = None,
                grouped_by=()) -> Styler:
    """`frame` as a table to read: the identifying columns, then `lead` (the deciding ones), then the rest; each
    `<x>` with its `<x>_ci_low` / `<x>_ci_high` (and each pair of `intervals`: estimate → (low, high)) in one cell;
    numbers rounded to `digits`; outcomes coloured; long texts wrapped; a cycle, judge or baseline shared by every
    row said once in the caption. `grouped_by` ("similarity", "precision"): columns `<group>_<x>` under one spanning
    header per group (the paper's wide table fits a page)."""
    if not isinstance(frame.index, pd.RangeIndex):  # a named index (a service LLM, a stage) is a column to read
        frame = frame.reset_index()
    frame = frame.infer_objects()  # numbers held as objects (a transposed dict of accounts) are formatted as numbers
    frame = with_intervals(frame, {**ci_pairs(frame), **(intervals or {})}, digits)
    constant = [c for c in ONE_VALUE_TO_CAPTION if c in frame.columns and len(frame) > 1 and frame[c].nunique(dropna=False) == 1]
    if constant:
        said = " · ".join(f"{c} {frame[c].iloc[0]}" for c in constant)
        caption = f"{caption} ({said})" if caption else said
        frame = frame.drop(columns=constant)
    first = [c for c in IDENTITY if c in frame.columns] + [c for c in lead if c in frame.columns and c not in IDENTITY]
    frame = frame[first + [c for c in frame.columns if c not in first]]
    floats = [c for c in frame.columns if pd.api.types.is_float_dtype(frame[c])]
    key = {c: next(((g, c[len(g) + 1:]) for g in grouped_by if c.startswith(f"{g}_")), ("", c)) if grouped_by else c
           for c in frame.columns}
    counts = [c for c in floats if c.endswith(COUNT_ENDINGS) and (frame[c].dropna() % 1 == 0).all()]
    if grouped_by:
        frame = frame.set_axis(pd.MultiIndex.from_tuples([key[c] for c in frame.columns]), axis=1)
    at = lambda columns: [key[c] for c in columns] or None  # noqa: E731 (a flat name → the table's column)
    style = frame.style.hide(axis="index").format(precision=digits, na_rep="–", subset=at(floats))
    if counts:  # counts read back from JSON or summed as floats: 40, not 40.00
        style = style.format("{:.0f}", na_rep="–", subset=at(counts))
    small = [c for c in SIGNIFICANT_DIGITS if c in floats]
    if small:  # a p-value of 0.004 is not "0.0"
        style = style.format("{:.3g}", na_rep="–", subset=at(small))
    style = style.format(na_rep="–", subset=at([c for c in key if c not in floats]))
    shaded = [c for c in OUTCOME_COLUMNS if c in key and c != "chosen"]
    if shaded:
        style = style.map(_shade, subset=at(shaded))
    if "chosen" in key:  # the chosen volume stands out; the others are not failures
        style = style.map(lambda v: f"background-color: {SHOWN}; font-weight: bold" if v is True or v == "True" else "", subset=at(["chosen"]))
    texts = [c for c in TEXT_COLUMNS if c in key]
    if texts:  # a block of its own width: a table cell's min-width is ignored when the table is squeezed
        style = style.format(lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else
                             f'<div style="min-width: 18em; max-width: 36em; white-space: normal">{html.escape(str(v))}</div>',
                             subset=at(texts))
        style = style.set_properties(subset=at(texts), **{"text-align": "left", "vertical-align": "top"})
    style = style.set_table_styles([
        {"selector": "", "props": [("font-size", "12px"), ("border-collapse", "collapse")]},
        {"selector": "th", "props": [("text-align", "left"), ("padding", "3px 8px"), ("border-bottom", "1px solid #999"),
                                     ("white-space", "nowrap")]},
        {"selector": "td", "props": [("padding", "2px 8px"), ("border-bottom", "1px solid #e4e4e4"), ("white-space", "nowrap")]},
        {"selector": "caption", "props": [("caption-side", "top"), ("text-align", "left"), ("font-weight", "bold"),
                                          ("padding-bottom", "4px")]},
    ], overwrite=False)
    if grouped_by:  # a group's name centred over its columns
        style = style.set_table_styles([{"selector": "th.col_heading.level0", "props": [("text-align", "center")]}], overwrite=False)
    return style.set_caption(caption) if caption else style
