"""Stage 6 · evaluate: the service LLM judges every answer M times, then aggregation.

Reads: `coverage/test.jsonl` and the answer files infer made for the current grid. Writes:
`evaluate/<judge>.jsonl` (one row per judgement: scores, reasons, raw JSON, valid flag or error),
`evaluate/metrics.csv` (the paper's aggregates with their intervals, judge spread and failed share: see
`methods/metrics.py`), DONE.json. The runner gathers every cycle's tables into `<run>/metrics.csv`. Judge prompt: `params/prompts/judge.yaml` (the
reference's JSON contract).

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
import hashlib
import re
import shutil
from pathlib import Path
from typing import Optional

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint, read_csv_or_empty, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.methods import agreement, pairwise, reference_metrics, verdict
from llamaduo_nb.methods.metrics import aggregate, answer_scores
from llamaduo_nb.core.rows import LABEL_METRICS, SERVICE_VOLUME, is_service, read_human_labels, service_name
from llamaduo_nb.core.params import BUNDLED_HUMAN_LABELS, Params, ServiceParams, resolve_prompt
from llamaduo_nb.core.units import (SERVICE_OPERATIONAL, Stage, StageResult, StageRun, Unit, cycle_folders, cycle_of, depends_on, optional_file,
                                        read_done, root_of, stage_dir)
from llamaduo_nb.core.prompts import load_prompt
from llamaduo_nb.stages import coverage, infer


PAIRWISE_JSONL = pairwise.PAIRWISE_JSONL
PAIRWISE_CSV = "pairwise.csv"
METRICS_CSV = "metrics.csv"
REFERENCE_METRICS_CSV = "reference_metrics.csv"
CORRELATIONS_CSV = "correlations.csv"
SERVICE_ANSWERS = "service_answers"  # evaluate/service_answers/<task>.jsonl
HUMAN_LABELS = "human_labels"  # evaluate/human_labels/{judgements.jsonl, items.csv, agreement.csv, between_judges.csv}


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


# -- the service LLM as a competitor ---------------------------------------------------------------------
def service_answers_file(run_dir: Path | str, task: str) -> Path:
    return stage_dir(run_dir, "evaluate") / SERVICE_ANSWERS / f"{task}.jsonl"


def service_answer_requests(params: Params, prompts: list[dict]) -> list[tuple[dict, ChatRequest]]:
    """K requests per test prompt, the user message exactly as the local models get it (infer's wording),
    infer's sampling; `repeat` = k keeps the K answers apart in the cache."""
    cfg = params.infer
    jobs = []
    for prompt in prompts:
        messages = infer._conversations([prompt])[0]
        for k in range(cfg.k):
            req = ChatRequest(messages=messages, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, repeat=k)
            jobs.append(({"prompt_id": prompt["prompt_id"], "k": k}, req))
    return jobs


def service_answers_unit(params: Params, run_dir: Path | str, task: str, prompts: list[dict]) -> Unit:
    service = {k: v for k, v in params.service.model_dump(mode="json").items() if k not in SERVICE_OPERATIONAL}
    made_from = {"service": service, "infer": {k: getattr(params.infer, k) for k in ("k", "temperature", "top_p", "max_new_tokens")},
                 "prompts": coverage.prompts_fingerprint(prompts)}
    return Unit.file(service_answers_file(run_dir, task), made_from)


def answer_as_service(params: Params, run_dir: Path | str, test: list[dict]) -> tuple[pd.DataFrame, dict, list[str], pd.DataFrame]:
    """The service LLM answers every test prompt of every task K times; one answer file per task.

    Returns (the answers it gave, as infer's rows with local_model `service:<label>` and volume -1;
    accounting; the files, relative to evaluate/; the answers that failed, which are not judged but enter
    the judge files as unjudged answers: `unanswered_rows`)."""
    name = service_name(params.service.label)
    frames, outputs, failed, service = [], [], [], None
    accounting = {}
    for task in params.tasks:
        prompts = [p for p in test if p["task"] == task]
        unit = service_answers_unit(params, run_dir, task, prompts)
        if not unit.current():
            unit.discard()
            service = service or service_llm(params.service, params, run_dir)
            jobs = service_answer_requests(params, prompts)
            results = service.run([req for _, req in jobs], desc=f"service answers {task} ×{params.infer.k}")
            rows = [dict(meta, task=task, local_model=name, volume=SERVICE_VOLUME, response=res.text if res.ok else None,
                         output_tokens=res.output_tokens, input_tokens=res.input_tokens, error=res.error)
                    for (meta, _), res in zip(jobs, results)]
            write_jsonl(unit.outputs[0], rows)
            if all(r["response"] is not None for r in rows):  # a failed answer is asked again next time (the rest are cached)
                unit.commit(task=task, service=params.service.label, answers=len(rows))
        rows = read_jsonl(unit.outputs[0])
        answered = [r for r in rows if r.get("response") is not None]
        failed += [r for r in rows if r.get("response") is None]
        frames.append(pd.DataFrame(answered))
        outputs.append(str(unit.outputs[0].relative_to(stage_dir(run_dir, "evaluate"))))
    if service is not None:
        accounting[f"{params.service.label} (answers)"] = service.accounting.as_dict()
    present = set((stage_dir(run_dir, "evaluate") / SERVICE_ANSWERS).glob("*.jsonl"))
    for stale in present - {service_answers_file(run_dir, t) for t in params.tasks}:
        stale.unlink()  # a task no longer in the params; its answers stay in the response cache
        with contextlib.suppress(FileNotFoundError):
            stale.with_name(stale.name + ".unit.json").unlink()
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return frame, accounting, outputs, pd.DataFrame(failed)


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


def load_service_answers(run_dir: Path | str) -> pd.DataFrame:
    """The service LLM's answers to the test prompts (empty when it did not answer them)."""
    folder = stage_dir(run_dir, "evaluate") / SERVICE_ANSWERS
    rows = [r for path in sorted(folder.glob("*.jsonl")) for r in read_jsonl(path) if r.get("response") is not None]
    return pd.DataFrame(rows)


# -- judges checked against people ---------------------------------------------------------------------------
def labels_path(params: Params) -> Optional[Path]:
    """The human-labels file in force: the given file, the bundled labels (bundled coverage only), or None."""
    return params.evaluate.labels_file(params.coverage.source)


def human_labels(params: Params, references: dict) -> Optional[list[dict]]:
    """The labels of this run's test prompts (None when there are none). A label of a prompt that is not a test
    prompt of this run is an error in a file of your own; the bundled file covers more prompts than a run may use."""
    path = labels_path(params)
    if path is None:
        return None
    try:
        rows = read_human_labels(path)
    except ValueError as exc:
        raise UserError(f"evaluate.human_labels: {exc}") from None
    bundled = path == BUNDLED_HUMAN_LABELS
    kept = []
    for number, row in enumerate(rows, start=1):
        if row["prompt_id"] not in references:
            if bundled:
                continue
            raise UserError(f"{path}: label {number}: prompt_id: '{row['prompt_id']}' is not a test prompt of this run")
        kept.append(dict(row, label=number))
    return kept or None


def _item(prompt_id: str, answer: str) -> str:
    return f"{prompt_id}:{hashlib.sha256(answer.encode()).hexdigest()[:10]}"


def labelled_answers(labels: list[dict], references: dict, responses: pd.DataFrame, path: Path | str = "human labels",
                     cycle: int = 1) -> pd.DataFrame:
    """One row per label and metric: item (prompt and answer text), task, answer, metric, human score, rater.
    An `answer_id` is looked up among this cycle's answers (local models' and the service LLM's); an id of
    another cycle's answer (`…@c<t>`) is left to that cycle's evaluation."""
    by_id = {(r.prompt_id, answer_id(r.local_model, r.volume, r.k, cycle)): r.response for r in responses.itertuples()}
    rows = []
    for label in labels:
        answer = label.get("answer")
        if not isinstance(answer, str):
            answer = by_id.get((label["prompt_id"], label["answer_id"]))
            other_cycle = re.search(r"@c(\d+)$", label["answer_id"])
            if answer is None and int(other_cycle[1] if other_cycle else 1) != cycle:
                continue
            if answer is None:
                raise UserError(f"{path}: label {label['label']}: answer_id: '{label['answer_id']}' is not an answer to "
                                f"prompt {label['prompt_id'][:12]}… in this run (ids as the answer browser shows them)")
        for metric in LABEL_METRICS:
            if label.get(metric) is not None:
                rows.append({"item": _item(label["prompt_id"], answer), "prompt_id": label["prompt_id"],
                             "task": references[label["prompt_id"]]["task"], "answer": answer, "metric": metric,
                             "human_score": float(label[metric]), "rater": label.get("rater")})
    return pd.DataFrame(rows)


def check_judges_against_people(params: Params, run_dir: Path | str, labelled: pd.DataFrame, references: dict,
                                make_service=None) -> tuple[pd.DataFrame, dict]:
    """Every judge scores each labelled answer (`labelled_answers`; M times, cached); writes evaluate/human_labels/.
    Returns (items, accounting)."""
    make_service = make_service or (lambda judge: service_llm(judge, params, run_dir))
    answers = labelled.drop_duplicates("item").reset_index(drop=True)
    to_judge = pd.DataFrame({"task": answers["task"], "local_model": "human-labelled", "volume": 0, "prompt_id": answers["prompt_id"],
                             "k": answers.index, "response": answers["answer"]})
    folder = stage_dir(run_dir, "evaluate") / HUMAN_LABELS
    accounting, judged = {}, []
    for judge in params.judges:
        jobs = build_requests(params, judge, to_judge, references, run_dir)
        service = make_service(judge)
        results = service.run([req for _, req in jobs], desc=f"judge the human-labelled answers ×{params.evaluate.m}")
        judged += [dict(judgement_row(meta, res), item=answers["item"].iloc[meta["k"]]) for (meta, _), res in zip(jobs, results)]
        accounting[f"{judge.label} (human labels)"] = service.accounting.as_dict()
    write_jsonl(folder / "judgements.jsonl", judged)
    judge_scores = answer_scores(pd.DataFrame(judged)).assign(item=lambda f: answers["item"].to_numpy()[f["k"].to_numpy(dtype=int)])
    human = labelled.groupby(["item", "prompt_id", "task", "metric"], as_index=False).agg(human_score=("human_score", "mean"),
                                                                                         raters=("human_score", "size"))
    items = human.merge(judge_scores.rename(columns={"score": "judge_score"})[["judge", "metric", "item", "judge_score"]],
                        on=["item", "metric"], how="inner")
    reference_text = {pid: str(ref.get("reference") or "").strip() for pid, ref in references.items()}
    items = items.assign(reference=[str(a).strip() == reference_text.get(p) for a, p in
                                    zip(items["item"].map(answers.set_index("item")["answer"]), items["prompt_id"])])
    items = items[["judge", "metric", "task", "prompt_id", "item", "reference", "human_score", "raters", "judge_score"]]
    write_csv(folder / "items.csv", items)
    cfg = params.evaluate
    write_csv(folder / "agreement.csv", agreement.agreement_with_humans(items, cfg.bootstrap, params.seed))
    write_csv(folder / "between_judges.csv",
              agreement.agreement_between_judges(items.rename(columns={"judge_score": "score"}), cfg.bootstrap, params.seed))
    return items, accounting


def load_human_check(run_dir: Path | str) -> dict:
    """{"items", "agreement", "between_judges"} of evaluate/human_labels/ (empty frames when the run has no labels)."""
    folder = stage_dir(run_dir, "evaluate") / HUMAN_LABELS
    return {name: pd.read_csv(folder / f"{name}.csv") if (folder / f"{name}.csv").exists() else pd.DataFrame()
            for name in ("items", "agreement", "between_judges")}


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
    frames = [read_csv_or_empty(stage_dir(f, "evaluate") / name) for f in folders if read_done(f, "evaluate")]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
