"""Stage 2 · synthesize: the service LLM writes new pairs from seed pairs of the train split.

Reads: `coverage/train.jsonl`. Writes: `synthesize/pairs.jsonl` (one row per valid pair, with
provenance: seed prompt_id, service model, prompt version, cycle; cycle t ≥ 2 runs in `cycle-<t>/`),
`synthesize/calls.jsonl` (one row per request: ok or the reason it failed), `synthesize/counts.csv`, DONE.json.

Units: each call. A request is identified by its content (messages built from the seed pair and the
prompt file, sampling settings, schema, call number, service model), and the run's response cache
answers a request it has seen, so a changed setting sends only the requests it changed.

Requests go out in rounds until each task has `samples_per_task` valid pairs (`samples_by_task` where set).
The first round is a probe of at most `PROBE_CALLS` calls per task, whatever the target: a provider that
answers nothing usable is found out for tens of calls, not tens of thousands. Later rounds top up by the yield
observed so far, at most `ROUND_GROWTH` times the previous round's calls, at most `max_rounds` rounds (the
paper's 300k pairs per task take 7). A task stops after a round of at least `EMPTY_ROUND_CALLS` calls that gave
it no valid pair (a one-call top-up that fails is chance, not a broken provider), and the stage
fails (never DONE) when a task has none at all; the call path's own breakers stop it sooner when answers are
unusable call after call (`llm/client.py`), with a line that says what the provider returned.
Call i of a task always draws the same seed pair, so a resumed or repeated run
sends identical requests and the response cache answers them for free.
"""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pandas as pd

from llamaduo_nb.stages import coverage
from llamaduo_nb.core.io import file_fingerprint, read_jsonl, write_csv, write_jsonl
from llamaduo_nb.llm import service_llm
from llamaduo_nb.llm.base import ChatRequest
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.params import Params, resolve_prompt
from llamaduo_nb.core.prompts import Prompt, load_prompt
from llamaduo_nb.core.units import Stage, StageResult, StageRun, cycle_of, stage_dir


PROBE_CALLS = 20  # the first round's calls per task at most: what the provider yields is measured before it is paid for
EMPTY_ROUND_CALLS = 5  # a round of at least this many calls with no valid pair ends a task's rounds (fewer: chance)
ROUND_GROWTH = 4  # each later round at most this many times the previous one's calls (geometric: few rounds, bounded waste)
CALLS_PER_CYCLE = 10**7  # call numbers of cycle t start at (t-1)·10^7: no request repeats an earlier cycle's


def request_for(params: Params, prompt: Prompt, schema, seeds: list[dict], task: str, call: int, cycle: int = 1) -> tuple[dict, ChatRequest]:
    """The request of call number `call` for `task` in `cycle`: its seed pair depends only on (seed, task, cycle, call)."""
    cfg = params.synthesize
    key = f"{params.seed}-{task}-{call}" if cycle == 1 else f"{params.seed}-{task}-c{cycle}-{call}"
    seed = random.Random(key).choice(seeds)
    messages = prompt.messages(task=task, category=task.replace("_", " "), instruction=seed["instruction"],
                               response=seed["reference"], n=cfg.pairs_per_call)
    req = ChatRequest(messages=messages, temperature=cfg.temperature, top_p=cfg.top_p, max_tokens=cfg.max_new_tokens,
                      json_schema=schema, repeat=call + (cycle - 1) * CALLS_PER_CYCLE)
    return {"task": task, "call": call, "seed_prompt_id": seed["prompt_id"]}, req


def calls_needed(deficit: int, pairs_per_call: int, yield_per_call: float, previous: int = 0) -> int:
    """Calls for a round: the shortfall over the yield (expected, then seen), at most `PROBE_CALLS` in the first
    round and `ROUND_GROWTH` times the previous round's calls after it (a low early yield must not multiply the spend)."""
    wanted = max(1, math.ceil(deficit / max(yield_per_call, 1e-9)))
    return min(wanted, ROUND_GROWTH * previous) if previous else min(wanted, PROBE_CALLS)


def _pairs_from(meta: dict, result, params: Params, prompt: Prompt, cycle: int) -> list[dict]:
    items = (result.parsed or {}).get("contents", []) if result.ok else []
    out = []
    for j, item in enumerate(items):
        instruction, response = item["instruction"].strip(), item["response"].strip()
        if instruction and response:
            out.append({
                "id": f"{meta['task']}-c{cycle}-{meta['call']:06d}-{j}", "task": meta["task"], "instruction": instruction,
                "response": response, "seed_prompt_id": meta["seed_prompt_id"], "service_model": params.service.label,
                "prompt": prompt.name, "prompt_version": prompt.version, "prompt_fingerprint": prompt.fingerprint, "cycle": cycle,
            })
    return out


def _reads(params: Params, run_dir: Path) -> dict:
    # the prompt file's content; a later cycle sends new requests
    return {"prompt": file_fingerprint(resolve_prompt(params.synthesize.prompt)), "cycle": cycle_of(run_dir)}


STAGE = Stage("synthesize", upstream=("coverage",), depends_on=("seed", "tasks", "service", "synthesize"), reads=_reads)
run = STAGE.run


@STAGE.produces
def make(stage: StageRun, params: Params, run_dir: Path, force: bool = False) -> StageResult:
    cycle = cycle_of(run_dir)
    stage.begin()
    cfg = params.synthesize
    train = coverage.load(run_dir, "train")
    prompt = load_prompt(cfg.prompt)
    schema = copy.deepcopy(prompt.schema) if prompt.schema else None
    if schema:
        schema["properties"]["contents"]["maxItems"] = cfg.pairs_per_call
    seeds = {task: [r for r in train if r["task"] == task] for task in params.tasks}
    service = service_llm(params.service, params, run_dir)
    pairs: dict = {task: [] for task in params.tasks}
    calls: list[dict] = []
    made = {task: 0 for task in params.tasks}
    last_round = {task: 0 for task in params.tasks}  # calls each task had in the previous round
    stopped: dict = {}  # task -> why its rounds stopped early
    for round_no in range(cfg.max_rounds):
        jobs = []
        for task in params.tasks:
            deficit = cfg.target_for(task) - len(pairs[task])
            if deficit <= 0 or task in stopped:
                continue
            if made[task] == 0:
                per_call = cfg.pairs_per_call * (1 - cfg.expected_loss)
            else:
                per_call = len(pairs[task]) / made[task]
            n = calls_needed(deficit, cfg.pairs_per_call, per_call, last_round[task])
            last_round[task] = n
            for _ in range(n):
                jobs.append(request_for(params, prompt, schema, seeds[task], task, made[task], cycle))
                made[task] += 1
        if not jobs:
            break
        results = service.run([req for _, req in jobs], desc=f"synthesize, round {round_no + 1}", token_field="synthesize.max_new_tokens")
        got = {task: 0 for task in params.tasks}
        for (meta, _), res in zip(jobs, results):
            new = _pairs_from(meta, res, params, prompt, cycle)
            pairs[meta["task"]] += new
            got[meta["task"]] += len(new)
            calls.append(dict(meta, round=round_no + 1, ok=res.ok, error=res.error, pairs=len(new), cached=res.cached,
                              reasks=res.reasks, input_tokens=res.input_tokens, output_tokens=res.output_tokens))
        for task in {meta["task"] for meta, _ in jobs}:
            if got[task] == 0 and last_round[task] >= EMPTY_ROUND_CALLS:
                errors = [c["error"] for c in calls if c["task"] == task and c["round"] == round_no + 1 and c["error"]]
                common = max(set(errors), key=errors.count) if errors else "the answers held no pair"
                stopped[task] = f"round {round_no + 1} gave no valid pair from {last_round[task]} calls ({common[:200]})"
                print(f"synthesize: {task}: no more rounds: {stopped[task]}", flush=True)
    empty = [task for task in params.tasks if not pairs[task]]
    if empty:
        raise UserError(f"no valid pair for {', '.join(empty)}: "
                        + "; ".join(f"{t}: {stopped.get(t, 'no pair after ' + str(made[t]) + ' calls')}" for t in empty))
    flat = [p for task in params.tasks for p in pairs[task]]
    out = stage_dir(run_dir, "synthesize")
    write_jsonl(out / "pairs.jsonl", flat)
    write_jsonl(out / "calls.jsonl", calls)
    if cfg.push_to_hub:
        push_to_hub(flat, cfg.push_to_hub)
    counts = counts_frame(calls, flat, {task: cfg.target_for(task) for task in params.tasks})
    write_csv(out / "counts.csv", counts)
    short = counts[counts["pairs"] < counts["target"]]["task"].tolist()
    return stage.finish(
        {"calls": len(calls), "failed_calls": sum(not c["ok"] for c in calls), "pairs": len(flat),
         "rounds": max((c["round"] for c in calls), default=0), "short_tasks": ",".join(short) or "none",
         "prompt": f"{prompt.name} v{prompt.version} ({prompt.fingerprint})"},
        outputs=["pairs.jsonl", "calls.jsonl", "counts.csv"], llm={params.service.label: service.accounting.as_dict()},
    )


def push_to_hub(pairs: list[dict], repo_id: str) -> None:
    """Publish the pairs as a private Hub dataset (needs internet and HF_TOKEN)."""
    import os

    from datasets import Dataset  # heavy, and only for this

    if not os.environ.get("HF_TOKEN"):
        raise UserError("synthesize.push_to_hub: set HF_TOKEN in the environment to push to the Hub")
    Dataset.from_list(pairs).push_to_hub(repo_id, private=True, token=os.environ["HF_TOKEN"])


def counts_frame(calls: list[dict], pairs: list[dict], target: int | dict) -> pd.DataFrame:
    c = pd.DataFrame(calls)
    table = c.groupby("task").agg(calls=("ok", "size"), valid_calls=("ok", "sum"), reasks=("reasks", "sum"),
                                  rounds=("round", "max")).reset_index()
    table["invalid_calls"] = table["calls"] - table["valid_calls"]
    p = pd.DataFrame(pairs, columns=["task", "id"]).groupby("task").size().rename("pairs")
    table = table.merge(p, on="task", how="left").fillna({"pairs": 0}).astype({"pairs": int})
    table["target"] = table["task"].map(target) if isinstance(target, dict) else target
    return table


def load(run_dir: Path | str) -> list[dict]:
    return read_jsonl(stage_dir(run_dir, "synthesize") / "pairs.jsonl")
