"""Stage 3 · deduplicate: MinHash LSH + ROUGE-L removal of near duplicates (`methods/near_duplicates.py`).

Reads: `synthesize/pairs.jsonl` and `calls.jsonl`, the test split, and (cycle t ≥ 2) every pair kept by
earlier cycles. Writes `deduplicate/kept.jsonl`, `deduplicate/removed.jsonl` (each with its reason and
the partner it collided with), `deduplicate/funnel.csv` (per task: raw → valid → after each filter),
DONE.json. One unit: the pass, made from `deduplicate.*` and the content of everything it reads.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamaduo_nb.core.io import read_jsonl, write_csv, write_jsonl
from llamaduo_nb.methods.near_duplicates import deduplicate
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import Stage, StageResult, StageRun, cycle_folder, cycle_of, earlier_cycles, stage_dir
from llamaduo_nb.stages import coverage, synthesize


def kept_before(run_dir: Path | str) -> list[dict]:
    """Pairs kept by the deduplication of every cycle before `run_dir`'s."""
    out = []
    for cycle in range(1, cycle_of(run_dir)):
        path = stage_dir(cycle_folder(run_dir, cycle), "deduplicate") / "kept.jsonl"
        if path.exists():
            out += read_jsonl(path)
    return out


def _reads(params: Params, run_dir: Path) -> dict:
    return {"earlier_cycles": earlier_cycles(run_dir, "deduplicate")}  # a later cycle removes what earlier ones kept


STAGE = Stage("deduplicate", upstream=("coverage", "synthesize"), depends_on=("tasks", "deduplicate"), reads=_reads)
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    stage.begin()
    pairs = synthesize.load(run_dir)
    calls = read_jsonl(stage_dir(run_dir, "synthesize") / "calls.jsonl")
    test = coverage.load(run_dir, "test")
    earlier = kept_before(run_dir)  # every pair kept by an earlier cycle (none in cycle 1)
    kept, removed, funnels = [], [], []
    for task in params.tasks:
        task_pairs = [p for p in pairs if p["task"] == task]
        outcome = deduplicate(task_pairs, params.deduplicate, earlier=[p for p in earlier if p["task"] == task],
                              test_prompts=[t["instruction"] for t in test if t["task"] == task])
        kept += outcome.kept
        removed += [dict(r, task=task) for r in outcome.removed]
        task_calls = [c for c in calls if c["task"] == task]
        funnel = {"task": task, "requested": len(task_calls) * params.synthesize.pairs_per_call,
                  "valid_calls": sum(c["ok"] for c in task_calls), "calls": len(task_calls)}
        funnel.update(outcome.funnel)
        funnels.append(funnel)
    out = stage_dir(run_dir, "deduplicate")
    write_jsonl(out / "kept.jsonl", kept)
    write_jsonl(out / "removed.jsonl", removed)
    write_csv(out / "funnel.csv", pd.DataFrame(funnels))
    reasons = pd.Series([r["reason"] for r in removed], dtype=object).value_counts().to_dict()
    return stage.finish({"input": len(pairs), "kept": len(kept), "removed": len(removed), **{f"removed_{k}": int(v) for k, v in reasons.items()}},
                        outputs=["kept.jsonl", "removed.jsonl", "funnel.csv"])


def load_kept(run_dir: Path | str) -> list[dict]:
    return read_jsonl(stage_dir(run_dir, "deduplicate") / "kept.jsonl")


def load_removed(run_dir: Path | str) -> list[dict]:
    return read_jsonl(stage_dir(run_dir, "deduplicate") / "removed.jsonl")
