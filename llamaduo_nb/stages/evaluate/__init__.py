"""Stage 6 · evaluate: the service LLM judges every answer M times, then aggregation.

Reads: `coverage/test.jsonl` and the answer files infer made for the current grid. Writes:
`evaluate/<judge>.jsonl` (one row per judgement: scores, reasons, raw JSON, valid flag or error),
`evaluate/metrics.csv` (the paper's aggregates with their intervals, judge spread and failed share: see
`methods/metrics.py`), DONE.json; the runner gathers every cycle's tables into `<run>/metrics.csv`. Judge prompt:
`params/prompts/judge.yaml` (the reference's JSON contract).

Its parts, each in a module of its own: `judging.py` (a judge request per answer and repeat, and its row),
`competitor.py` (the service LLM's own answers), `people.py` (judges checked against people) and
`pairwise_verdicts.py`; this module is the stage, its tables and the verdicts read from them.

Units: each judgement, identified by its request's content: the answer's text, the instruction and
reference, the judge (backend, model), the judge prompt's wording and the repeat m. The run's response
cache answers a judgement it has seen, so a re-run pays only for answers that changed. The stage's
tables are rebuilt from the current grid's answers only: nothing of a dropped cell is judged or reported.

The service LLM as a competitor (`evaluate.service_answers`, on by default): the service LLM answers
every test prompt K times with the wording and sampling settings the local models get (`infer.*`),
one cached request per answer; `evaluate/service_answers/<task>.jsonl` (with its unit record) holds
the answers, which are judged exactly like a volume's: rows `local_model = service:<label>`, volume -1
in the judge files and metrics.csv.

Judges checked against people (`evaluate.human_labels`): each judge scores the labelled answers
(the same judge prompt, M times, cached; an answer the run already judged costs nothing);
`evaluate/human_labels/items.csv` (judge and human score per answer and metric),
`evaluate/human_labels/agreement.csv` (Spearman, Kendall, MAE with cluster-bootstrap CIs over prompts per
judge; the reference answers apart) and
`evaluate/human_labels/between_judges.csv` (`methods/agreement.py`).

Optional, beside the paper:
- `evaluate.pairwise`: MT-Bench-style verdicts, tuned answer vs the base model's and vs the service
  LLM's, both orders (`methods/pairwise.py`): `evaluate/pairwise.jsonl`, `evaluate/pairwise.csv`
  (column `baseline`; every cycle's in `<run>/pairwise.csv`);
- `evaluate.reference_metrics`: ROUGE-L and embedding cosine vs the reference per answer, and
  their Spearman correlation with the judge (`methods/reference_metrics.py`):
  `evaluate/reference_metrics.csv`, `evaluate/correlations.csv`.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint, read_csv_or_empty, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.methods import pairwise, reference_metrics, verdict
from llamaduo_nb.methods.metrics import aggregate, answer_scores
from llamaduo_nb.core.params import Params, ServiceParams, resolve_prompt
from llamaduo_nb.core.units import Stage, StageResult, StageRun, cycle_folders, cycle_of, depends_on, optional_file, read_done, root_of, stage_dir
from llamaduo_nb.stages import coverage, infer
from llamaduo_nb.stages.evaluate.people import HUMAN_LABELS, check_judges_against_people, human_labels, labelled_answers, labels_path
from llamaduo_nb.stages.evaluate.pairwise_verdicts import PAIRWISE_CSV, pairwise_file, pairwise_summary_file, run_pairwise
from llamaduo_nb.stages.evaluate.judging import PAIRWISE_JSONL, build_requests, judge_file, judgement_row
from llamaduo_nb.stages.evaluate.competitor import SERVICE_ANSWERS, answer_as_service


METRICS_CSV = "metrics.csv"


REFERENCE_METRICS_CSV = "reference_metrics.csv"


CORRELATIONS_CSV = "correlations.csv"


def _reads(params: Params, run_dir: Path) -> dict:
    """The judge prompts' content, the human labels' content, and the sampling the service LLM answers with."""
    cfg = params.evaluate
    labels = cfg.labels_file(params.coverage.source)
    return {"prompt": file_fingerprint(resolve_prompt(cfg.prompt)),
            "pairwise_prompt": file_fingerprint(resolve_prompt(cfg.pairwise_prompt)) if cfg.pairwise else None,
            "human_labels": optional_file(labels) if labels else None,
            "service_answers": depends_on(params, ["infer.k", "infer.temperature", "infer.top_p", "infer.max_new_tokens"])
            if cfg.service_answers else None}


STAGE = Stage("evaluate", upstream=("coverage", "infer"), depends_on=("seed", "tasks", "evaluate", "service"), reads=_reads)


run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    if params.evaluate.pairwise:
        pairwise.load_pairwise_prompt(params.evaluate.pairwise_prompt)  # a missing prompt fails before any call
    stage.begin()
    test = coverage.load(run_dir, "test")
    references = {r["prompt_id"]: r for r in test}
    labels = human_labels(params, references)  # a bad labels file fails before any call
    local_responses = infer.load_responses(run_dir)
    accounting, frames, outputs, counts = {}, [], [], {}
    service_responses = pd.DataFrame()
    if params.evaluate.service_answers:
        service_responses, service_accounting, service_outputs, failed_service = answer_as_service(params, run_dir, test)
        accounting.update(service_accounting)
        outputs += service_outputs
        counts.update(service_answers=len(service_responses), service_answer_errors=len(failed_service))
    else:
        failed_service = pd.DataFrame()
    responses = pd.concat([local_responses, service_responses], ignore_index=True)
    labelled = labelled_answers(labels, references, responses, labels_path(params), cycle_of(run_dir)) if labels else None
    for judge in params.judges:
        jobs = build_requests(params, judge, responses, references, run_dir)
        service = service_llm(judge, params, run_dir)
        results = service.run([req for _, req in jobs], desc=f"judge ×{params.evaluate.m}")
        rows = [judgement_row(meta, res) for (meta, _), res in zip(jobs, results)]
        if rows and not any(r["valid"] for r in rows):  # nothing to report: never DONE, and a re-run resumes from the cache
            raise UserError(f"evaluate: none of the {len(rows)} judgements by {judge.label} was valid "
                            f"(first reason: {rows[0]['error'] or 'invalid output'}); nothing was reported")
        rows += unanswered_rows(params, judge, failed_service, run_dir)  # the verdict scores them 0, never drops them
        write_jsonl(judge_file(run_dir, judge), rows)
        accounting[judge.label] = service.accounting.as_dict()
        frames.append(pd.DataFrame(rows))
    judgements = pd.concat(frames, ignore_index=True)
    cfg = params.evaluate
    metrics = aggregate(judgements, cfg.zetas)
    write_csv(stage_dir(run_dir, "evaluate") / METRICS_CSV, metrics)
    counts.update(judgements=len(judgements), invalid=int((~judgements["valid"]).sum()), answers=len(responses), metric_rows=len(metrics))
    _remove_stale(run_dir, cfg, params.judges)
    outputs += [judge_file(run_dir, j).name for j in params.judges] + [METRICS_CSV]
    if labelled is not None and len(labelled):
        items, label_accounting = check_judges_against_people(params, run_dir, labelled, references)
        accounting.update(label_accounting)
        outputs.append(HUMAN_LABELS)
        counts["human_labelled_items"] = int(items["item"].nunique()) if len(items) else 0
    else:  # no labels apply to this run: an earlier check must not be reported
        shutil.rmtree(stage_dir(run_dir, "evaluate") / HUMAN_LABELS, ignore_errors=True)
    if cfg.pairwise:
        summary, pair_accounting = run_pairwise(params, run_dir, local_responses, references, service_answers=service_responses)
        outputs += [PAIRWISE_JSONL, PAIRWISE_CSV]
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
    folders = [] if cfg.service_answers else [stage_dir(run_dir, "evaluate") / SERVICE_ANSWERS]
    folders += [] if cfg.human_labels else [stage_dir(run_dir, "evaluate") / HUMAN_LABELS]
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def unanswered_rows(params: Params, judge: ServiceParams, failed: pd.DataFrame, run_dir: Path | str) -> list[dict]:
    """Judge-file rows for the service LLM's failed answers (M invalid judgements each, no call made): such an
    answer has no valid judgement, so the paper's aggregates count it in `unscored_answers` and the verdict
    scores it 0, as it does an answer the judge could not score."""
    rows = []
    for answer in failed.itertuples():
        for m in range(params.evaluate.m):
            rows.append({"cycle": cycle_of(run_dir), "task": answer.task, "local_model": answer.local_model, "judge": judge.label,
                         "volume": int(answer.volume), "prompt_id": answer.prompt_id, "k": int(answer.k), "m": m,
                         "prompt_version": None, "valid": False, "error": f"the service LLM gave no answer: {answer.error}",
                         "similarity": None, "precision": None, "similarity_reason": None, "precision_reason": None, "raw": None})
    return rows


def load_judgements(run_dir: Path | str) -> pd.DataFrame:
    """Every judge's single-answer judgements (the pairwise verdicts are in load_pairwise)."""
    rows = []
    for path in sorted(stage_dir(run_dir, "evaluate").glob("*.jsonl")):
        if path.name != PAIRWISE_JSONL:
            rows += read_jsonl(path)
    return pd.DataFrame(rows)


def load_pairwise(run_dir: Path | str) -> pd.DataFrame:
    """The pairwise summary of a run folder (every cycle) or of one `cycle-<t>/` folder (that cycle); an empty
    frame when the run did no pairwise comparison (`baseline`: base or service:<label>)."""
    frame = _every_cycle(run_dir, PAIRWISE_CSV)
    if frame.empty:
        return pd.DataFrame(columns=pairwise.SUMMARY_COLUMNS)
    return frame if "baseline" in frame.columns else frame.assign(baseline=pairwise.BASE)


def load_verdicts(run_dir: Path | str) -> pd.DataFrame:
    path = pairwise_file(run_dir)
    return pd.DataFrame(read_jsonl(path)) if path.exists() else pd.DataFrame()


def load_reference_metrics(run_dir: Path | str) -> pd.DataFrame:
    return read_csv_or_empty(stage_dir(run_dir, "evaluate") / REFERENCE_METRICS_CSV)


def load_correlations(run_dir: Path | str) -> pd.DataFrame:
    return read_csv_or_empty(stage_dir(run_dir, "evaluate") / CORRELATIONS_CSV)


def load_all_judgements(run_dir: Path | str) -> pd.DataFrame:
    """Every cycle's single-answer judgements (column `cycle`), from the run folder's top."""
    frames = [load_judgements(folder).assign(cycle=cycle) for cycle, folder in cycle_folders(root_of(run_dir))]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


ANSWER_SCORE_COLUMNS = ["cycle", "task", "local_model", "judge", "volume", "prompt_id", "k", "score", "judge_std", "judgements", "metric"]


def load_answer_scores(run_dir: Path | str) -> pd.DataFrame:
    """Every answer's score (the mean of its valid judgements; NaN for an answer without one, which the verdict
    scores 0) of every cycle."""
    judgements = load_all_judgements(run_dir)
    return answer_scores(judgements, unscored=True) if len(judgements) else pd.DataFrame(columns=ANSWER_SCORE_COLUMNS)


def verdict_rule(params: Params) -> verdict.Rule:
    """The run's one rule (`methods/verdict.py`): the cycle target at `cycle.alpha`, with the first judge by default;
    in a volume search, α split over every look the search could make."""
    looks = 1
    if params.finetune.search:  # the base model, each grid volume, each later cycle
        looks = 1 + len(params.finetune.volumes) + (params.cycle.max_cycles - 1)
    return verdict.Rule.from_target(params.cycle.target, params.cycle.alpha, params.judges[0].label, looks)


def run_verdicts(params: Params, run_dir: Path | str, up_to_cycle: int | None = None) -> pd.DataFrame:
    """The verdict of every (task, local model, cycle, volume) of the run (`methods/verdict.py`), cycles ≤ `up_to_cycle`."""
    scores = load_answer_scores(run_dir)
    if up_to_cycle is not None and len(scores):
        scores = scores[scores["cycle"] <= up_to_cycle]
    return verdict.verdict_table(scores, verdict_rule(params), params.infer.k, params.evaluate.m, params.service.label)


def load_metrics(run_dir: Path | str) -> pd.DataFrame:
    """The metrics of a run folder (every cycle) or of one `cycle-<t>/` folder (that cycle)."""
    return _every_cycle(run_dir, METRICS_CSV)


def _every_cycle(run_dir: Path | str, name: str) -> pd.DataFrame:
    """One of evaluate's tables: each cycle's own, read from its evaluate folder where that evaluate finished (so a
    redone cycle never hides another's rows, and an unfinished one shows none)."""
    folders = [Path(run_dir)] if cycle_of(run_dir) > 1 else [f for _, f in cycle_folders(run_dir)]
    frames = [read_csv_or_empty(stage_dir(f, "evaluate") / name) for f in folders if read_done(f, "evaluate") is not None]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
