"""Pairwise comparison, MT-Bench style: is the fine-tuned answer better than the base model's, and than
the service LLM's?

Each answer of a fine-tuned local model (volume > 0) is put beside a baseline's answer to the same
test prompt with the same k: the base model's (volume 0, baseline `base`) and, when the service LLM
answered the test prompts too, the service LLM's (baseline `service:<label>`); the judge says which is better
(`params/prompts/pairwise.yaml`: JSON {"winner": "A" | "B" | "tie", "reason": ...}). Every
pair is judged in BOTH orders (order "AB": the tuned answer is A; "BA": it is B), one greedy
verdict per order, so the judge's position bias shows: a verdict that flips when the order is
swapped is position-inconsistent. A pair whose two answers are the same text is not sent to
the judge; it is a tie in both orders and is left out of the inconsistency rate.

A verdict the judge failed to give (call failed, reply not JSON, winner not A/B/tie) is the
sentinel "error": counted, never raised, never a win, tie or loss.

The evaluate stage writes `evaluate/pairwise.jsonl` (one row per verdict) and `pairwise.csv` at
the run folder's top, one row per (cycle, task, local_model, judge, volume, baseline) (`summarise`):
- `win`, `tie`, `loss`: % of valid verdicts (both orders counted), from the tuned model's side;
- `win_ci_low`, `win_ci_high`, `loss_ci_low`, `loss_ci_high`: their 95 % t-intervals over test prompts (a prompt's
  share of wins over its K pairs and both orders is one value: the verdicts of one prompt are correlated), the
  method of metrics.csv's intervals; measured in `tests/test_pairwise_simulation.py`: 93–99 % coverage at 6 prompts,
  93–95 % at 20, 94–95 % at 100, over win shares of 15–75 %;
- `errors`, `error_share` (% of all verdicts);
- `position_inconsistency`: % of compared pairs (both verdicts valid, answers differ) whose
  outcome differs between the two orders;
- `consistent_win`, `consistent_tie`, `consistent_loss`: % of pairs with both verdicts valid,
  a win or loss counting only when both orders agree, anything inconsistent a tie (MT-Bench's
  conservative rule);
- `first_position_preference`: % of valid non-tie verdicts (answers differ) that picked A.
"""

from __future__ import annotations

import re
from typing import Optional

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.common import extract_json
from llamaduo_nb.core.prompts import Prompt, load_prompt
from llamaduo_nb.methods.verdict import value_interval

PAIRWISE_JSONL = "pairwise.jsonl"
VERDICTS = ("A", "B", "tie")
ERROR = "error"
BASELINE_VOLUME = 0
BASE = "base"  # the baseline named for the base model (volume 0)
GROUP = ["cycle", "task", "local_model", "judge", "volume", "baseline"]
SUMMARY_COLUMNS = GROUP + ["baseline_volume", "pairs", "judgements", "win", "tie", "loss", "win_ci_low", "win_ci_high",
                           "loss_ci_low", "loss_ci_high", "errors", "error_share",
                           "compared_pairs", "position_inconsistency", "consistent_win", "consistent_tie",
                           "consistent_loss", "first_position_preference", "identical_pairs"]


def load_pairwise_prompt(name: str) -> Prompt:
    try:
        return load_prompt(name)
    except FileNotFoundError as exc:
        raise UserError(f"evaluate.pairwise_prompt: {exc}") from None


def pairs(responses: pd.DataFrame, baseline_volume: int = BASELINE_VOLUME, baseline: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """Each tuned answer (volume > 0) beside a baseline's answer to the same prompt and k.

    Without `baseline`: the base model's (volume `baseline_volume`) of the same task and local model.
    With `baseline` (answers of another model, e.g. the service LLM's: task, prompt_id, k, response):
    that answer, for every local model."""
    keys = ["task", "local_model", "prompt_id", "k"]
    if responses.empty:
        return pd.DataFrame(columns=keys + ["volume", "answer", "baseline_answer"])
    tuned = responses[responses["volume"] > baseline_volume] if baseline is None else responses[responses["volume"] > 0]
    tuned = tuned[keys + ["volume", "response"]].rename(columns={"response": "answer"})
    if baseline is None:
        base = responses[responses["volume"] == baseline_volume][keys + ["response"]]
    else:
        keys = ["task", "prompt_id", "k"]
        base = baseline[keys + ["response"]].drop_duplicates(keys)
    out = tuned.merge(base.rename(columns={"response": "baseline_answer"}), on=keys, how="inner")
    return out.sort_values(["task", "local_model", "volume", "prompt_id", "k"]).reset_index(drop=True)


def build_requests(params, judge, responses: pd.DataFrame, references: dict, prompt: Optional[Prompt] = None,
                   baseline: Optional[pd.DataFrame] = None, baseline_name: str = BASE,
                   baseline_volume: int = BASELINE_VOLUME) -> list[tuple[dict, Optional[ChatRequest]]]:
    """Two (meta, request) per pair, order AB then BA; request None where the two answers are the same text.

    `baseline`: another model's answers to compare with (named `baseline_name`, its rows' volume
    `baseline_volume`), instead of the base model's."""
    prompt = prompt or load_pairwise_prompt(params.evaluate.pairwise_prompt)
    cfg = params.evaluate
    jobs = []
    for row in pairs(responses, baseline=baseline).itertuples():
        ref = references[row.prompt_id]
        local, base = str(row.answer or ""), str(row.baseline_answer or "")
        identical = local.strip() == base.strip()
        for order in ("AB", "BA"):
            a, b = (local, base) if order == "AB" else (base, local)
            meta = {"cycle": 1, "task": row.task, "local_model": row.local_model, "judge": judge.label, "volume": int(row.volume),
                    "baseline": baseline_name, "baseline_volume": baseline_volume, "prompt_id": row.prompt_id, "k": int(row.k), "order": order,
                    "local_position": "A" if order == "AB" else "B", "identical": identical, "prompt_version": prompt.version}
            req = None
            if not identical:
                req = ChatRequest(
                    messages=prompt.messages(instruction=ref["instruction"], reference=ref["reference"], answer_a=a, answer_b=b),
                    temperature=cfg.pairwise_temperature, top_p=1.0, max_tokens=cfg.max_new_tokens, json_schema=prompt.schema,
                    fields=(("instruction", ref["instruction"]), ("reference", ref["reference"]), ("answer_a", a), ("answer_b", b)),
                )
            jobs.append((meta, req))
    return jobs


def parse_verdict(result) -> tuple[str, Optional[str]]:
    """(verdict, reason) from a ChatResult: "A", "B", "tie", or the sentinel "error"."""
    if result is None or not getattr(result, "ok", False):
        return ERROR, None
    parsed = result.parsed
    if parsed is None and result.text:
        try:
            parsed = extract_json(result.text)
        except ValueError:
            return ERROR, None
    if not isinstance(parsed, dict):
        return ERROR, None
    winner = re.sub(r"[^a-z]", "", str(parsed.get("winner", "")).lower())
    verdict = {"a": "A", "b": "B", "tie": "tie"}.get(winner, ERROR)
    reason = parsed.get("reason")
    return verdict, (str(reason) if reason is not None else None)


def outcome(verdict: str, local_position: str) -> str:
    """The verdict from the tuned model's side: win, loss, tie or error."""
    if verdict == ERROR:
        return ERROR
    if verdict == "tie":
        return "tie"
    return "win" if verdict == local_position else "loss"


def judgement_row(meta: dict, result) -> dict:
    if meta.get("identical"):
        verdict, reason, error, raw = "tie", "identical answers: not sent to the judge", None, None
    else:
        verdict, reason = parse_verdict(result)
        raw = getattr(result, "text", None)
        error = getattr(result, "error", None)
        if verdict == ERROR and not error:
            error = f"unparsable verdict: {str(raw)[:200]}"
    return dict(meta, verdict=verdict, outcome=outcome(verdict, meta["local_position"]), valid=verdict != ERROR,
                reason=reason, error=error, raw=raw)


def _pct(part, whole) -> float:
    return 100.0 * part / whole if whole else float("nan")


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """pairwise.csv: win/tie/loss, errors and position consistency per (cycle, task, local_model, judge, volume, baseline)."""
    if rows.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    if "baseline" not in rows.columns:  # verdicts written before there was a service baseline
        rows = rows.assign(baseline=BASE)
    out = []
    for key, group in rows.groupby(GROUP):
        valid = group[group["outcome"] != ERROR]
        n_valid = len(valid)
        record = dict(zip(GROUP, key), baseline_volume=int(group["baseline_volume"].iloc[0]) if "baseline_volume" in group else BASELINE_VOLUME)
        record.update(
            pairs=int(group[["prompt_id", "k"]].drop_duplicates().shape[0]), judgements=int(len(group)),
            win=_pct((valid["outcome"] == "win").sum(), n_valid), tie=_pct((valid["outcome"] == "tie").sum(), n_valid),
            loss=_pct((valid["outcome"] == "loss").sum(), n_valid),
            errors=int(len(group) - n_valid), error_share=_pct(len(group) - n_valid, len(group)),
        )
        for part in ("win", "loss"):  # 95 % t-interval over prompts, as metrics.csv's: a prompt's K pairs in both orders are one unit
            shares = valid.assign(score=100.0 * (valid["outcome"] == part))
            record[f"{part}_ci_low"], record[f"{part}_ci_high"] = value_interval(shares, "mean", 0.025) if n_valid else (float("nan"),) * 2
        both = group.pivot_table(index=["prompt_id", "k"], columns="order", values="outcome", aggfunc="first")
        identical = group.groupby(["prompt_id", "k"])["identical"].first().reindex(both.index).fillna(False).astype(bool)
        if {"AB", "BA"} <= set(both.columns):
            complete = both[(both["AB"] != ERROR) & (both["BA"] != ERROR) & both["AB"].notna() & both["BA"].notna()]
        else:
            complete = both.iloc[0:0].assign(AB=None, BA=None)
        compared = complete[~identical.reindex(complete.index).fillna(False).astype(bool)]
        flips = (compared["AB"] != compared["BA"]).sum()
        agreed = complete["AB"].where(complete["AB"] == complete["BA"], "tie")
        differing = valid[~valid["identical"].astype(bool) & valid["verdict"].isin(["A", "B"])]
        record.update(
            compared_pairs=int(len(compared)), position_inconsistency=_pct(flips, len(compared)),
            consistent_win=_pct((agreed == "win").sum(), len(complete)), consistent_tie=_pct((agreed == "tie").sum(), len(complete)),
            consistent_loss=_pct((agreed == "loss").sum(), len(complete)),
            first_position_preference=_pct((differing["verdict"] == "A").sum(), len(differing)),
            identical_pairs=int(identical.sum()),
        )
        out.append(record)
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS).sort_values(GROUP).reset_index(drop=True)
