"""Stage 6 · evaluate: the service LLM judges every answer M times, then aggregation.

Reads: `coverage/test.jsonl`, `responses/`. Writes: `judgements/<judge>.jsonl` (one row per
judgement: scores, reasons, raw JSON, valid flag or error), `metrics.csv` at the run folder's
top, DONE.json. Judge prompt: `params/prompts/judge.yaml` (the reference's JSON contract).
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from . import coverage, infer
from .io import read_jsonl, write_csv, write_jsonl
from .llm import cache_for
from .llm.base import ChatRequest
from .llm.client import ServiceLLM
from .metrics import aggregate
from .params import Params, ServiceParams
from .prompts import load_prompt
from .stage import StageResult, StageRun, stage_dir


def judge_file(run_dir: Path | str, judge: ServiceParams) -> Path:
    return stage_dir(run_dir, "evaluate") / (re.sub(r"[^A-Za-z0-9._-]+", "_", judge.label) + ".jsonl")


def build_requests(params: Params, judge: ServiceParams, responses: pd.DataFrame, references: dict) -> list[tuple[dict, ChatRequest]]:
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
                judge_inputs=(ref["instruction"], ref["reference"], row.response) if judge.backend == "local" else (),
            )
            meta = {"cycle": 1, "task": row.task, "local_model": row.local_model, "judge": judge.label, "volume": int(row.volume),
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


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("evaluate", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    stage.begin()
    references = {r["prompt_id"]: r for r in coverage.load(run_dir, "test")}
    responses = infer.load_responses(run_dir)
    accounting, frames = {}, []
    for judge in params.judges:
        jobs = build_requests(params, judge, responses, references)
        service = ServiceLLM(judge, cache_for(run_dir))
        results = service.run([req for _, req in jobs], desc=f"judge ×{params.evaluate.m}")
        rows = [judgement_row(meta, res) for (meta, _), res in zip(jobs, results)]
        write_jsonl(judge_file(run_dir, judge), rows)
        accounting[judge.label] = service.accounting.as_dict()
        frames.append(pd.DataFrame(rows))
    judgements = pd.concat(frames, ignore_index=True)
    metrics = aggregate(judgements, params.evaluate.zetas)
    write_csv(Path(run_dir) / "metrics.csv", metrics)
    return stage.finish(
        {"judgements": len(judgements), "invalid": int((~judgements["valid"]).sum()), "answers": len(responses), "metric_rows": len(metrics)},
        llm=accounting,
    )


def load_judgements(run_dir: Path | str) -> pd.DataFrame:
    rows = []
    for path in sorted(stage_dir(run_dir, "evaluate").glob("*.jsonl")):
        rows += read_jsonl(path)
    return pd.DataFrame(rows)


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    return pd.read_csv(Path(run_dir) / "metrics.csv")
