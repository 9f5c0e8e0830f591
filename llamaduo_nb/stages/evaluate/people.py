"""Judges checked against people (`evaluate.human_labels`): each judge scores the labelled answers and is compared with
the people's scores (`evaluate/human_labels/`: judgements.jsonl, items.csv, agreement.csv, between_judges.csv)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Optional

import pandas as pd

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import write_csv, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.methods import agreement
from llamaduo_nb.methods.metrics import answer_scores
from llamaduo_nb.core.rows import LABEL_METRICS, read_human_labels
from llamaduo_nb.core.units import stage_dir
from llamaduo_nb.core.params import BUNDLED_HUMAN_LABELS, Params
from llamaduo_nb.stages.evaluate.judging import answer_id, build_requests, judgement_row


HUMAN_LABELS = "human_labels"  # evaluate/human_labels/{judgements.jsonl, items.csv, agreement.csv, between_judges.csv}


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
