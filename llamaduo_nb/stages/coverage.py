"""Stage 1 · coverage: the trusted (prompt, response) pairs, split train/test per task.

Reads: the bundled set (`llamaduo_nb/data/coverage.jsonl`, written for this project in
No Robots' schema), `HuggingFaceH4/no_robots` from the Hub, or a local JSONL/parquet file.
Writes: `coverage/train.jsonl`, `coverage/test.jsonl` (rows with `task` added),
`coverage/counts.csv`, DONE.json. One unit: the split, made from the source's content, the tasks,
`coverage.*` and the seed (which shuffles a source without a split of its own).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint, fingerprint, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.core.params import BUNDLED_COVERAGE, Params
from llamaduo_nb.core.rows import read_coverage_file, split_rows, validate_rows
from llamaduo_nb.core.units import Stage, StageResult, StageRun, stage_dir

BUNDLED = BUNDLED_COVERAGE



def _from_hub(name: str, revision: str | None = None) -> list[dict]:
    from datasets import load_dataset  # heavy, and needs internet (or a filled HF cache)

    try:
        ds = load_dataset(name, revision=revision)
    except Exception as exc:  # noqa: BLE001 - any hub failure is the user's to fix
        raise UserError(f"coverage.hub_dataset: could not load '{name}' ({type(exc).__name__}: {str(exc)[:160]})") from None
    rows = []
    for split_name, split in ds.items():
        for row in split:
            row = dict(row)
            row["split"] = "test" if split_name.startswith("test") else "train"
            rows.append(row)
    return rows


def load_rows(params: Params) -> list[dict]:
    cov = params.coverage
    if cov.source == "bundled":
        rows = read_jsonl(BUNDLED)
        where = "bundled coverage set"
    elif cov.source == "file":
        rows = read_coverage_file(Path(cov.path))
        where = cov.path
    else:
        rows = _from_hub(cov.hub_dataset, cov.hub_revision)
        where = cov.hub_dataset
    if not rows:
        raise UserError(f"{where}: the coverage set is empty")
    return validate_rows(rows, where, params)


def source_fingerprint(params: Params, run_dir: Path | None = None) -> dict:
    """The coverage source's content: the bundled or given file's bytes; a Hub dataset: its name and revision."""
    cov = params.coverage
    if cov.source == "bundled":
        source = file_fingerprint(BUNDLED)
    elif cov.source == "file":
        source = file_fingerprint(cov.path) if cov.path and Path(cov.path).exists() else None
    else:
        source = f"{cov.hub_dataset}@{cov.hub_revision or 'latest'}"
    return {"source": source}


STAGE = Stage("coverage", upstream=(), depends_on=("seed", "tasks", "coverage"), reads=source_fingerprint)
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    rows = load_rows(params)
    train, test = split_rows(rows, params)
    stage.begin()
    out = stage_dir(run_dir, "coverage")
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "test.jsonl", test)
    counts = counts_frame(train, test)
    write_csv(out / "counts.csv", counts)
    return stage.finish({"train": len(train), "test": len(test), "tasks": len(params.tasks)},
                        outputs=["train.jsonl", "test.jsonl", "counts.csv"])


def counts_frame(train: list[dict], test: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame([{"task": r["task"], "split": r["split"]} for r in train + test])
    table = frame.groupby(["task", "split"]).size().unstack(fill_value=0).reset_index()
    return table[["task"] + [c for c in ("train", "test") if c in table]]


def load(run_dir: Path | str, split: str) -> list[dict]:
    return read_jsonl(stage_dir(run_dir, "coverage") / f"{split}.jsonl")


def prompts_fingerprint(prompts: list[dict]) -> str:
    """What a unit answering or judging these test prompts was made from: their ids and instructions."""
    return fingerprint([[p["prompt_id"], p["instruction"]] for p in prompts])
