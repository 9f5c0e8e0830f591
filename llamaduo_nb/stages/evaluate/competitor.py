"""The service LLM as a competitor: it answers the test prompts K times, the user message worded exactly as the local
models get it and with infer's sampling (`evaluate/service_answers/<task>.jsonl`); its answers are judged like a volume's."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pandas as pd

from llamaduo_nb.core.io import read_jsonl, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.core.rows import SERVICE_VOLUME, service_name
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import SERVICE_OPERATIONAL, Unit, stage_dir
from llamaduo_nb.stages import coverage, infer


SERVICE_ANSWERS = "service_answers"  # evaluate/service_answers/<task>.jsonl


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


def load_service_answers(run_dir: Path | str) -> pd.DataFrame:
    """The service LLM's answers to the test prompts (empty when it did not answer them)."""
    folder = stage_dir(run_dir, "evaluate") / SERVICE_ANSWERS
    rows = [r for path in sorted(folder.glob("*.jsonl")) for r in read_jsonl(path) if r.get("response") is not None]
    return pd.DataFrame(rows)
