"""Stage 1 · coverage: the trusted (prompt, response) pairs, split train/test per task.

Reads: the bundled set (`llamaduo_nb/data/coverage.jsonl`, written for this project in
No Robots' schema), `HuggingFaceH4/no_robots` from the Hub, or a local JSONL/parquet file.
Writes: `coverage/train.jsonl`, `coverage/test.jsonl` (rows with `task` added),
`coverage/counts.csv`, DONE.json. One unit: the split, made from the source's content, the tasks,
`coverage.*` and the seed (which shuffles a source without a split of its own).
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from llamaduo_nb.errors import UserError
from llamaduo_nb.io import fingerprint, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.pipeline.params import BUNDLED_COVERAGE, TASK_CATEGORIES, Params
from llamaduo_nb.pipeline.units import StageResult, StageRun, stage_dir

BUNDLED = BUNDLED_COVERAGE
REQUIRED = ("prompt", "prompt_id", "messages", "category")
CATEGORY_TASKS = {v: k for k, v in TASK_CATEGORIES.items()}


def _read_file(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"coverage.path: file not found: {path}")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
        return read_jsonl(path)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSONL ({exc})") from None


def _from_hub(name: str) -> list[dict]:
    from datasets import load_dataset  # needs internet (or a filled HF cache)

    try:
        ds = load_dataset(name)
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
        rows = _read_file(Path(cov.path))
        where = cov.path
    else:
        rows = _from_hub(cov.hub_dataset)
        where = cov.hub_dataset
    if not rows:
        raise UserError(f"{where}: the coverage set is empty")
    return validate_rows(rows, where, params)


def check_file(params: Params) -> None:
    """Called when params with `coverage.source: file` are loaded, so that an empty file, rows not in
    No Robots' schema, an unknown category or a test prompt also in train stop the run before anything
    is written (one line naming the file)."""
    where = params.coverage.path
    rows = _read_file(Path(where))
    if not rows:
        raise UserError(f"{where}: the coverage set is empty")
    try:
        split_rows(validate_rows(rows, where, params), params)
    except UserError as exc:
        message = str(exc)
        raise UserError(message if message.startswith(where) else f"{where}: {message}") from None


def validate_rows(rows: list[dict], where: str, params: Params) -> list[dict]:
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise UserError(f"{where}: row {i + 1}: not an object (expected No Robots' schema: {', '.join(REQUIRED)})")
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise UserError(f"{where}: row {i + 1}: missing {', '.join(missing)} (expected No Robots' schema: {', '.join(REQUIRED)})")
        messages = list(row["messages"]) if not isinstance(row["messages"], (str, bytes, dict)) else [None]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
            raise UserError(f"{where}: row {i + 1}: messages must be a list of {{role, content}} objects")
        roles = [m.get("role") for m in messages]
        if "user" not in roles or "assistant" not in roles:
            raise UserError(f"{where}: row {i + 1}: messages need a user and an assistant turn")
        if row["category"] not in CATEGORY_TASKS and row["category"] not in ("Generation", "Brainstorm", "Rewrite", "Chat", "Open QA", "Extract", "Other"):
            raise UserError(f"{where}: row {i + 1}: category '{row['category']}' is not a No Robots category")
        user = next(m["content"] for m in messages if m["role"] == "user")
        assistant = next(m["content"] for m in messages if m["role"] == "assistant")
        out.append({
            "prompt": row["prompt"], "prompt_id": row["prompt_id"], "category": row["category"],
            "task": CATEGORY_TASKS.get(row["category"]), "split": row.get("split"),
            "instruction": user, "reference": assistant,
            "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        })
    return out


def split_rows(rows: list[dict], params: Params) -> tuple[list[dict], list[dict]]:
    wanted = [r for r in rows if r["task"] in params.tasks]
    missing = [t for t in params.tasks if not any(r["task"] == t for r in wanted)]
    if missing:
        raise UserError(f"tasks: no coverage examples for {', '.join(missing)} (category {', '.join(TASK_CATEGORIES[t] for t in missing)})")
    train, test = [], []
    for task in params.tasks:
        rows_t = [r for r in wanted if r["task"] == task]
        if all(r.get("split") in ("train", "test") for r in rows_t):
            tr = [r for r in rows_t if r["split"] == "train"]
            te = [r for r in rows_t if r["split"] == "test"]
        else:
            shuffled = sorted(rows_t, key=lambda r: r["prompt_id"])
            random.Random(params.seed).shuffle(shuffled)
            n_test = max(1, round(len(shuffled) * params.coverage.test_fraction))
            te, tr = shuffled[:n_test], shuffled[n_test:]
        if params.coverage.max_test_prompts:
            te = te[: params.coverage.max_test_prompts]
        if not tr or not te:
            raise UserError(f"coverage: task {task} needs at least one train and one test example (has {len(tr)} / {len(te)})")
        train += [dict(r, split="train") for r in tr]
        test += [dict(r, split="test") for r in te]
    overlap = {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}
    train_prompts = {t["instruction"] for t in train}
    overlap |= {r["prompt_id"] for r in test if r["instruction"] in train_prompts}  # same prompt, other id
    if overlap:
        raise UserError(f"coverage: {len(overlap)} prompt(s) are in both the train and the test split (e.g. prompt_id {sorted(overlap)[0][:12]}…)")
    return train, test


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("coverage", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
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
