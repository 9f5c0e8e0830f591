"""The volume search (`finetune.volumes: search`): its params, its rule, its steps, data on demand and the reuse of
adapters; end to end on a tiny grid with the OpenAI emulator as service LLM and judge."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from llamaduo_nb.stages import evaluate
from llamaduo_nb.core.io import read_json, read_jsonl, write_jsonl
from llamaduo_nb.methods import verdict
from llamaduo_nb.methods.near_duplicates import deduplicate
from llamaduo_nb.pipeline import runner, search
from llamaduo_nb.core.params import PROJECT_ROOT, DeduplicateParams
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.stages.finetune import training_order

QUICK = PROJECT_ROOT / "params" / "quickstart.yaml"


def quick(*sets):
    return load_params(QUICK, list(sets))


# -- params ----------------------------------------------------------------------------------------------------------
def test_volumes_search_is_a_shorthand_for_the_search_over_a_grid():
    paper = load_params(PROJECT_ROOT / "params" / "paper.yaml", ["finetune.volumes=search"])
    assert paper.finetune.search and paper.finetune.volumes == [1024 * 2**n for n in range(9)]
    small = quick("finetune.volumes=search 2^2..2^4")
    assert small.finetune.search and small.finetune.volumes == [4, 8, 16]
    assert quick("finetune.search=true").finetune.volumes == [4, 16]
    assert not quick().finetune.search


def test_the_search_rule_splits_alpha_over_every_possible_look():
    rule = evaluate.verdict_rule(quick("finetune.volumes=search 2^2..2^4", "cycle.max_cycles=2"))
    assert rule.looks == 1 + 3 + 1  # the base model, three volumes, one later cycle
    assert rule.test_alpha == pytest.approx(0.025 / 5) and rule.level == pytest.approx(0.99)
    assert "α/5" in verdict.rule_line(rule) and "smallest first" in verdict.rule_line(rule)
    assert evaluate.verdict_rule(quick()).looks == 1


# -- data on demand: a volume's pairs do not change when synthesis grows ---------------------------------------------
def pair(task, call, j, text):
    return {"id": f"{task}-c1-{call:06d}-{j}", "task": task, "instruction": text, "response": f"answer to {text}"}


def test_a_volume_is_a_prefix_that_more_data_does_not_change():
    words = ["apple", "river", "stone", "cloud", "light", "paper", "green", "music", "table", "ocean", "north", "glass"]
    pairs = [pair("coding", c, j, f"describe the {words[(c * 2 + j) % 12]} and the {words[(c * 5 + j) % 12]} number {c}")
             for c in range(30) for j in range(2)]
    pairs.insert(7, dict(pairs[3], id="coding-c1-000003-9"))  # a duplicate the deduplication removes
    early, later = [p for p in pairs if int(p["id"].split("-")[2]) < 12], pairs
    cfg = DeduplicateParams()
    kept_early = deduplicate(early, cfg, progress=False).kept
    kept_later = deduplicate(later, cfg, progress=False).kept
    assert len(kept_later) > len(kept_early)
    assert [p["id"] for p in training_order(kept_later)][: len(kept_early)] == [p["id"] for p in training_order(kept_early)]
    shuffled = list(reversed(kept_later))
    assert training_order(shuffled) == training_order(kept_later)  # the order is the synthesis order, whatever the input order
    assert [p["id"] for p in training_order([pair("t", 10, 0, "a"), pair("t", 9, 1, "b"), pair("t", 9, 0, "c")])] == \
        ["t-c1-000009-0", "t-c1-000009-1", "t-c1-000010-0"]  # numeric, not text, order


def test_each_step_synthesises_for_its_largest_volume_at_the_params_headroom():
    params = quick("finetune.volumes=search 2^2..2^4", "synthesize.samples_per_task=20")  # 20 pairs for 16: ×1.25
    step = search.params_for_step(params, {"summarization": [4], "closed_qa": [4, 8]})
    assert step.synthesize.samples_by_task == {"summarization": 5, "closed_qa": 10}
    assert step.synthesize.target_for("closed_qa") == 10 and step.finetune.volumes_for("closed_qa") == [4, 8]
    assert step.finetune.volumes_for("summarization") == [4]
    assert search.synthesis_target(params, 16) == 20


# -- the steps -------------------------------------------------------------------------------------------------------
def scores_for(values: dict, prompts: int = 8, judge="local:smollm2-135m-instruct") -> pd.DataFrame:
    """Answer scores whose per-prompt means sit around values[(task, volume)] (volume -1: the service LLM)."""
    rows = []
    for (task, volume), value in values.items():
        model = "service:x" if volume == -1 else "smollm2-135m-instruct"
        for p in range(prompts):
            for k in range(2):
                rows.append({"cycle": 1, "task": task, "local_model": model, "judge": judge, "volume": max(volume, 0) if volume >= 0 else -1,
                             "metric": "precision", "prompt_id": f"{task}{p}", "k": k, "score": value + (p % 3 - 1) * 3 + k})
    return pd.DataFrame(rows)


def test_a_step_stops_a_task_at_its_first_pass_and_tries_the_next_volume_for_the_others():
    params = quick("finetune.volumes=search 2^2..2^4", "cycle.target=precision mean >= 70")
    rule = evaluate.verdict_rule(params)
    table = verdict.verdict_table(scores_for({("summarization", 0): 40, ("summarization", 4): 90,
                                              ("closed_qa", 0): 30, ("closed_qa", 4): 50}), rule, 2, 2)
    step = search.next_step(params, table, {"summarization": [4], "closed_qa": [4]})
    cells = {c["task"]: c for c in step.cells}
    assert cells["summarization"]["status"] == search.FOUND and cells["summarization"]["volume"] == 4
    assert cells["closed_qa"]["status"] == search.GOING_ON and cells["closed_qa"]["next_volume"] == 8
    assert step.next == {"summarization": [4], "closed_qa": [4, 8]} and not step.done
    final = search.next_step(params, verdict.verdict_table(scores_for({("summarization", 0): 40, ("summarization", 4): 90,
                                                                      ("closed_qa", 0): 30, ("closed_qa", 4): 50,
                                                                      ("closed_qa", 8): 55, ("closed_qa", 16): 60}), rule, 2, 2),
                             {"summarization": [4], "closed_qa": [4, 8, 16]})
    assert final.done and {c["task"]: c["status"] for c in final.cells} == {"summarization": search.FOUND, "closed_qa": search.EXHAUSTED}


def test_a_step_with_one_test_prompt_stops_instead_of_training_the_whole_grid():
    params = quick("finetune.volumes=search 2^2..2^4", "cycle.target=precision mean >= 70")
    table = verdict.verdict_table(scores_for({("closed_qa", 0): 30, ("closed_qa", 4): 50}, prompts=1), evaluate.verdict_rule(params), 2, 2)
    step = search.next_step(params.model_copy(update={"tasks": ["closed_qa"]}), table, {"closed_qa": [4]})
    assert step.done and step.cells[0]["status"] == search.CANNOT_DECIDE


def test_the_search_picks_the_first_pass_smallest_first_and_the_base_model_first_of_all():
    params = quick("finetune.volumes=search 2^2..2^4", "cycle.target=precision mean >= 70")
    rule = evaluate.verdict_rule(params)
    table = verdict.verdict_table(scores_for({("closed_qa", 0): 30, ("closed_qa", 4): 90, ("closed_qa", 8): 50,
                                              ("closed_qa", 16): 95}), rule, 2, 2)
    assert table.set_index("volume")["sequence"].to_dict() == {0: verdict.WENT_ON, 4: verdict.PASSED, 8: verdict.NOT_NEEDED,
                                                               16: verdict.NOT_NEEDED}
    assert table.loc[table["chosen"], "volume"].tolist() == [4]
    assert np.allclose(table["level"], 1 - 2 * 0.025 / 4)
    # the sweep's fixed sequence, on the same scores, stops at 8 and picks 16
    sweep = verdict.verdict_table(scores_for({("closed_qa", 0): 30, ("closed_qa", 4): 90, ("closed_qa", 8): 50,
                                              ("closed_qa", 16): 95}), evaluate.verdict_rule(quick("cycle.target=precision mean >= 70")), 2, 2)
    assert sweep.loc[sweep["chosen"], "volume"].tolist() == [16]


@pytest.mark.parametrize("seed", range(20))
def test_on_monotone_verdicts_the_search_and_the_sweep_pick_the_same_volume(seed):
    """Re-read in search order, the same cells' scores give the sweep's smallest volume whenever the verdicts (at the
    search's level) are monotone in volume: passes from some volume on."""
    rng = np.random.default_rng(seed)
    volumes = [0, 4, 8, 16, 32]
    first = int(rng.integers(0, len(volumes) + 1))  # where the passes start (len: none)
    values = {("closed_qa", v): (95.0 if i >= first else float(rng.uniform(20, 60))) for i, v in enumerate(volumes)}
    searching = evaluate.verdict_rule(quick("finetune.volumes=search 2^2..2^5", "cycle.target=precision mean >= 70"))
    import dataclasses

    sweeping = dataclasses.replace(searching, looks=1, alpha=searching.test_alpha)  # the fixed sequence at the same level
    a = verdict.verdict_table(scores_for(values), searching, 2, 2)
    b = verdict.verdict_table(scores_for(values), sweeping, 2, 2)
    assert (a["passed"].to_numpy() == b["passed"].to_numpy()).all()
    assert a.loc[a["chosen"], "volume"].tolist() == b.loc[b["chosen"], "volume"].tolist() == ([volumes[first]] if first < len(volumes) else [])


def test_the_dry_run_plans_the_search_against_the_sweep_for_the_paper_grid():
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", "params/paper.yaml", "--dry-run", "--set", "finetune.volumes=search"],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "Volume search" in out and "at most 144 adapters" in out
    assert " 256k: 9 adapters" in out and "   1k: 1 adapter," in out
    line = next(x for x in out.splitlines() if x.strip().startswith("expected"))
    assert "against the full sweep's 387.6" in line and "saving 70%" in line
    assert "each at α/12" in out


# -- end to end ------------------------------------------------------------------------------------------------------
PARAMS = """\
run_name: search
seed: 42
tasks: [closed_qa]
coverage: {{source: file, path: {coverage}, max_test_prompts: {prompts}}}
service: {{backend: openai, model: emu-service, base_url: "{url}", max_retries: 0, max_reasks: 0, max_concurrency: 4}}
synthesize: {{samples_per_task: 10, pairs_per_call: 2, max_new_tokens: 256, expected_loss: 0.0}}
finetune:
  base_models: [smollm2-135m-instruct]
  volumes: search 2^1..2^3
  quantization: none
  max_length: 96
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  max_steps: 1
  warmup_ratio: 0.0
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
infer: {{k: 1, max_new_tokens: 6, batch_size: 3}}
evaluate: {{m: 1, reference_metrics: false, pairwise: false, human_labels: null}}
cycle: {{target: "{target}"}}
"""


@pytest.fixture(scope="module")
def emulator():
    from tests.emulators.openai_emulator import OpenAIEmulator
    from tests.test_change_matrix import service_reply

    seen: list[str] = []

    def reply(ctx):
        seen.append(ctx.prompt)
        return service_reply(ctx)

    emu = OpenAIEmulator(reply=reply).start()
    emu.seen = seen  # every prompt it answered
    yield emu
    emu.stop()


def run_search(tmp: Path, emulator, target: str, prompts: int = 3) -> tuple[Path, list[str]]:
    from tests.test_change_matrix import coverage_rows

    cov = tmp / "coverage.jsonl"
    write_jsonl(cov, [r for r in coverage_rows() if r["category"] == "Closed QA"])
    params_file = tmp / "params.yaml"
    params_file.write_text(PARAMS.format(coverage=cov, url=emulator.url, target=target, prompts=prompts))
    logs: list[str] = []
    emulator.seen.clear()
    run_dir = tmp / "run"
    runner.run(params_file, run_dir, [], stages="coverage,synthesize,deduplicate,finetune,infer,evaluate,report", log=logs.append,
               execute=runner.execute_in_process)
    return run_dir, logs


@pytest.mark.slow
@pytest.mark.emulator
def test_a_search_that_never_passes_trains_every_volume_step_by_step_reusing_each_adapter(emulator, tmp_path):
    run_dir, logs = run_search(tmp_path, emulator, "precision mean >= 100")
    body = read_json(run_dir / "search.json")
    assert body["done"] and body["tried"] == {"closed_qa": [2, 4, 8]} and len(body["steps"]) == 3
    assert body["cells"][0]["status"] == search.EXHAUSTED and body["adapters"] == 3 == body["sweep_adapters"]
    assert [line for line in logs if line.startswith("[search] step")] == [
        "[search] step 1: volumes closed_qa 2", "[search] step 2: volumes closed_qa 2, 4", "[search] step 3: volumes closed_qa 2, 4, 8"]
    # each adapter was trained once: the finetune stage of steps 2 and 3 reused the earlier ones
    trained = [line for line in logs if "finetune" in line and "trained=" in line]
    runs = pd.read_csv(run_dir / "finetune" / "runs.csv").set_index("volume")
    assert sorted(runs.index) == [2, 4, 8]
    records = {v: read_json(run_dir / "finetune" / "closed_qa" / "smollm2-135m-instruct" / str(v) / "UNIT.json") for v in (2, 4, 8)}
    assert len({r["unit_id"] for r in records.values()}) == 3 and trained is not None
    # the data grew with the volume: 2·(10/8) → 3, then 5, then 10 valid pairs
    counts = pd.read_csv(run_dir / "synthesize" / "counts.csv").set_index("task")
    assert counts.loc["closed_qa", "target"] == 10
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    assert len(calls) == 5  # 10 pairs at 2 per call: the calls of earlier steps answered again, not sent twice
    assert sum("Write 2 new" in text for text in emulator.seen) == 5
    verdicts = pd.read_csv(run_dir / "report" / "verdicts.csv")
    assert set(verdicts["sequence"]) == {verdict.WENT_ON} and np.allclose(verdicts["level"], 1 - 2 * 0.025 / 4)


@pytest.mark.slow
@pytest.mark.emulator
def test_a_search_that_passes_at_once_trains_one_adapter(emulator, tmp_path):
    run_dir, logs = run_search(tmp_path, emulator, "precision mean >= 1", prompts=8)  # 8 prompts: an interval at α/4 that decides
    body = read_json(run_dir / "search.json")
    assert body["done"] and body["tried"] == {"closed_qa": [2]} and body["adapters"] == 1 and body["sweep_adapters"] == 3
    assert body["cells"][0]["status"] == search.FOUND
    assert any(line.startswith("[search] cost: 1 adapter and") for line in logs)
    verdicts = pd.read_csv(run_dir / "report" / "verdicts.csv")
    assert verdicts["chosen"].sum() == 1 and set(verdicts["volume"]) == {0, 2}
