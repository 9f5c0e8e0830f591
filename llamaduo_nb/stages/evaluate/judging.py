"""The single-answer judging the evaluate stage does: a judge request per answer and repeat, and the row each
judgement becomes (`evaluate/<judge>.jsonl`). The deploy stage judges the served model's answers the same way."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.methods import pairwise
from llamaduo_nb.core.params import Params, ServiceParams
from llamaduo_nb.core.units import cycle_of, stage_dir
from llamaduo_nb.core.prompts import load_prompt


PAIRWISE_JSONL = pairwise.PAIRWISE_JSONL


def answer_id(local_model: str, volume, k, cycle=1) -> str:
    """An answer's id, as the answer browser shows it and a human-labels file may name it."""
    return f"{local_model}/{int(volume)}/{int(k)}" + (f"@c{int(cycle)}" if int(cycle) > 1 else "")


def judge_file(run_dir: Path | str, judge: ServiceParams) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", judge.label) + ".jsonl"
    if name == PAIRWISE_JSONL:  # a judge named "pairwise" must not overwrite the pairwise verdicts
        name = "judge_" + name
    return stage_dir(run_dir, "evaluate") / name


def build_requests(params: Params, judge: ServiceParams, responses: pd.DataFrame, references: dict, run_dir: Path | str = ".") -> list[tuple[dict, ChatRequest]]:
    prompt = load_prompt(params.evaluate.prompt)
    cfg = params.evaluate
    jobs = []
    for row in responses.itertuples():
        ref = references[row.prompt_id]
        messages = prompt.messages(instruction=ref["instruction"], reference=ref["reference"], answer=row.response)
        for m in range(cfg.m):
            req = ChatRequest(
                messages=messages, temperature=cfg.temperature, top_p=1.0, max_tokens=cfg.max_new_tokens,
                json_schema=prompt.schema, repeat=m,
                fields=(("instruction", ref["instruction"]), ("reference", ref["reference"]), ("answer", row.response)),
            )
            meta = {"cycle": cycle_of(run_dir), "task": row.task, "local_model": row.local_model, "judge": judge.label, "volume": int(row.volume),
                    "prompt_id": row.prompt_id, "k": int(row.k), "m": m, "prompt_version": prompt.version}
            jobs.append((meta, req))
    return jobs


def judgement_row(meta: dict, result) -> dict:
    row = dict(meta, valid=result.ok, error=result.error, similarity=None, precision=None,
               similarity_reason=None, precision_reason=None, raw=result.text)
    if result.ok:
        row.update(
            similarity=result.parsed["similarity_assessment"]["score"], precision=result.parsed["precision_assessment"]["score"],
            similarity_reason=result.parsed["similarity_assessment"].get("reason"),
            precision_reason=result.parsed["precision_assessment"].get("reason"),
        )
    return row
