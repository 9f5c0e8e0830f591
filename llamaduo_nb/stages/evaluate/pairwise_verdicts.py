"""Pairwise verdicts (`evaluate.pairwise`): each tuned volume's answer against the base model's and the service LLM's,
both orders (`methods/pairwise.py` builds and reads them): `evaluate/pairwise.jsonl`, `evaluate/pairwise.csv`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from llamaduo_nb.core.io import write_csv, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.methods import pairwise
from llamaduo_nb.core.rows import SERVICE_VOLUME, is_service, service_name
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import cycle_of, stage_dir
from llamaduo_nb.stages.evaluate.judging import PAIRWISE_JSONL


PAIRWISE_CSV = "pairwise.csv"


def pairwise_file(run_dir: Path | str) -> Path:
    return stage_dir(run_dir, "evaluate") / PAIRWISE_JSONL


def pairwise_summary_file(run_dir: Path | str) -> Path:
    return stage_dir(run_dir, "evaluate") / PAIRWISE_CSV


def judge_pairs(params, judge, responses: pd.DataFrame, references: dict, service, baseline: Optional[pd.DataFrame] = None,
                baseline_name: str = pairwise.BASE, baseline_volume: int = pairwise.BASELINE_VOLUME) -> list[dict]:
    """Build, send (only the pairs whose answers differ) and parse one judge's pairwise verdicts (against the
    base model, or against `baseline`'s answers)."""
    jobs = pairwise.build_requests(params, judge, responses, references, baseline=baseline, baseline_name=baseline_name,
                          baseline_volume=baseline_volume)
    sent = [i for i, (_, req) in enumerate(jobs) if req is not None]
    results = service.run([jobs[i][1] for i in sent], desc="pairwise ×2 orders") if sent else []
    by_job = dict(zip(sent, results))
    return [pairwise.judgement_row(meta, by_job.get(i)) for i, (meta, _) in enumerate(jobs)]


def run_pairwise(params: Params, run_dir: Path | str, responses: pd.DataFrame, references: dict,
                 make_service=None, service_answers: Optional[pd.DataFrame] = None) -> tuple[pd.DataFrame, dict]:
    """Every judge's pairwise verdicts, each tuned volume against the base model and (given `service_answers`)
    against the service LLM; writes evaluate/pairwise.jsonl and pairwise.csv. Returns (summary, accounting).

    `make_service(judge)` gives a judge's ServiceLLM (default: one on the run's response cache)."""
    pairwise.load_pairwise_prompt(params.evaluate.pairwise_prompt)  # a missing prompt fails before any call
    make_service = make_service or (lambda judge: service_llm(judge, params, run_dir))
    local = responses[~is_service(responses["local_model"]).to_numpy()] if len(responses) else responses
    rows, accounting = [], {}
    for judge in params.judges:
        service = make_service(judge)
        rows += judge_pairs(params, judge, local, references, service)
        if service_answers is not None and len(service_answers):
            rows += judge_pairs(params, judge, local, references, service, baseline=service_answers,
                                         baseline_name=service_name(params.service.label), baseline_volume=SERVICE_VOLUME)
        accounting[f"{judge.label} (pairwise)"] = service.accounting.as_dict()
    for row in rows:
        row["cycle"] = cycle_of(run_dir)
    write_jsonl(pairwise_file(run_dir), rows)
    summary = pairwise.summarise(pd.DataFrame(rows))
    write_csv(pairwise_summary_file(run_dir), summary)
    return summary, accounting
