"""`llamaduo run --dry-run`: the experiment grid a params file implies, its service-LLM calls and cost,
before anything runs."""

from __future__ import annotations

import math

from .params import Params

# Assumptions for the estimate (printed with it): tokens per synthesis request and reply, per judge
# request and reply, and fine-tuning throughput on one GPU.
SYNTH_INPUT_TOKENS = 450
SYNTH_OUTPUT_TOKENS_PER_PAIR = 180
JUDGE_INPUT_TOKENS = 700
JUDGE_OUTPUT_TOKENS = 120
GPU_SAMPLES_PER_SECOND = 6.0  # QLoRA, ~2-8B model, sequences of a few hundred tokens, one A100/H100-class GPU


def test_prompts_per_task(params: Params) -> int | None:
    if params.coverage.max_test_prompts:
        return params.coverage.max_test_prompts
    if params.coverage.source == "hub":
        return None
    from . import coverage

    try:
        _, test = coverage.split_rows(coverage.load_rows(params), params)
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    return max(1, round(len(test) / len(params.tasks)))


def describe(params: Params) -> str:
    ft, syn, inf, ev = params.finetune, params.synthesize, params.infer, params.evaluate
    tasks, models, volumes, judges = params.tasks, ft.base_models, ft.volumes, params.judges
    lines = ["Grid:"]
    lines.append(f"  tasks ({len(tasks)}): {', '.join(tasks)}")
    lines.append(f"  local models ({len(models)}): {', '.join(models)}")
    lines.append(f"  volumes ({len(volumes)}): {', '.join(str(v) for v in volumes)} (+ the base model as volume 0)")
    lines.append(f"  judges ({len(judges)}): {', '.join(j.label for j in judges)}")
    lines.append(f"  = {len(tasks) * len(models) * len(volumes)} adapters to train; "
                 f"{len(tasks) * len(models) * (len(volumes) + 1) * len(judges)} (task, model, volume, judge) cells to judge")
    synth_calls = len(tasks) * math.ceil(syn.samples_per_task / (syn.pairs_per_call * (1 - syn.expected_loss)))
    n_test = test_prompts_per_task(params)
    lines.append("Service-LLM calls (first pass, before retries and re-asks):")
    lines.append(f"  synthesize: {synth_calls:,} calls to {params.service.label}")
    cost = _cost(params.service, synth_calls * SYNTH_INPUT_TOKENS, synth_calls * syn.pairs_per_call * SYNTH_OUTPUT_TOKENS_PER_PAIR)
    total_cost = cost
    if n_test is None:
        lines.append("  evaluate: unknown number of test prompts (set coverage.max_test_prompts for an estimate)")
        judge_calls = None
    else:
        answers = len(tasks) * len(models) * (len(volumes) + 1) * n_test * inf.k
        judge_calls = answers * ev.m
        lines.append(f"  evaluate: {answers:,} answers ({n_test} test prompts/task × K={inf.k}) × M={ev.m} = {judge_calls:,} calls per judge")
        for judge in judges:
            total_cost += _cost(judge, judge_calls * JUDGE_INPUT_TOKENS, judge_calls * JUDGE_OUTPUT_TOKENS)
    samples = sum(volumes) * ft.num_train_epochs * len(tasks) * len(models)
    lines.append(f"Fine-tuning: {samples:,.0f} training samples in all ≈ {samples / GPU_SAMPLES_PER_SECOND / 3600:,.1f} GPU-hours "
                 f"(assuming {GPU_SAMPLES_PER_SECOND} samples/s per GPU)")
    lines.append(f"Estimated service-LLM cost: ${total_cost:,.2f} (price table in params; assumes ~{SYNTH_INPUT_TOKENS}+"
                 f"{SYNTH_OUTPUT_TOKENS_PER_PAIR}/pair tokens per synthesis call, ~{JUDGE_INPUT_TOKENS}+{JUDGE_OUTPUT_TOKENS} per judgement)")
    return "\n".join(lines)


def _cost(service, input_tokens: float, output_tokens: float) -> float:
    return (input_tokens * service.price_input_per_mtok + output_tokens * service.price_output_per_mtok) / 1e6
