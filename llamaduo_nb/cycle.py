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

from .io import read_json, read_jsonl, write_csv, write_json
from .params import Params
from .stage import cycle_folder, cycle_folders, cycle_of, read_done, root_of, stage_dir

CYCLES_JSON = "cycles.json"
SUPERSEDED = "superseded"  # later cycles of an earlier, longer loop are moved here, never deleted


def params_for_cycle(params: Params, run_dir: Path | str) -> Params:
    """The params stages 02→06 run with in `run_dir`'s cycle: cycle t ≥ 2 synthesises `cycle.step` pairs per task."""
    if cycle_of(run_dir) == 1:
        return params
    adjusted = params.model_copy(deep=True)
    adjusted.synthesize.samples_per_task = params.cycle.step or params.synthesize.samples_per_task
    return adjusted


def kept_before(run_dir: Path | str) -> list[dict]:
    """Pairs kept by the deduplication of every cycle before `run_dir`'s."""
    out = []
    for cycle in range(1, cycle_of(run_dir)):
        path = stage_dir(cycle_folder(run_dir, cycle), "deduplicate") / "kept.jsonl"
        if path.exists():
            out += read_jsonl(path)
    return out


def earlier_dedup_ids(run_dir: Path | str) -> list:
    """Completion ids of earlier cycles' deduplication: a stage that reads them is redone when they change."""
    return [(read_done(cycle_folder(run_dir, c), "deduplicate") or {}).get("completion_id") for c in range(1, cycle_of(run_dir))]


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


def target_scores(metrics: pd.DataFrame, params: Params, cycle: int) -> pd.DataFrame:
    """The target statistic per (task, local model) at the largest volume cycle `cycle` trained."""
    target = params.cycle.target
    judge = target.judge or params.judges[0].label
    columns = ["task", "local_model", "judge", "volume", "value", "met"]
    if metrics.empty or target.statistic not in metrics.columns:
        return pd.DataFrame(columns=columns)
    rows = metrics[(metrics["cycle"] == cycle) & (metrics["metric"] == target.metric) & (metrics["judge"] == judge) & (metrics["volume"] > 0)]
    out = []
    for (task, model), group in rows.groupby(["task", "local_model"], sort=False):
        largest = group.loc[group["volume"].idxmax()]
        value = float(largest[target.statistic])
        out.append({"task": task, "local_model": model, "judge": judge, "volume": int(largest["volume"]),
                    "value": round(value, 2), "met": bool(value >= target.threshold)})
    return pd.DataFrame(out, columns=columns)


def decide(params: Params, cycle: int, metrics: pd.DataFrame, cost_usd: float = 0.0, new_pairs: dict | None = None) -> Decision:
    """Stop after cycle `cycle`, or go on? The reason is a sentence a researcher can put in a log."""
    cfg = params.cycle
    scores = target_scores(metrics, params, cycle)
    records = scores.to_dict("records")
    shown = ", ".join(f"{r['task']}/{r['local_model']} {r['value']:g} at {r['volume']}" for r in records)
    if scores.empty and cfg.target.statistic not in metrics.columns:
        return Decision(True, f"the target's statistic {cfg.target.statistic} is not reported (evaluate.zetas); no further cycles", records)
    if scores.empty:
        return Decision(True, f"cycle {cycle} has no {cfg.target.metric} scores to compare with the target {cfg.target}", records)
    if bool(scores["met"].all()):
        return Decision(True, f"target met in cycle {cycle}: {cfg.target} ({shown})", records, met=True)
    missing = f"target {cfg.target} not met in cycle {cycle} ({shown})"
    if new_pairs is not None and cycle > 1 and sum(new_pairs.values()) == 0:
        return Decision(True, f"{missing}; cycle {cycle} kept no new pairs after deduplication, so another cycle would not help", records)
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


def load_cycles(run_dir: Path | str) -> dict:
    path = root_of(run_dir) / CYCLES_JSON
    return read_json(path) if path.exists() else {}
