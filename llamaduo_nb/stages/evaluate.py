"""Stage 6 · evaluate: the service LLM judges every answer M times, then aggregation.

Reads: `coverage/test.jsonl` and the answer files infer made for the current grid. Writes:
`evaluate/<judge>.jsonl` (one row per judgement: scores, reasons, raw JSON, valid flag or error),
`metrics.csv` at the run folder's top (the paper's aggregates with bootstrap CIs, judge spread and
failed share: see `methods/metrics.py`), DONE.json. Judge prompt: `params/prompts/judge.yaml` (the
reference's JSON contract).

Units: each judgement, identified by its request's content: the answer's text, the instruction and
reference, the judge (backend, model), the judge prompt's wording and the repeat m. The run's response
cache answers a judgement it has seen, so a re-run pays only for answers that changed. The stage's
tables are rebuilt from the current grid's answers only: nothing of a dropped cell is judged or reported.

Optional, beside the paper:
- `evaluate.pairwise`: MT-Bench-style verdicts, tuned answer vs the base model's, both orders
  (`methods/pairwise.py`): `evaluate/pairwise.jsonl`, `pairwise.csv` at the run folder's top;
- `evaluate.reference_metrics`: ROUGE-L and embedding cosine vs the reference per answer, and
  their Spearman correlation with the judge (`methods/reference_metrics.py`):
  `evaluate/reference_metrics.csv`, `evaluate/correlations.csv`.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import pandas as pd

from llamaduo_nb.io import read_jsonl, write_csv, write_jsonl
from llamaduo_nb.llm import cache_for
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.llm.client import ServiceLLM
from llamaduo_nb.methods import pairwise, reference_metrics
from llamaduo_nb.methods.metrics import aggregate
from llamaduo_nb.pipeline.cycle import publish
from llamaduo_nb.pipeline.params import Params, ServiceParams
from llamaduo_nb.pipeline.units import StageResult, StageRun, cycle_of, stage_dir
from llamaduo_nb.prompts import load_prompt
from llamaduo_nb.stages import coverage, infer


PAIRWISE_JSONL = pairwise.PAIRWISE_JSONL
REFERENCE_METRICS_CSV = "reference_metrics.csv"
CORRELATIONS_CSV = "correlations.csv"


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


def run(params: Params, run_dir: Path | str, force: bool = False) -> StageResult:
    stage = StageRun("evaluate", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    if params.evaluate.pairwise:
        pairwise.load_pairwise_prompt(params.evaluate.pairwise_prompt)  # a missing prompt fails before any call
    stage.begin()
    references = {r["prompt_id"]: r for r in coverage.load(run_dir, "test")}
    responses = infer.load_responses(run_dir)
    accounting, frames = {}, []
    for judge in params.judges:
        jobs = build_requests(params, judge, responses, references, run_dir)
        service = ServiceLLM(judge, cache_for(run_dir))
        results = service.run([req for _, req in jobs], desc=f"judge ×{params.evaluate.m}")
        rows = [judgement_row(meta, res) for (meta, _), res in zip(jobs, results)]
        write_jsonl(judge_file(run_dir, judge), rows)
        accounting[judge.label] = service.accounting.as_dict()
        frames.append(pd.DataFrame(rows))
    judgements = pd.concat(frames, ignore_index=True)
    cfg = params.evaluate
    metrics = aggregate(judgements, cfg.zetas, bootstrap=cfg.bootstrap, seed=params.seed)
    publish(run_dir, "metrics.csv", metrics)  # this cycle's rows, also merged into the run's metrics.csv
    counts = {"judgements": len(judgements), "invalid": int((~judgements["valid"]).sum()), "answers": len(responses), "metric_rows": len(metrics)}
    _remove_stale(run_dir, cfg, params.judges)
    outputs = [judge_file(run_dir, j).name for j in params.judges]
    if cfg.pairwise:
        summary, pair_accounting = run_pairwise(params, run_dir, responses, references)
        outputs.append(PAIRWISE_JSONL)
        accounting.update(pair_accounting)
        counts.update(pairwise_verdicts=int(summary["judgements"].sum()), pairwise_errors=int(summary["errors"].sum()))
    if cfg.reference_metrics:
        refs = reference_metrics.reference_metrics(responses, references)
        write_csv(stage_dir(run_dir, "evaluate") / REFERENCE_METRICS_CSV, refs)
        write_csv(stage_dir(run_dir, "evaluate") / CORRELATIONS_CSV, reference_metrics.correlations(judgements, refs))
        counts["embedding"] = bool(refs["embedding_cosine"].notna().any())
    return stage.finish(counts, outputs=outputs, llm=accounting)


def _remove_stale(run_dir: Path | str, cfg, judges: list[ServiceParams] = ()) -> None:
    """Outputs of an option now switched off, or of a judge no longer in the params, must not outlive it."""
    current = {judge_file(run_dir, j).name for j in judges} | {PAIRWISE_JSONL}
    stale = [p for p in stage_dir(run_dir, "evaluate").glob("*.jsonl") if p.name not in current]
    if not cfg.pairwise:
        stale += [pairwise_file(run_dir), pairwise_summary_file(run_dir)]
    if not cfg.reference_metrics:
        stale += [stage_dir(run_dir, "evaluate") / REFERENCE_METRICS_CSV, stage_dir(run_dir, "evaluate") / CORRELATIONS_CSV]
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def load_judgements(run_dir: Path | str) -> pd.DataFrame:
    """Every judge's single-answer judgements (the pairwise verdicts are in load_pairwise)."""
    rows = []
    for path in sorted(stage_dir(run_dir, "evaluate").glob("*.jsonl")):
        if path.name != PAIRWISE_JSONL:
            rows += read_jsonl(path)
    return pd.DataFrame(rows)


def pairwise_file(run_dir: Path | str) -> Path:
    return stage_dir(run_dir, "evaluate") / PAIRWISE_JSONL


def pairwise_summary_file(run_dir: Path | str) -> Path:
    return Path(run_dir) / "pairwise.csv"


def run_pairwise(params: Params, run_dir: Path | str, responses: pd.DataFrame, references: dict,
                 make_service=None) -> tuple[pd.DataFrame, dict]:
    """Every judge's pairwise verdicts; writes evaluate/pairwise.jsonl and pairwise.csv. Returns (summary, accounting).

    `make_service(judge)` gives a judge's ServiceLLM (default: one on the run's response cache)."""
    pairwise.load_pairwise_prompt(params.evaluate.pairwise_prompt)  # a missing prompt fails before any call
    make_service = make_service or (lambda judge: ServiceLLM(judge, cache_for(run_dir)))
    rows, accounting = [], {}
    for judge in params.judges:
        service = make_service(judge)
        rows += pairwise.judge_pairs(params, judge, responses, references, service)
        accounting[f"{judge.label} (pairwise)"] = service.accounting.as_dict()
    for row in rows:
        row["cycle"] = cycle_of(run_dir)
    write_jsonl(pairwise_file(run_dir), rows)
    summary = pairwise.summarise(pd.DataFrame(rows))
    publish(run_dir, "pairwise.csv", summary)  # this cycle's rows, also merged into the run's pairwise.csv
    return summary, accounting


def load_pairwise(run_dir: Path | str) -> pd.DataFrame:
    """pairwise.csv, or an empty frame when the run did no pairwise comparison."""
    path = pairwise_summary_file(run_dir)
    return pd.read_csv(path) if path.exists() else pd.DataFrame(columns=pairwise.SUMMARY_COLUMNS)


def load_verdicts(run_dir: Path | str) -> pd.DataFrame:
    path = pairwise_file(run_dir)
    return pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()


def load_reference_metrics(run_dir: Path | str) -> pd.DataFrame:
    path = stage_dir(run_dir, "evaluate") / REFERENCE_METRICS_CSV
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def load_correlations(run_dir: Path | str) -> pd.DataFrame:
    path = stage_dir(run_dir, "evaluate") / CORRELATIONS_CSV
    return pd.read_csv(path) if path.exists() else pd.DataFrame()


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """metrics.csv of a run folder (every cycle) or of one `cycle-<t>/` folder (that cycle)."""
    return pd.read_csv(Path(run_dir) / "metrics.csv")
