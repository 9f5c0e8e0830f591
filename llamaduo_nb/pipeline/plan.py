"""`llamaduo run --dry-run`: the experiment grid a params file implies, its service-LLM calls and cost,
before anything runs."""

from __future__ import annotations

import math

from llamaduo_nb.methods import planning, verdict
from llamaduo_nb.core import execution
from llamaduo_nb.core.params import Params
from llamaduo_nb.stages.synthesize import PROBE_CALLS, ROUND_GROWTH
from llamaduo_nb.stages import coverage
from llamaduo_nb.stages.evaluate import verdict_rule
from llamaduo_nb.pipeline.search import synthesis_target

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

    try:
        _, test = coverage.split_rows(coverage.load_rows(params), params)
    except Exception:  # noqa: BLE001 - an estimate only
        return None
    return max(1, round(len(test) / len(params.tasks)))


def describe(family: Params | list[Params], gpus: int | None = None, pilot_sd: float | None = None, pilot_source: str = "") -> str:
    """The grid, the calls and the cost a params file implies (a list: a sweep over service LLMs); with `gpus`,
    how many fine-tuning units run at once on that many GPUs and the wall time it implies. `pilot_sd`: the spread
    of per-prompt differences of an earlier run of the same params, for the planner (else its stated default)."""
    family = family if isinstance(family, list) else [family]
    params = family[0]
    ft, syn, inf, ev, cyc = params.finetune, params.synthesize, params.infer, params.evaluate, params.cycle
    tasks, models, volumes, judges = params.tasks, ft.base_models, ft.volumes, params.judges
    services = [p.service for p in family]
    lines = ["Grid:"]
    lines.append(f"  service LLMs ({len(services)}): {', '.join(s.label for s in services)}"
                 + ("  (each synthesises its own data: one run folder each)" if len(services) > 1 else ""))
    lines.append(f"  tasks ({len(tasks)}): {', '.join(tasks)}")
    lines.append(f"  local models ({len(models)}): {', '.join(models)}")
    lines.append(f"  volumes ({len(volumes)}): {', '.join(_volume(v) for v in volumes)} (+ the base model as volume 0)")
    judge_labels = sorted({j.label for p in family for j in p.judges})
    lines.append(f"  judges ({len(judge_labels)}): {', '.join(judge_labels)}")
    adapters = len(services) * len(tasks) * len(models) * len(volumes)
    cells = sum(len(tasks) * len(models) * (len(volumes) + 1) * len(p.judges) for p in family)
    lines.append(f"  = {'at most ' if ft.search else ''}{adapters} adapters to train; {cells} (service LLM, task, model, volume, judge) "
                 f"cells to judge" + (" (the volume search stops earlier: below)" if ft.search else ""))
    if cyc.max_cycles > 1:
        step = cyc.step or syn.samples_per_task
        lines.append(f"  cycle: up to {cyc.max_cycles} cycles until {cyc.target}; each later cycle adds {step:,} pairs per task "
                     f"and trains one adapter per (task, model) on all pairs so far")
    synth_per_task = math.ceil(syn.samples_per_task / (syn.pairs_per_call * (1 - syn.expected_loss)))
    n_test = test_prompts_per_task(params)
    lines.append("Service-LLM calls (first pass, before retries and re-asks):")
    total_cost, total_calls = 0.0, 0
    for p in family:
        calls = len(tasks) * synth_per_task
        cost = _cost(p.service, calls * SYNTH_INPUT_TOKENS, calls * syn.pairs_per_call * SYNTH_OUTPUT_TOKENS_PER_PAIR)
        # a probe round, then each round at most ROUND_GROWTH times the one before: the geometric sum is the worst case
        per_task_worst = sum(PROBE_CALLS * ROUND_GROWTH ** r for r in range(syn.max_rounds))
        worst = len(tasks) * per_task_worst
        lines.append(f"  synthesize: {calls:,} calls to {p.service.label} (${cost:,.2f}); at most {worst:,} if the yield is low "
                     f"(a probe of ≤ {PROBE_CALLS} calls per task, then {syn.max_rounds - 1} rounds of ≤ ×{ROUND_GROWTH} the one before; "
                     f"answers unusable call after call stop it within tens of calls)")
        if synth_per_task > per_task_worst:
            lines.append(f"  ! synthesize.max_rounds = {syn.max_rounds} reaches at most {per_task_worst:,} calls per task, fewer than the "
                         f"{synth_per_task:,} the target needs: raise synthesize.max_rounds")
        total_calls += calls
        total_cost += cost
    if n_test is None:
        per_prompt = len(tasks) * (len(models) * (len(volumes) + 1) + (1 if ev.service_answers else 0)) * inf.k * ev.m
        lines.append(f"  evaluate: {per_prompt:,} calls per judge for each test prompt per task (the Hub test split's size is "
                     f"known once loaded; set coverage.max_test_prompts for a total)")
        for judge in judges:
            cost = _cost(judge, per_prompt * JUDGE_INPUT_TOKENS, per_prompt * JUDGE_OUTPUT_TOKENS)
            lines.append(f"    judge {judge.label}: ${cost:,.2f} per test prompt per task")
    else:
        own = len(tasks) * n_test * inf.k if ev.service_answers else 0  # the service LLM answers too, judged like a volume
        answers = len(tasks) * len(models) * (len(volumes) + 1) * n_test * inf.k + own
        judge_calls = answers * ev.m
        lines.append(f"  evaluate: {answers:,} answers ({n_test} test prompts/task × K={inf.k}"
                     + (f", {own:,} of them the service LLM's own" if own else "") + f") × M={ev.m} = {judge_calls:,} calls per judge"
                     + (", per service LLM's run" if len(family) > 1 else ""))
        baselines = 2 if ev.service_answers else 1  # each tuned answer against the base model's and the service LLM's
        pair_calls = 2 * baselines * len(tasks) * len(models) * len(volumes) * n_test * inf.k if ev.pairwise else 0  # both orders
        for p in family:
            if own:
                cost = _cost(p.service, own * SYNTH_INPUT_TOKENS, own * inf.max_new_tokens)
                lines.append(f"    service {p.service.label} answers the test prompts: {own:,} calls (${cost:,.2f} at most)")
                total_calls += own
                total_cost += cost
            for judge in p.judges:
                cost = _cost(judge, judge_calls * JUDGE_INPUT_TOKENS, judge_calls * JUDGE_OUTPUT_TOKENS)
                pair_cost = _cost(judge, pair_calls * JUDGE_INPUT_TOKENS, pair_calls * JUDGE_OUTPUT_TOKENS)
                extra = f" + {pair_calls:,} pairwise calls (${pair_cost:,.2f})" if pair_calls else ""
                lines.append(f"    judge {judge.label}: {judge_calls:,} calls (${cost:,.2f}){extra}")
                total_calls += judge_calls + pair_calls
                total_cost += cost + pair_cost
    lines.append(f"  total: {total_calls:,} calls in the first cycle" + ("" if n_test else " (synthesis only; judging scales with the test split)"))
    if cyc.max_cycles > 1:
        step = cyc.step or syn.samples_per_task
        later_synth = len(tasks) * math.ceil(step / (syn.pairs_per_call * (1 - syn.expected_loss)))
        later_judge = len(tasks) * len(models) * inf.k * ev.m * len(judges)  # one new adapter per (task, model); the base is cached
        judged = f"{later_judge * n_test:,} judge calls" if n_test else f"{later_judge:,} judge calls per test prompt per task"
        lines.append(f"  each later cycle: ~{later_synth:,} synthesis + {judged} per service LLM (at most {cyc.max_cycles - 1} later cycles)")
    if params.deploy.enabled:  # one exported cell per (task, local model) unless named; its served answers judged again
        exported = len(params.deploy.cells) or len(tasks) * len(models)
        per_judge = exported * inf.k * ev.m * n_test if (params.deploy.parity and n_test) else 0
        parity_cost = sum(_cost(j, per_judge * JUDGE_INPUT_TOKENS, per_judge * JUDGE_OUTPUT_TOKENS) for j in judges)
        lines.append(f"  deploy: {exported} cell(s) exported (merged model + {params.deploy.quantization} GGUF)"
                     + (f"; parity check: {per_judge:,} calls per judge (${parity_cost:,.2f})" if per_judge else ""))
        total_calls += per_judge * len(judges)
        total_cost += parity_cost

    rule = verdict_rule(params)
    lines.append("Verdict: " + verdict.rule_line(rule))
    lines.append("  " + planning.planner_line(rule, pilot_sd, n_test, pilot_source))
    samples = sum(volumes) * ft.num_train_epochs * len(tasks) * len(models) * len(services)
    lines.append(f"Fine-tuning: {samples:,.0f} training samples in all ≈ {samples / GPU_SAMPLES_PER_SECOND / 3600:,.1f} GPU-hours "
                 f"(assuming {GPU_SAMPLES_PER_SECOND} samples/s per GPU)")
    unit_hours = [v * ft.num_train_epochs / GPU_SAMPLES_PER_SECOND / 3600 for v in volumes] * (len(tasks) * len(models) * len(services))
    lines += execution.describe(params.execution, unit_hours, gpus)
    if ft.search:
        lines += search_plan(family)
    lines.append(f"Estimated service-LLM cost: ${total_cost:,.2f} (price table in params; assumes ~{SYNTH_INPUT_TOKENS}+"
                 f"{SYNTH_OUTPUT_TOKENS_PER_PAIR}/pair tokens per synthesis call, ~{JUDGE_INPUT_TOKENS}+{JUDGE_OUTPUT_TOKENS} per judgement)")
    capped = {s.label: s for p in family for s in [p.service] + p.judges if s.max_cost_usd}
    if capped:
        lines.append("Cost caps per stage (max_cost_usd of each service, shared by every client a stage builds for it, checked "
                     "before each request against the spend so far plus a bound of the requests in flight: 1 token per "
                     "prompt byte + max_new_tokens):")
        for label, s in sorted(capped.items()):
            synth = _cost(s, SYNTH_INPUT_TOKENS, syn.pairs_per_call * SYNTH_OUTPUT_TOKENS_PER_PAIR)
            judge = _cost(s, JUDGE_INPUT_TOKENS, JUDGE_OUTPUT_TOKENS)
            allows = [f"≈ {s.max_cost_usd / synth:,.0f} synthesis calls" if synth else "",
                      f"≈ {s.max_cost_usd / judge:,.0f} judgements" if judge else ""]
            lines.append(f"  {label}: ${s.max_cost_usd:g} per stage allows {' or '.join(a for a in allows if a) or 'any number of calls (no price set)'}")
    run_caps = sorted({p.cycle.max_cost_usd for p in family if p.cycle.max_cost_usd})
    if run_caps:
        lines.append(f"Run-wide cost cap (cycle.max_cost_usd, enforced while calls are in flight, counting every stage and cycle): "
                     f"{', '.join(f'${c:g}' for c in run_caps)}")
    return "\n".join(lines)


def search_plan(family: list[Params]) -> list[str]:
    """The volume search against the full sweep: adapters, GPU-hours and synthesis calls per (task, local model) for
    each place the answer could be, and their mean over those places taken as equally likely."""

    params = family[0]
    ft, syn = params.finetune, params.synthesize
    cells = len(params.tasks) * len(ft.base_models) * len(family)
    per_call = syn.pairs_per_call * (1 - syn.expected_loss)
    hours = lambda vs: sum(vs) * ft.num_train_epochs / GPU_SAMPLES_PER_SECOND / 3600  # noqa: E731
    calls = lambda v: math.ceil(synthesis_target(params, v) / per_call)  # noqa: E731 - per task
    grid = list(ft.volumes)
    sweep = (len(grid), hours(grid), calls(max(grid)))
    outcomes = []  # (label, adapters, GPU-hours, synthesis calls) per (task, local model)
    for j, volume in enumerate(grid):
        outcomes.append((_volume(volume), j + 1, hours(grid[: j + 1]), calls(volume)))
    outcomes.append(("none", *sweep))
    lines = ["Volume search (finetune.volumes: search): smallest volume first, stopping at the first not worse; "
             "per (task, local model), if the answer is:"]
    for label, adapters, h, c in outcomes:
        lines.append(f"  {label:>5}: {adapters} adapter{'s' if adapters != 1 else ''}, {h:,.1f} GPU-hours, {c:,} synthesis calls per task")
    mean = [sum(o[i] for o in outcomes) / len(outcomes) for i in (1, 2, 3)]
    lines.append(f"  expected (the answer equally likely at any volume or none): {mean[0]:.1f} adapters and {mean[1]:,.1f} GPU-hours "
                 f"per (task, local model), × {cells} = {mean[1] * cells:,.1f} GPU-hours against the full sweep's "
                 f"{sweep[1] * cells:,.1f} (saving {1 - mean[1] / sweep[1]:.0%}); {mean[2]:,.0f} synthesis calls per task against "
                 f"{sweep[2]:,} (saving {1 - mean[2] / sweep[2]:.0%}). Worst case: the sweep's {sweep[0]} adapters per (task, local model)")
    return lines


def _volume(v: int) -> str:
    return f"{v // 1024}k" if v >= 1024 and v % 1024 == 0 else str(v)


def _cost(service, input_tokens: float, output_tokens: float) -> float:
    return (input_tokens * service.price_input_per_mtok + output_tokens * service.price_output_per_mtok) / 1e6
