"""Stage 2 · synthesize: the service LLM writes new pairs from seed pairs of the train split.

Reads: `coverage/train.jsonl`. Writes: `synth/pairs.jsonl` (one row per valid pair, with
provenance: seed prompt_id, service model, prompt version, cycle), `synth/calls.jsonl`
(one row per request: ok or the reason it failed), `synth/counts.csv`, DONE.json.
The response cache (`cache/llm.sqlite`) makes a re-run or a resumed run free.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pandas as pd

from . import coverage
from .io import write_csv, write_jsonl
from .llm import cache_for
from .llm.base import ChatRequest
from .llm.client import ServiceLLM
from .params import Params
from .prompts import Prompt, load_prompt
from .stage import StageResult, StageRun, stage_dir


def build_requests(params: Params, train: list[dict], prompt: Prompt) -> list[tuple[dict, ChatRequest]]:
    """One request per call: a seed pair drawn (seeded) from the task's train split."""
    cfg = params.synthesize
    schema = copy.deepcopy(prompt.schema) if prompt.schema else None
    if schema:
        schema["properties"]["contents"]["maxItems"] = cfg.pairs_per_call
    names = prompt.extra.get("category_names", {})
    out = []
    for task in params.tasks:
        seeds = [r for r in train if r["task"] == task]
        rng = random.Random(f"{params.seed}-{task}")
        for call in range(math.ceil(cfg.samples_per_task / cfg.pairs_per_call)):
            seed = rng.choice(seeds)
            messages = prompt.messages(
                category=names.get(task, task), instruction=seed["instruction"], response=seed["reference"], n=cfg.pairs_per_call
            )
            req = ChatRequest(messages=messages, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens, json_schema=schema, repeat=call)
            out.append(({"task": task, "call": call, "seed_prompt_id": seed["prompt_id"]}, req))
    return out


def run(params: Params, run_dir: Path | str, force: bool = False, cycle: int = 1) -> StageResult:
    stage = StageRun("synthesize", params, run_dir, force)
    if stage.up_to_date():
        return stage.skipped()
    stage.begin()
    train = coverage.load(run_dir, "train")
    prompt = load_prompt(params.synthesize.prompt)
    jobs = build_requests(params, train, prompt)
    service = ServiceLLM(params.service, cache_for(run_dir))
    results = service.run([req for _, req in jobs], desc="synthesize")
    pairs, calls = [], []
    for (meta, _), res in zip(jobs, results):
        items = (res.parsed or {}).get("contents", []) if res.ok else []
        calls.append(dict(meta, ok=res.ok, error=res.error, pairs=len(items), cached=res.cached, reasks=res.reasks,
                          input_tokens=res.input_tokens, output_tokens=res.output_tokens))
        for j, item in enumerate(items):
            instruction, response = item["instruction"].strip(), item["response"].strip()
            if not instruction or not response:
                continue
            pairs.append({
                "id": f"{meta['task']}-c{cycle}-{meta['call']:06d}-{j}", "task": meta["task"], "instruction": instruction,
                "response": response, "seed_prompt_id": meta["seed_prompt_id"], "service_model": params.service.label,
                "prompt": prompt.name, "prompt_version": prompt.version, "prompt_fingerprint": prompt.fingerprint, "cycle": cycle,
            })
    out = stage_dir(run_dir, "synthesize")
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "calls.jsonl", calls)
    counts = counts_frame(calls, pairs)
    write_csv(out / "counts.csv", counts)
    return stage.finish(
        {"calls": len(calls), "failed_calls": sum(not c["ok"] for c in calls), "pairs": len(pairs)},
        llm={params.service.label: service.accounting.as_dict()},
    )


def counts_frame(calls: list[dict], pairs: list[dict]) -> pd.DataFrame:
    c = pd.DataFrame(calls)
    table = c.groupby("task").agg(calls=("ok", "size"), valid_calls=("ok", "sum"), reasks=("reasks", "sum")).reset_index()
    table["invalid_calls"] = table["calls"] - table["valid_calls"]
    p = pd.DataFrame(pairs, columns=["task", "id"]).groupby("task").size().rename("pairs")
    return table.merge(p, on="task", how="left").fillna({"pairs": 0}).astype({"pairs": int})


def load(run_dir: Path | str) -> list[dict]:
    from .io import read_jsonl

    return read_jsonl(stage_dir(run_dir, "synthesize") / "pairs.jsonl")
