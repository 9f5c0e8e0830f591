"""The row schemas: the files a user brings (a coverage set in No Robots' schema, a human-labels file), read where
the params load so that a bad file stops the run before anything is written (one line naming the file); and who
answered, in every answer, judgement and metrics row."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.params import TASK_CATEGORIES, Params

REQUIRED = ("prompt", "prompt_id", "messages", "category")
CATEGORY_TASKS = {v: k for k, v in TASK_CATEGORIES.items()}


def read_coverage_file(path: Path) -> list[dict]:
    if not path.exists():
        raise UserError(f"coverage.path: file not found: {path}")
    try:
        if path.suffix == ".parquet":
            return pd.read_parquet(path).to_dict("records")
        return read_jsonl(path)
    except ValueError as exc:
        raise UserError(f"{path}: not valid JSONL ({exc})") from None


def check_coverage_file(params: Params) -> None:
    """Called when params with `coverage.source: file` are loaded, so that an empty file, rows not in
    No Robots' schema, an unknown category or a test prompt also in train stop the run before anything
    is written (one line naming the file)."""
    where = params.coverage.path
    rows = read_coverage_file(Path(where))
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


LABEL_METRICS = ("similarity", "precision")


def read_human_labels(path) -> list[dict]:
    """The rows of a human-labels file (JSONL: prompt_id; answer (its text) or answer_id (as the answer browser
    shows it); similarity and/or precision, 0–100; optional rater). A bad line raises ValueError naming the file,
    the line and the field."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: cannot be read ({exc})") from None
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}: line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: not JSON ({exc.msg}); expected one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object with prompt_id, answer or answer_id, similarity and/or precision")
        if not isinstance(row.get("prompt_id"), str) or not row["prompt_id"]:
            raise ValueError(f"{where}: prompt_id: missing (the test prompt the answer belongs to)")
        if not isinstance(row.get("answer"), str) and not isinstance(row.get("answer_id"), str):
            raise ValueError(f"{where}: answer: missing; give the answer's text (answer) or its id (answer_id)")
        if not any(m in row for m in LABEL_METRICS):
            raise ValueError(f"{where}: similarity: missing; give similarity and/or precision (0–100)")
        for metric in LABEL_METRICS:
            if metric not in row or row[metric] is None:
                continue
            value = row[metric]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
                raise ValueError(f"{where}: {metric}: {value!r} is not a score within 0–100")
        if "rater" in row and row["rater"] is not None and not isinstance(row["rater"], str):
            raise ValueError(f"{where}: rater: expected text, got {row['rater']!r}")
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no labels (one JSON object per line)")
    return rows


# -- who answered ---------------------------------------------------------------------------------------------------
# The service LLM's own answers are judged like a volume's; their rows are named `service:<label>` and carry
# volume -1: the service LLM is not trained, and -1 keeps it apart from the base model's 0 and the tuned
# volumes (> 0) in every volume filter.
SERVICE_PREFIX = "service:"
SERVICE_VOLUME = -1


def service_name(label: str) -> str:
    """The `local_model` value of the service LLM's own answers."""
    return SERVICE_PREFIX + label


def is_service(local_models) -> pd.Series:
    """True where a `local_model` value names the service LLM's own answers."""
    values = local_models if isinstance(local_models, pd.Series) else pd.Series(list(local_models), dtype=object)
    return values.astype(str).str.startswith(SERVICE_PREFIX)


def with_cycle(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with an integer `cycle` column (1 where it has none: a run from before cycles)."""
    if "cycle" in frame.columns:
        return frame.assign(cycle=pd.to_numeric(frame["cycle"], errors="coerce").fillna(1).astype(int))
    return frame.assign(cycle=1)
