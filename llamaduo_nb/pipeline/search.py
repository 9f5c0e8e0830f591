"""The volume search (`finetune.volumes: search`): the smallest data volume whose verdict against the service LLM
is "not worse", without training every volume of the grid.

**Order: smallest first.** Each step trains the next volume of the grid for every (task, local model) not yet
decided, then judges it. Volumes double, so training v_1 < … < v_j costs less than 2 v_j: the search costs at most
twice what training only the answer would (a bisection trains a middle volume first and pays for large volumes even
when a small one suffices; the fixed sequence of the sweep needs the largest volume first). Its wall time grows with
the number of volumes tried, one step each.

**Error.** `methods/verdict.py`'s search rule: every look at α / L, L being every look the search could make (the
base model, each grid volume, each later cycle); the chosen volume is worse than the target with probability ≤ α
(Bonferroni), whatever the shape of the score curve and the correlation of looks that share the test prompts.

**Data on demand.** A task's synthesis target follows the largest volume it has reached, at the params' own ratio of
`synthesize.samples_per_task` to the largest grid volume (the headroom chosen for deduplication's losses): the
requests of earlier steps are answered again by the response cache, and a volume's pairs are a prefix that later
data does not change (`finetune.training_order`), so every adapter trained at an earlier step is reused.

State: `<run>/search.json`: the grid, the volumes tried per task, each step's verdicts, the choice, the training time
spent against a full sweep's; written after every step, so an interrupted search resumes where it stood.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.io import read_json, read_jsonl, write_json
from llamaduo_nb.methods import verdict
from llamaduo_nb.core.models import short_name
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import SEARCH_JSON, root_of, stage_dir

FOUND, EXHAUSTED, CANNOT_DECIDE, GOING_ON = "found", "grid exhausted", "cannot decide", "going on"


def state(run_dir: Path | str) -> dict:
    path = root_of(run_dir) / SEARCH_JSON
    return read_json(path) if path.exists() else {}


def tried(params: Params, run_dir: Path | str) -> dict[str, list[int]]:
    """The volumes each task has reached: search.json's, else the grid's smallest."""
    current = state(run_dir).get("tried") or {}
    first = params.finetune.volumes[0]
    return {task: sorted(int(v) for v in current.get(task, [first])) for task in params.tasks}


def synthesis_target(params: Params, volume: int) -> int:
    """Valid pairs to synthesise for a task whose largest volume is `volume`."""
    ratio = params.synthesize.samples_per_task / max(params.finetune.volumes)
    return max(int(volume), math.ceil(volume * ratio))


def params_for_step(params: Params, volumes: dict[str, list[int]]) -> Params:
    """The params cycle 1's stages run with at a step: each task's volumes so far and the data they need."""
    adjusted = params.model_copy(deep=True)
    adjusted.finetune.volumes_by_task = {task: sorted(v) for task, v in volumes.items()}
    adjusted.synthesize.samples_by_task = {task: synthesis_target(params, max(v)) for task, v in volumes.items()}
    return adjusted


@dataclass
class Step:
    tried: dict[str, list[int]]
    next: dict[str, list[int]]
    cells: list[dict] = field(default_factory=list)  # per (task, local model): status, volume, verdict

    @property
    def done(self) -> bool:
        return self.next == self.tried

    def line(self) -> str:
        parts = []
        for cell in self.cells:
            head = f"{cell['task']} · {cell['local_model']}"
            if cell["status"] == FOUND:
                parts.append(f"{head}: volume {cell['volume']} is not worse ({cell['interval']})")
            elif cell["status"] == GOING_ON:
                parts.append(f"{head}: not shown up to volume {cell['volume']} ({cell['interval']}); next {cell['next_volume']}")
            else:
                parts.append(f"{head}: {cell['status']} at volume {cell['volume']} ({cell['interval']})")
        return "; ".join(parts)


def next_step(params: Params, verdicts: pd.DataFrame, volumes: dict[str, list[int]]) -> Step:
    """After judging the volumes tried so far: per (task, local model), the volume found, or the next one to try."""
    grid = list(params.finetune.volumes)
    first_cycle = verdicts[verdicts["cycle"] == 1] if len(verdicts) else verdicts
    cells, going = [], {task: False for task in params.tasks}
    nexts: dict[str, int | None] = {}
    for task in params.tasks:
        for model_ref in params.finetune.base_models:
            model = short_name(model_ref)
            rows = first_cycle[(first_cycle["task"] == task) & (first_cycle["local_model"] == model)] if len(first_cycle) else first_cycle
            largest = max(volumes[task])
            cell = {"task": task, "local_model": model, "tried": sorted(volumes[task])}
            chosen = rows[rows["chosen"]] if len(rows) else rows
            if len(chosen):
                row = chosen.iloc[0]
                cell.update(status=FOUND, volume=int(row["volume"]), interval=_interval(row))
            elif not len(rows):
                cell.update(status=CANNOT_DECIDE, volume=largest, interval="no judged answers")
            else:
                row = rows.sort_values("volume").iloc[-1]
                later = [v for v in grid if v > largest]
                hopeless = row["outcome"] == verdict.UNDECIDED and (int(row["prompts"]) < 2 or "service" in str(row["reason"]))
                if hopeless:  # more training data cannot give an interval that too few prompts (or no service answers) lack
                    cell.update(status=CANNOT_DECIDE, volume=int(row["volume"]), interval=_interval(row))
                elif not later:
                    cell.update(status=EXHAUSTED, volume=int(row["volume"]), interval=_interval(row))
                else:
                    cell.update(status=GOING_ON, volume=int(row["volume"]), interval=_interval(row), next_volume=later[0])
                    going[task] = True
                    nexts[task] = later[0]
            cells.append(cell)
    following = {task: sorted(set(v) | ({nexts[task]} if going[task] else set())) for task, v in volumes.items()}
    return Step({t: sorted(v) for t, v in volumes.items()}, following, cells)


def _interval(row) -> str:
    if row["outcome"] == verdict.UNDECIDED:
        return f"no interval: {row['reason']}"
    return f"{row['estimate']:+.1f} [{100 * float(row['level']):.3g}% CI {row['low']:+.1f}, {row['high']:+.1f}], {row['outcome']}"


# -- what it cost, against the full sweep --------------------------------------------------------------------------
def accounting(params: Params, run_dir: Path | str) -> dict:
    """Adapters trained and training seconds (measured, finetune/runs.csv) against the full sweep's (the untrained
    volumes at the measured seconds per training sample), and synthesis calls against what the sweep's target needs at
    the expected yield (`synthesize.pairs_per_call`, `expected_loss`)."""
    root = root_of(run_dir)
    runs_path = stage_dir(root, "finetune") / "runs.csv"
    runs = pd.read_csv(runs_path) if runs_path.exists() else pd.DataFrame(columns=["task", "local_model", "volume", "n_train", "seconds"])
    runs = runs[runs["volume"] > 0]
    seconds = float(runs["seconds"].sum()) if len(runs) else 0.0
    samples = float(runs["n_train"].sum()) if len(runs) else 0.0
    per_sample = seconds / samples if samples else float("nan")
    grid = list(params.finetune.volumes)
    sweep_seconds = 0.0
    for task in params.tasks:
        for model_ref in params.finetune.base_models:
            done = runs[(runs["task"] == task) & (runs["local_model"] == short_name(model_ref))]
            trained = {int(v): float(s) for v, s in zip(done["volume"], done["seconds"])}
            sweep_seconds += sum(trained.get(v, v * per_sample) for v in grid)
    cfg = params.synthesize
    calls_path = stage_dir(root, "synthesize") / "calls.jsonl"
    calls = len(read_jsonl(calls_path)) if calls_path.exists() else 0
    sweep_calls = len(params.tasks) * math.ceil(cfg.samples_per_task / (cfg.pairs_per_call * (1 - cfg.expected_loss)))
    return {"adapters": int(len(runs)), "sweep_adapters": len(params.tasks) * len(params.finetune.base_models) * len(grid),
            "training_seconds": round(seconds, 1), "sweep_training_seconds": round(sweep_seconds, 1),
            "synthesis_calls": calls, "sweep_synthesis_calls": sweep_calls}


def record(params: Params, run_dir: Path | str, step: Step, rule: verdict.Rule) -> Path:
    """search.json after a step: the volumes to train next (the ones tried, when the search is done)."""
    root = root_of(run_dir)
    earlier = [s for s in state(root).get("steps", []) if s["tried"] != step.tried]
    steps = sorted(earlier + [{"tried": step.tried, "cells": step.cells}], key=lambda s: sum(len(v) for v in s["tried"].values()))
    body = {"grid": list(params.finetune.volumes), "rule": verdict.rule_line(rule), "looks": rule.looks,
            "alpha_per_look": rule.test_alpha, "tried": step.next, "steps": steps, "done": step.done,
            "cells": step.cells if step.done else [], **(accounting(params, root) if step.done else {})}
    body["summary"] = summary_lines(body)  # what the report shows
    return write_json(root / SEARCH_JSON, body)


def summary_lines(body: dict) -> list[str]:
    """The search in a few lines: per (task, local model) the volume found and the volumes tried; the cost saved."""
    if not body.get("done"):
        return []
    lines = []
    for cell in body["cells"]:
        tried_text = ", ".join(str(v) for v in cell["tried"])
        what = {FOUND: f"volume {cell['volume']} found", EXHAUSTED: "no volume of the grid shown not worse",
                CANNOT_DECIDE: "could not decide"}.get(cell["status"], cell["status"])
        lines.append(f"{cell['task']} · {cell['local_model']}: {what} ({cell['interval']}); volumes tried: {tried_text}")
    if "adapters" in body:
        share = body["training_seconds"] / body["sweep_training_seconds"] if body["sweep_training_seconds"] else float("nan")
        lines.append(f"cost: {body['adapters']} adapter{'s' if body['adapters'] != 1 else ''} and {body['training_seconds']:,.0f} s of training, against a full "
                     f"sweep's {body['sweep_adapters']} adapters and ≈ {body['sweep_training_seconds']:,.0f} s ({share:.0%}); "
                     f"{body['synthesis_calls']:,} synthesis calls against the ≈ {body['sweep_synthesis_calls']:,} the sweep's target needs")
    return lines
