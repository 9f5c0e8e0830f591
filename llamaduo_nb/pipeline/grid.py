"""The grid's cells (task × local model × volume) and `--only`, which redoes some of them."""

from __future__ import annotations

import contextlib
from pathlib import Path

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.models import short_name
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import done_path, stage_dir


def parse_only(text: str, params: Params) -> list[tuple[str, str, int]]:
    """`task=coding,volume=4096[,model=gemma-2b-it]` → the (task, model, volume) cells it names.

    A key may list several values with `|` (`task=coding|closed_qa`); an absent key means all."""
    grid = {"task": list(params.tasks), "model": [short_name(m) for m in params.finetune.base_models],
            "volume": [str(v) for v in params.finetune.volumes]}
    chosen = dict(grid)
    for item in [i.strip() for i in text.split(",") if i.strip()]:
        key, _, values = item.partition("=")
        key = key.strip()
        if key not in grid or not values:
            raise UserError(f"--only {text}: expected key=value with key one of {', '.join(grid)} (e.g. task=coding,volume=4096)")
        wanted = [v.strip() for v in values.split("|")]
        unknown = [v for v in wanted if v not in grid[key]]
        if unknown:
            raise UserError(f"--only {text}: {key} {', '.join(unknown)} is not in the grid ({key}s: {', '.join(grid[key])})")
        chosen[key] = wanted
    return [(t, m, int(v)) for t in chosen["task"] for m in chosen["model"] for v in chosen["volume"]]


def redo_cells(run_dir: Path, cells: list[tuple[str, str, int]], log) -> int:
    """Discard the unit records of the named cells' adapters and answers, and the DONE.json of the stages
    that hold them: those units are redone, every other is reused (and the judge's cache answers
    unchanged answers for free)."""
    discarded = 0
    for task, model, volume in cells:
        adapter = stage_dir(run_dir, "finetune") / task / model / str(volume) / "UNIT.json"
        answers = stage_dir(run_dir, "infer") / task / model / f"{volume}.jsonl.unit.json"
        for record in (adapter, answers):
            if record.exists():
                record.unlink()
                discarded += 1
    for stage in ("finetune", "infer", "evaluate", "report"):
        with contextlib.suppress(FileNotFoundError):
            done_path(run_dir, stage).unlink()
    log(f"--only: {len(cells)} cell(s) to redo: " + ", ".join(f"{t}/{m}/{v}" for t, m, v in cells))
    return discarded
