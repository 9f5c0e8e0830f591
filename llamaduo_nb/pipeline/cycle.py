"""The LlamaDuo cycle: after each cycle's evaluation, is the local model good enough yet?

Cycle 1 is the run folder itself. While the target (`cycle.target`, e.g. `precision coverage_50 >= 70`)
is not met by every (task, local model) at the largest volume the cycle trained, and the budget
(`cycle.max_cycles`, optionally `cycle.max_cost_usd`) is not spent, the runner runs stages 02→06
again in `cycle-<t>/`: `cycle.step` new pairs per task are synthesised (new requests, never a
repeat of an earlier cycle's), deduplicated against everything kept by earlier cycles, and one
adapter per (task, local model) is trained on all pairs kept so far. `cycles.json` at the run
folder's top records each cycle's scores and the reason the loop stopped.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llamaduo_nb.io import read_json, read_jsonl, write_csv, write_json
from llamaduo_nb.methods.metrics import is_service
from llamaduo_nb.pipeline.params import CycleTarget, Params
from llamaduo_nb.pipeline.units import cycle_folder, cycle_folders, cycle_of, read_done, root_of, stage_dir

CYCLES_JSON = "cycles.json"
SUPERSEDED = "superseded"  # later cycles of an earlier, longer loop are moved here, never deleted


def params_for_cycle(params: Params, run_dir: Path | str) -> Params:
    """The params stages 02→06 run with in `run_dir`'s cycle: cycle t ≥ 2 synthesises `cycle.step` pairs per task."""
    if cycle_of(run_dir) == 1:
        return params
    adjusted = params.model_copy(deep=True)
    adjusted.synthesize.samples_per_task = params.cycle.step or params.synthesize.samples_per_task
    return adjusted


# -- combined tables at the run folder's top ------------------------------------------------------
def publish(run_dir: Path | str, name: str, frame: pd.DataFrame) -> Path:
    """Write a cycle's table to its own folder and merge it into `<run>/<name>` (all cycles, column `cycle`).

    The rows of this cycle replace its earlier rows; rows of LATER cycles are dropped, because they
    were computed from this cycle's outputs as they were and will be rewritten when those cycles rerun.
    """
    cycle, root = cycle_of(run_dir), root_of(run_dir)
    if cycle > 1:
        write_csv(Path(run_dir) / name, frame)
    combined_path = root / name
    earlier = pd.DataFrame()
    if combined_path.exists() and combined_path.stat().st_size > 0:
        with contextlib.suppress(pd.errors.EmptyDataError):
            earlier = pd.read_csv(combined_path)
    if not earlier.empty and "cycle" in earlier.columns:
        earlier = earlier[earlier["cycle"] < cycle]
    combined = pd.concat([earlier, frame], ignore_index=True) if not earlier.empty else frame
    return write_csv(combined_path, combined)


# -- the stop rule ---------------------------------------------------------------------------------
@dataclass
class Decision:
    stop: bool
    reason: str
    scores: list = field(default_factory=list)
    met: bool = False


def with_cycle(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with an integer `cycle` column (1 where it has none: a run from before cycles)."""
    if "cycle" in frame.columns:
        return frame.assign(cycle=pd.to_numeric(frame["cycle"], errors="coerce").fillna(1).astype(int))
    return frame.assign(cycle=1)


def cycle_scores(metrics: pd.DataFrame, target: CycleTarget, judge: str | None = None) -> pd.DataFrame:
    """Per (cycle, task, local model): the metrics row of the target's metric at the cycle's largest volume,
    for the target's judge (else `judge`, else the first in metrics.csv), with `value` (the target's
    statistic), `required` (the threshold, or for a target relative to the service LLM: scale × the
    service LLM's value on that task + offset), `service` (the service LLM's value, NaN for an absolute
    target) and `met`. The service LLM's own rows are never a local model's line. The stop rule and the
    across-cycles figure both read it.

    An absolute target is met when the value reaches the threshold; a relative one when the lower bound
    of the value's 95 % CI does (the value itself for the median, which has no CI), so a local model is
    not declared as good as the service LLM on a difference the test prompts cannot resolve."""
    columns = ["cycle", "task", "local_model", "judge", "volume", "value", "required", "service", "met"]
    if target.statistic not in metrics.columns:  # e.g. coverage_50 with evaluate.zetas [40, 70]: nothing to score
        return pd.DataFrame(columns=columns)
    data = with_cycle(metrics[metrics["metric"] == target.metric])
    service_mask = is_service(data["local_model"]).to_numpy()
    judge = target.judge or judge or (data.loc[~service_mask, "judge"].iloc[0] if (~service_mask).any() else None)
    on_judge = (data["judge"] == judge).to_numpy()
    service_rows, data = data[service_mask & on_judge], data[~service_mask & on_judge]
    data = data[(data["volume"] > 0) | ~data.groupby("cycle")["volume"].transform("max").gt(0)]  # the base model only where nothing was trained
    if data.empty:
        return data.assign(value=[], required=[], service=[], met=[])
    idx = data.groupby(["cycle", "task", "local_model"], sort=False)["volume"].idxmax()
    best = data.loc[idx.to_numpy()].sort_values(["task", "local_model", "cycle"], kind="stable")
    value = best[target.statistic].astype(float)
    if not target.versus_service:
        return best.assign(value=value, required=target.threshold, service=float("nan"),
                           met=value >= target.threshold).reset_index(drop=True)
    first = service_rows.sort_values("cycle", kind="stable").drop_duplicates("task")  # answered alike in every cycle
    service = best["task"].map(first.set_index("task")[target.statistic]).astype(float)
    required = target.service_scale * service + target.service_offset
    low_column = f"{target.statistic}_ci_low"
    lower = best[low_column].astype(float).fillna(value) if low_column in best.columns else value
    return best.assign(value=value, required=required, service=service, met=(lower >= required) & required.notna()).reset_index(drop=True)


def target_scores(metrics: pd.DataFrame, params: Params, cycle: int) -> pd.DataFrame:
    """The target statistic per (task, local model) at the largest volume cycle `cycle` trained."""
    columns = ["task", "local_model", "judge", "volume", "value", "required", "met"]
    best = cycle_scores(metrics, params.cycle.target, params.judges[0].label)
    best = best[(best["cycle"] == cycle) & (best["volume"] > 0)]
    return best.assign(volume=best["volume"].astype(int), value=best["value"].astype(float).round(2),
                       required=best["required"].astype(float).round(2), met=best["met"].astype(bool))[columns].reset_index(drop=True)


def no_new_pairs(cycle: int, new_pairs: dict | None) -> str | None:
    """Why a later cycle cannot help, when its deduplication kept nothing new (None otherwise)."""
    if new_pairs is not None and cycle > 1 and sum(new_pairs.values()) == 0:
        return f"cycle {cycle} kept no new pairs after deduplication"
    return None


def decide(params: Params, cycle: int, metrics: pd.DataFrame, cost_usd: float = 0.0, new_pairs: dict | None = None) -> Decision:
    """Stop after cycle `cycle`, or go on? The reason is a sentence a researcher can put in a log."""
    cfg = params.cycle
    scores = target_scores(metrics, params, cycle)
    records = scores.to_dict("records")
    versus = cfg.target.versus_service
    shown = ", ".join(f"{r['task']}/{r['local_model']} {r['value']:g} at {r['volume']}"
                      + (f" (needs CI lower bound ≥ {r['required']:g})" if versus else "") for r in records)
    if scores.empty and cfg.target.statistic not in metrics.columns:
        return Decision(True, f"the target's statistic {cfg.target.statistic} is not reported (evaluate.zetas); no further cycles", records)
    if versus and not scores.empty and scores["required"].isna().all():
        return Decision(True, f"the target {cfg.target} needs the service LLM's own judged answers, and cycle {cycle} has none; "
                              "no further cycles", records)
    if scores.empty:
        return Decision(True, f"cycle {cycle} has no {cfg.target.metric} scores to compare with the target {cfg.target}", records)
    if bool(scores["met"].all()):
        return Decision(True, f"target met in cycle {cycle}: {cfg.target} ({shown})", records, met=True)
    missing = f"target {cfg.target} not met in cycle {cycle} ({shown})"
    if stalled := no_new_pairs(cycle, new_pairs):
        return Decision(True, f"{missing}; {stalled}, so another cycle would not help", records)
    if cycle >= cfg.max_cycles:
        return Decision(True, f"{missing}; cycle budget spent (cycle.max_cycles = {cfg.max_cycles})", records)
    if cfg.max_cost_usd is not None and cost_usd >= cfg.max_cost_usd:
        return Decision(True, f"{missing}; cost budget spent (${cost_usd:,.2f} of cycle.max_cost_usd ${cfg.max_cost_usd:,.2f})", records)
    step = cfg.step or params.synthesize.samples_per_task
    return Decision(False, f"{missing}; cycle {cycle + 1} synthesises {step} more pairs per task", records)


# -- bookkeeping -------------------------------------------------------------------------------------
def cycle_cost(folder: Path | str) -> float:
    path = Path(folder) / "manifest.json"
    if not path.exists():
        return 0.0
    return float((read_json(path).get("llm_totals") or {}).get("cost_usd") or 0.0)


def run_spend(run_dir: Path | str) -> float:
    """What the run has paid the service LLMs so far, as the stop rule weighs it against cycle.max_cost_usd: the
    response cache's spend ledger (every paid answer, whichever stage, cycle or re-run paid it, including a stage
    stopped at a cap), or the stages' recorded costs for a run folder from before the ledger."""
    from llamaduo_nb.llm.cache import recorded_spend

    root = root_of(run_dir)
    recorded = sum(cycle_cost(folder) for _, folder in cycle_folders(root))
    return max(recorded, recorded_spend(root / "cache" / "llm.sqlite"))


def pair_counts(folder: Path | str) -> dict:
    """New pairs kept by this cycle's deduplication, per task."""
    done = read_done(folder, "deduplicate")
    path = stage_dir(folder, "deduplicate") / "kept.jsonl"
    if not done or not path.exists():
        return {}
    return pd.Series([p["task"] for p in read_jsonl(path)], dtype=object).value_counts().to_dict()


def record(params: Params, run_dir: Path | str, decisions: list[tuple[int, Decision]], stopped: bool) -> Path:
    """cycles.json: target, per-cycle scores, new and total kept pairs, cost, and why the loop stopped."""
    root = root_of(run_dir)
    cycles, totals, spent = [], {}, 0.0
    for cycle, decision in decisions:
        folder = cycle_folder(root, cycle)
        new = pair_counts(folder)
        totals = {task: totals.get(task, 0) + new.get(task, 0) for task in set(totals) | set(new)}
        cost = cycle_cost(folder)
        spent += cost
        cycles.append({"cycle": cycle, "folder": "." if cycle == 1 else folder.name, "scores": decision.scores, "met": decision.met,
                       "new_pairs": new, "kept_pairs_total": dict(sorted(totals.items())), "cost_usd": round(cost, 6)})
    last = decisions[-1][1] if decisions else None
    body = {
        "target": str(params.cycle.target), "target_fields": params.cycle.target.model_dump(), "max_cycles": params.cycle.max_cycles,
        "step": params.cycle.step or params.synthesize.samples_per_task, "cycles": cycles, "cost_usd": round(spent, 6),
        "stopped": stopped, "stop_reason": last.reason if (last and stopped) else None,
        "next": None if (stopped or not last) else last.reason,
    }
    path = root / CYCLES_JSON
    if path.exists() and read_json(path) == json.loads(json.dumps(body)):
        return path  # unchanged: a re-run that did nothing leaves the file as it was
    return write_json(path, body)


def retire_later_cycles(run_dir: Path | str, last_cycle: int) -> list[Path]:
    """Folders of cycles after `last_cycle` (left by an earlier, longer loop) move to `superseded/`."""
    root = root_of(run_dir)
    moved = []
    for cycle, folder in cycle_folders(root):
        if cycle > last_cycle:
            target = root / SUPERSEDED / f"{folder.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            target.parent.mkdir(exist_ok=True)
            shutil.move(str(folder), str(target))
            moved.append(target)
    for name in ("metrics.csv", "pairwise.csv"):
        path = root / name
        if moved and path.exists() and path.stat().st_size > 0:
            frame = pd.read_csv(path)
            if "cycle" in frame.columns:
                write_csv(path, frame[frame["cycle"] <= last_cycle])
    return moved

