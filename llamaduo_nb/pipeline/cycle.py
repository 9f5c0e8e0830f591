"""The LlamaDuo cycle: after each cycle's evaluation, is the local model good enough yet?

Cycle 1 is the run folder itself. While the target (`cycle.target`, e.g. `precision mean >= service - 5`)
is not met by every (task, local model) at the largest volume trained so far (the verdict of
`methods/verdict.py`, the one the report and deploy use), and the budget
(`cycle.max_cycles`, optionally `cycle.max_cost_usd`) is not spent, the runner runs stages 02→06
again in `cycle-<t>/`: `cycle.step` new pairs per task are synthesised (new requests, never a
repeat of an earlier cycle's), deduplicated against everything kept by earlier cycles, and one
adapter per (task, local model) is trained on all pairs kept so far. `cycles.json` at the run
folder's top records each cycle's scores and the reason the loop stopped.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.io import read_json, read_jsonl, write_csv, write_json
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.rows import with_cycle
from llamaduo_nb.core.units import CYCLES_JSON, cycle_folder, cycle_folders, cycle_of, read_done, root_of, stage_dir
from llamaduo_nb.methods import verdict
from llamaduo_nb.stages import evaluate
from llamaduo_nb.pipeline import search
from llamaduo_nb.llm.cache import recorded_spend

SUPERSEDED = "superseded"  # later cycles of an earlier, longer loop are moved here, never deleted


def params_for_cycle(params: Params, run_dir: Path | str) -> Params:
    """The params stages 02→06 run with in `run_dir`'s cycle: cycle t ≥ 2 synthesises `cycle.step` pairs per task;
    in cycle 1 of a volume search, the volumes it has reached and the data they need (pipeline/search.py)."""
    if cycle_of(run_dir) == 1:
        if params.finetune.search:
            return search.params_for_step(params, search.tried(params, run_dir))
        return params
    adjusted = params.model_copy(deep=True)
    adjusted.synthesize.samples_per_task = params.cycle.step or params.synthesize.samples_per_task
    return adjusted


# -- combined tables at the run folder's top ------------------------------------------------------
def publish_run_tables(run_dir: Path | str) -> list[Path]:
    """`<run>/metrics.csv` and `<run>/pairwise.csv`: every cycle's evaluate tables in one (column `cycle`), for the
    researcher. Written after each evaluate by the runner or the notebook; the stages read each cycle's own tables."""
    written, root = [], root_of(run_dir)
    for name, table in (("metrics.csv", evaluate.load_metrics(root)), ("pairwise.csv", evaluate.load_pairwise(root))):
        path = root / name
        if len(table):
            if not (path.exists() and path.read_text() == table.to_csv(index=False)):  # a run that changed nothing writes nothing
                write_csv(path, table)
            written.append(path)
        elif path.exists():
            path.unlink()
    return written


# -- the stop rule ---------------------------------------------------------------------------------
@dataclass
class Decision:
    stop: bool
    reason: str
    scores: list = field(default_factory=list)
    met: bool = False
    short: str = ""  # the reason without the verdict sentences (a figure's title); empty: the reason is short already


SCORE_FIELDS = ["cycle", "task", "local_model", "judge", "volume", "outcome", "passed", "estimate", "low", "high", "bound", "prompts",
                "failed_local", "failed_service"]


def _record(row: dict) -> dict:
    out = {}
    for key in SCORE_FIELDS:
        value = row.get(key)
        if isinstance(value, float):
            value = None if value != value else round(value, 3)
        elif hasattr(value, "item"):
            value = value.item()
        out[key] = value
    return out


def no_new_pairs(cycle: int, new_pairs: dict | None) -> str | None:
    """Why a later cycle cannot help, when its deduplication kept nothing new (None otherwise)."""
    if new_pairs is not None and cycle > 1 and sum(new_pairs.values()) == 0:
        return f"cycle {cycle} kept no new pairs after deduplication"
    return None


def decide(params: Params, cycle: int, verdicts: pd.DataFrame, cost_usd: float = 0.0, new_pairs: dict | None = None) -> Decision:
    """Stop after cycle `cycle`, or go on? `verdicts`: `verdict.verdict_table` of the cells of cycles ≤ `cycle`. The
    target is met when, for every (task, local model), the fixed sequence finds a volume (its largest passes). The
    reason is the verdict's own sentences, a researcher can put them in a log."""
    cfg = params.cycle
    rule = evaluate.verdict_rule(params)
    table = with_cycle(verdicts)[lambda f: f["cycle"] <= cycle] if len(verdicts) else verdicts
    records = [_record(r) for r in verdict.cycle_verdicts(table).to_dict("records") if r["cycle"] == cycle] if len(table) else []
    if table.empty:
        return Decision(True, f"cycle {cycle} has no {cfg.target.metric} scores to decide the target {cfg.target}", records)
    found = verdict.summary(table)
    shown = " ".join(verdict.sentence(r, rule, params.service.label) for r in found.to_dict("records"))
    if rule.versus_service and (found["outcome"] == verdict.UNDECIDED).all() and found["reason"].astype(str).str.contains("service").all():
        return Decision(True, f"the target {cfg.target} needs the service LLM's own judged answers, and cycle {cycle} has none; "
                              "no further cycles", records)
    if bool(found["found"].all()):
        return Decision(True, f"target met in cycle {cycle}: {shown}", records, met=True, short=f"target met in cycle {cycle}")
    missing = f"target {cfg.target} not met in cycle {cycle}"

    def decision(stop: bool, tail: str) -> Decision:
        return Decision(stop, f"{missing}: {shown} {tail}", records, short=f"{missing}; {tail[0].lower()}{tail[1:]}")

    if stalled := no_new_pairs(cycle, new_pairs):
        return decision(True, f"{stalled[0].upper()}{stalled[1:]}, so another cycle would not help")
    if cycle >= cfg.max_cycles:
        return decision(True, f"Cycle budget spent (cycle.max_cycles = {cfg.max_cycles})")
    if cfg.max_cost_usd is not None and cost_usd >= cfg.max_cost_usd:
        return decision(True, f"Cost budget spent (${cost_usd:,.2f} of cycle.max_cost_usd ${cfg.max_cost_usd:,.2f})")
    step = cfg.step or params.synthesize.samples_per_task
    return decision(False, f"Cycle {cycle + 1} synthesises {step} more pairs per task")


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
        "target": str(params.cycle.target), "target_fields": params.cycle.target.model_dump(), "rule": verdict.rule_line(evaluate.verdict_rule(params)),
        "max_cycles": params.cycle.max_cycles,
        "step": params.cycle.step or params.synthesize.samples_per_task, "cycles": cycles, "cost_usd": round(spent, 6),
        "stopped": stopped, "stop_reason": last.reason if (last and stopped) else None,
        "stop_short": (last.short or last.reason) if (last and stopped) else None,
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
    if moved:
        publish_run_tables(root)
    return moved

