"""Results you can trust after any change: the change matrix on one finished tiny run.

One tiny run (2 tasks × 2 local models × volumes 2 and 4, K = 1, M = 1) is built once per module, in
process (the same stage functions the notebooks call, without a kernel per stage) with the OpenAI
emulator as service LLM and judge, so that only fine-tuning and answering use the real local model.
Each case copies it, changes one setting, runs again with a bare `--force`, and checks by content:
which units were redone (an adapter's or answer file's record carries a new unit id; a judgement is a
request the emulator answered), which were reused (same unit id), and that metrics.csv, pairwise.csv,
the figures and the answer browser hold exactly the cells of the current grid. Operational settings
change nothing at all.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from llamaduo_nb.core.io import read_json, read_jsonl, write_jsonl
from llamaduo_nb.core.models import resolve
from llamaduo_nb.pipeline import runner
from llamaduo_nb.core.params import BUNDLED_COVERAGE
from tests.emulators.openai_emulator import OpenAIEmulator

pytestmark = [pytest.mark.slow, pytest.mark.emulator]

SMOL = "smollm2-135m-instruct"


def _second_model() -> str:
    """A second local model for the grid: the same packaged GGUF named by its path (a distinct cell, no extra download)."""
    src = resolve(SMOL)
    return str(Path(src.location) / src.gguf_file)


def service_reply(ctx) -> str:
    """Synthesis prompts get `n` pairs, judge prompts scores, pairwise prompts a verdict; all a function of the
    request text alone, so a repeated request gets the same answer."""
    text = ctx.prompt
    digest = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
    if "similarity_assessment" in text:
        score = 20 + digest % 70
        return json.dumps({"similarity_assessment": {"score": score, "reason": "r"}, "precision_assessment": {"score": score, "reason": "r"}})
    if '"winner"' in text:
        return json.dumps({"winner": "AB"[digest % 2], "reason": "r"})
    n = int(m.group(1)) if (m := re.search(r"Write (\d+) new", text)) else 1
    words = hashlib.sha256(text.encode()).hexdigest()
    return json.dumps({"contents": [{"instruction": f"What is item {words[i * 6:(i + 1) * 6]} in the list of {words[40:48]}?",
                                     "response": f"It is {words[(i + 2) * 5:(i + 3) * 5]}, a {words[50:56]} colour."} for i in range(n)]})


@pytest.fixture(scope="module")
def emulator():
    emu = OpenAIEmulator(reply=service_reply).start()
    yield emu
    emu.stop()


def params_text(emulator_url: str, coverage_path: Path) -> str:
    return f"""\
run_name: matrix
seed: 42
tasks: [closed_qa, summarization]
coverage: {{source: file, path: {coverage_path}, max_test_prompts: 2}}
service: {{backend: openai, model: emu-service, base_url: "{emulator_url}", max_retries: 0, max_reasks: 0, max_concurrency: 4}}
synthesize: {{samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 256}}
deduplicate: {{rouge_l_threshold: 0.7}}
finetune:
  base_models: [{SMOL}, {_second_model()}]
  volumes: [2, 4]
  quantization: none
  max_length: 96
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
  max_steps: 1
  warmup_ratio: 0.0
  learning_rate: 1.0e-3
  lora: {{r: 4, alpha: 8, target_modules: [q_proj, v_proj]}}
infer: {{k: 1, max_new_tokens: 6, batch_size: 2, temperature: 0.7}}
evaluate: {{m: 1, bootstrap: 20, reference_metrics: false, pairwise: true}}
"""


def coverage_rows() -> list[dict]:
    return [r for r in read_jsonl(BUNDLED_COVERAGE) if r["category"] in ("Closed QA", "Summarize")]


def run(params_file: Path, run_dir: Path, *overrides: str, force=("",)):
    logs: list[str] = []
    runner.run(params_file, run_dir, list(overrides), force=list(force), log=logs.append, execute=runner.execute_in_process)
    return logs


@pytest.fixture(scope="module")
def finished(emulator, tmp_path_factory):
    """(params file, run folder, coverage file) of one finished tiny run, shared by every case."""
    base = tmp_path_factory.mktemp("matrix")
    cov = base / "coverage.jsonl"
    write_jsonl(cov, coverage_rows())
    params_file = base / "params.yaml"
    params_file.write_text(params_text(emulator.url, cov))
    run_dir = base / "run"
    run(params_file, run_dir, force=())
    return params_file, run_dir, cov


def snapshot(run_dir: Path) -> dict:
    """unit → its record's unit id: every adapter and answer file, and each stage's completion."""
    out = {}
    for record in run_dir.glob("finetune/*/*/*/UNIT.json"):
        r = read_json(record)
        out[("adapter", r["task"], r["local_model"], int(r["volume"]))] = r["unit_id"]
    for record in run_dir.glob("infer/*/*/*.jsonl.unit.json"):
        r = read_json(record)
        out[("answers", r["task"], r["local_model"], int(r["volume"]))] = r["unit_id"]
    for done in run_dir.glob("*/DONE.json"):
        out[("stage", done.parent.name)] = read_json(done)["completion_id"]
    return out


def redone(before: dict, after: dict, kind: str) -> set:
    return {k[1:] for k, v in after.items() if k[0] == kind and before.get(k) != v}


def kept(before: dict, after: dict, kind: str) -> set:
    return {k[1:] for k, v in after.items() if k[0] == kind and before.get(k) == v}


@pytest.fixture
def case(finished, tmp_path, emulator):
    """A copy of the finished run and a function that changes its params and runs with a bare --force."""
    params_file, source, cov = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = snapshot(run_dir)

    def apply(*overrides, params_text_edit=None, force=("",)):
        pfile = params_file
        if params_text_edit:
            pfile = tmp_path / "params.yaml"
            pfile.write_text(params_text_edit(params_file.read_text()))
        calls_before = emulator.stats.total
        logs = run(pfile, run_dir, *overrides, force=force)
        return {"after": snapshot(run_dir), "calls": emulator.stats.total - calls_before, "logs": logs, "params_file": pfile}

    return run_dir, before, apply



def models() -> set:
    from llamaduo_nb.core.models import short_name

    return {SMOL, short_name(_second_model())}


def grid(tasks=("closed_qa", "summarization"), volumes=(2, 4), local_models=None) -> set:
    return {(t, m, v) for t in tasks for m in (local_models or models()) for v in volumes}


def assert_reports_exactly(run_dir: Path, cells: set, k: int = 1, m: int = 1, prompts: int = 2) -> None:
    """metrics.csv, pairwise.csv, the report's table and the answer browser hold the current grid's cells, no other."""
    from llamaduo_nb import widgets

    metrics = pd.read_csv(run_dir / "metrics.csv")
    tuned = {(r.task, r.local_model, int(r.volume)) for r in metrics.itertuples() if r.volume > 0}
    assert tuned == cells
    base = {(r.task, r.local_model) for r in metrics.itertuples() if r.volume == 0}
    assert base == {(t, mo) for t, mo, _ in cells}
    assert (metrics["n"] == prompts * k).all()
    pair = pd.read_csv(run_dir / "pairwise.csv")
    assert {(r.task, r.local_model, int(r.volume)) for r in pair.itertuples()} == cells
    table = pd.read_csv(run_dir / "report" / "metrics_table.csv")
    assert {(r.task, r.local_model, int(r.volume)) for r in table.itertuples() if r.volume > 0} == cells
    judgements, responses = widgets.load_answers(run_dir)
    assert {(r.task, r.local_model, int(r.volume)) for r in responses.itertuples() if r.volume > 0} == cells
    assert len(judgements) == len(responses) * m


# -- the finished run itself ----------------------------------------------------------------------------


def test_the_finished_run_reports_its_grid_and_a_rerun_changes_nothing(finished, emulator, tmp_path):
    params_file, source, _ = finished
    assert_reports_exactly(source, grid())
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    before = snapshot(run_dir)
    manifest = read_json(run_dir / "manifest.json")
    invocations = read_jsonl(run_dir / "invocations.jsonl")
    calls = emulator.stats.total
    logs = run(params_file, run_dir, force=())
    assert snapshot(run_dir) == before and emulator.stats.total == calls
    stage_lines = [line for line in logs if re.match(r"^\[(coverage|synthesize|deduplicate|finetune|infer|evaluate|report)\]", line)]
    assert len(stage_lines) == 7 and all("up to date" in line for line in stage_lines), stage_lines
    # the command joins the history of invocations; the manifest (the code each stage was made by) is left as it was
    history = read_jsonl(run_dir / "invocations.jsonl")
    assert history[:-1] == invocations and history[-1]["arguments"] == [str(params_file)] and history[-1]["code"]["llamaduo-nb"]
    assert read_json(run_dir / "manifest.json") == manifest
    assert read_json(next(run_dir.glob("finetune/*/*/*/UNIT.json")))["code"]["llamaduo-nb"]  # and every unit


def test_a_changed_base_model_file_retrains_and_reanswers_that_model_only(case):
    """The second local model is a GGUF named by its path: a file with another size or time is another model."""
    import os

    run_dir, before, apply = case
    path = Path(_second_model())
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        after = apply()["after"]
    finally:
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second = {m for m in models() if m != SMOL}
    assert redone(before, after, "adapter") == grid(local_models=second)
    assert redone(before, after, "answers") == grid(local_models=second) | {(t, m, 0) for t in ("closed_qa", "summarization") for m in second}
    assert kept(before, after, "adapter") == grid(local_models={SMOL})
    assert_reports_exactly(run_dir, grid())


# -- operational settings change nothing --------------------------------------------------------------------


@pytest.mark.parametrize("override", [
    "service.requests_per_minute=600", "service.max_concurrency=2", "service.price_input_per_mtok=2.5",
    "service.api_key_env=SOME_KEY_NAME", "service.timeout_s=30", "service.max_retries=3", "run_name=renamed",
])
def test_operational_settings_change_nothing(case, override, monkeypatch):
    run_dir, before, apply = case
    monkeypatch.setenv("SOME_KEY_NAME", "sk-unused")
    # params.yaml records the new operational value, invocations.jsonl the command; no output changes
    # (SQLite's `-shm` is the WAL's shared-memory index, rebuilt by any reader of the cache: no data in it)
    files = {p: p.read_bytes() for p in run_dir.rglob("*")
             if p.is_file() and p.name not in ("invocations.jsonl", "params.yaml") and not p.name.endswith("-shm")}
    result = apply(override, force=())  # no --force needed: nothing that changes outputs changed
    assert result["after"] == before and result["calls"] == 0
    assert {p: p.read_bytes() for p in files} == files


# -- settings that change outputs: exactly the dependent units are redone -------------------------------------


def test_coverage_file_content_rejudges_without_retraining(case, finished):
    """A test reference edited: the split is redone and every answer judged again; adapters and answers stay."""
    run_dir, before, apply = case
    _, _, cov = finished
    rows = coverage_rows()
    test_rows = [r for r in rows if r["category"] == "Closed QA" and r.get("split") == "test"]
    target = test_rows[0]["prompt_id"]
    for r in rows:
        if r["prompt_id"] == target:
            r["messages"] = [m if m["role"] != "assistant" else dict(m, content=m["content"] + " (edited)") for m in r["messages"]]
    edited = run_dir.parent / "coverage-edited.jsonl"
    write_jsonl(edited, rows)
    result = apply(f"coverage.path={edited}")
    after = result["after"]
    assert ("coverage",) in redone(before, after, "stage") and ("evaluate",) in redone(before, after, "stage")
    assert redone(before, after, "adapter") == set() and redone(before, after, "answers") == set()
    assert result["calls"] > 0  # the edited reference's answers are judged again (the rest come from the cache)
    assert_reports_exactly(run_dir, grid())


@pytest.mark.long
def test_seed_redoes_everything(case):
    run_dir, before, apply = case
    after = apply("seed=7")["after"]
    assert redone(before, after, "adapter") == grid()
    assert redone(before, after, "answers") == grid() | {(t, mo, 0) for t, mo, _ in grid()}
    assert_reports_exactly(run_dir, grid())


def test_synthesis_prompt_file_redoes_synthesis_and_everything_trained_on_it(case):
    run_dir, before, apply = case
    prompt = (Path(runner.PROJECT_ROOT) / "params" / "prompts" / "synthesize.yaml").read_text()
    edited = run_dir.parent / "synthesize-v2.yaml"
    edited.write_text(prompt.replace("Write {n} new", "Please write {n} new", 1))
    result = apply(f"synthesize.prompt={edited}")
    after = result["after"]
    assert {("synthesize",), ("deduplicate",), ("finetune",)} <= redone(before, after, "stage")
    assert redone(before, after, "adapter") == grid()
    assert kept(before, after, "answers") == {(t, mo, 0) for t, mo, _ in grid()}  # the base model's answers stay
    assert_reports_exactly(run_dir, grid())


def test_more_samples_per_task_keeps_the_adapters_of_the_same_pairs(case):
    run_dir, before, apply = case
    result = apply("synthesize.samples_per_task=6")
    after = result["after"]
    assert ("synthesize",) in redone(before, after, "stage")
    # a volume trains on the first pairs in synthesis order: more pairs after them leave its data, and so the adapter, as it was
    assert redone(before, after, "adapter") == set()
    assert_reports_exactly(run_dir, grid())


def test_dedup_threshold_that_keeps_the_same_pairs_retrains_nothing(case):
    run_dir, before, apply = case
    kept_before = (run_dir / "deduplicate" / "kept.jsonl").read_bytes()
    after = apply("deduplicate.rouge_l_threshold=0.95")["after"]
    assert ("deduplicate",) in redone(before, after, "stage")
    assert (run_dir / "deduplicate" / "kept.jsonl").read_bytes() == kept_before
    assert redone(before, after, "adapter") == set() and redone(before, after, "answers") == set()


def trained_on(run_dir: Path) -> dict:
    """adapter cell → the content fingerprint of the pairs it trained on (from its record)."""
    return {(r["task"], r["local_model"], int(r["volume"])): r["made_from"]["pairs"]
            for r in map(read_json, run_dir.glob("finetune/*/*/*/UNIT.json"))}


def test_dedup_threshold_that_removes_pairs_retrains_exactly_the_adapters_whose_pairs_changed(case):
    run_dir, before, apply = case
    pairs_before = trained_on(run_dir)
    kept_before = len(read_jsonl(run_dir / "deduplicate" / "kept.jsonl"))
    after = apply("deduplicate.rouge_l_threshold=0.3", "deduplicate.lsh_threshold=0.2")["after"]
    assert ("deduplicate",) in redone(before, after, "stage")
    assert len(read_jsonl(run_dir / "deduplicate" / "kept.jsonl")) < kept_before
    pairs_after = trained_on(run_dir)
    changed = {cell for cell, fp in pairs_after.items() if pairs_before.get(cell) != fp}
    assert changed and redone(before, after, "adapter") == changed
    assert kept(before, after, "adapter") == set(pairs_after) - changed
    assert_reports_exactly(run_dir, set(pairs_after))


# one setting of each family in `make test`, the others in `make test-long` (each retrains the whole grid: ~30 s)
@pytest.mark.parametrize("override", [pytest.param("finetune.learning_rate=5.0e-4", marks=pytest.mark.long), "finetune.lora.r=2"])
def test_training_settings_retrain_and_reanswer_every_adapter(case, override):
    run_dir, before, apply = case
    after = apply(override)["after"]
    assert redone(before, after, "adapter") == grid()
    base = {(t, mo, 0) for t, mo, _ in grid()}
    assert redone(before, after, "answers") == grid()  # answers of the new adapters, never of the old ones
    assert kept(before, after, "answers") == base
    assert_reports_exactly(run_dir, grid())


def test_volumes_changed_trains_only_the_new_volume_and_sets_the_dropped_one_aside(case, capsys):
    run_dir, before, apply = case
    result = apply("finetune.volumes=[2,3]")
    after = result["after"]
    assert redone(before, after, "adapter") == grid(volumes=(3,))
    assert kept(before, after, "adapter") == grid(volumes=(2,))
    assert not list(run_dir.glob("finetune/*/*/4")) and not list(run_dir.glob("infer/*/*/4.jsonl"))
    assert list((run_dir / "orphaned").rglob("UNIT.json")), "the dropped adapters are kept out of the way"
    assert "no longer in the grid" in capsys.readouterr().out  # said on the console
    assert_reports_exactly(run_dir, grid(volumes=(2, 3)))


def test_dropping_a_model_is_not_judged_or_reported(case):
    run_dir, before, apply = case
    result = apply(f"finetune.base_models=[{SMOL}]")
    after = result["after"]
    assert redone(before, after, "adapter") == set() and redone(before, after, "answers") == set()
    assert result["calls"] == 0  # the remaining answers' judgements come from the cache
    assert_reports_exactly(run_dir, grid(local_models={SMOL}))


def test_dropping_a_task_is_not_judged_or_reported(case):
    run_dir, before, apply = case
    result = apply("tasks=[closed_qa]")
    after = result["after"]
    assert redone(before, after, "adapter") == set() and redone(before, after, "answers") == set()
    assert result["calls"] == 0
    assert_reports_exactly(run_dir, grid(tasks=("closed_qa",)))


@pytest.mark.parametrize("override", ["infer.k=2"] + [pytest.param(o, marks=pytest.mark.long)
                                                    for o in ("infer.temperature=0.3", "infer.max_new_tokens=8", "infer.batch_size=1")])
def test_inference_settings_reanswer_every_file(case, override):
    run_dir, before, apply = case
    after = apply(override)["after"]
    everything = grid() | {(t, mo, 0) for t, mo, _ in grid()}
    assert redone(before, after, "adapter") == set()
    assert redone(before, after, "answers") == everything
    answers = [read_jsonl(p) for p in run_dir.glob("infer/*/*/*.jsonl")]
    k = 2 if override == "infer.k=2" else 1
    assert all(sorted({r["k"] for r in rows}) == list(range(k)) and len(rows) == 2 * k for rows in answers)
    assert_reports_exactly(run_dir, grid(), k=k)


@pytest.mark.parametrize("override", ["evaluate.m=2", "JUDGE_PROMPT", "JUDGES"])
def test_judging_settings_rejudge_only(case, override):
    run_dir, before, apply = case
    m = 1
    if override == "JUDGE_PROMPT":
        prompt = (Path(runner.PROJECT_ROOT) / "params" / "prompts" / "judge.yaml").read_text()
        edited = run_dir.parent / "judge-v2.yaml"
        edited.write_text(prompt.replace("template: |\n", "template: |\n  Grade carefully.\n", 1))
        override = f"evaluate.prompt={edited}"
    elif override == "JUDGES":
        override = f'evaluate.judges=[{{backend: openai, model: emu-judge-2, base_url: "{runner_url(run_dir)}", max_retries: 0}}]'
    elif override == "evaluate.m=2":
        m = 2
    result = apply(override)
    after = result["after"]
    assert redone(before, after, "adapter") == set() and redone(before, after, "answers") == set()
    assert ("evaluate",) in redone(before, after, "stage") and result["calls"] > 0
    judges = set(pd.read_csv(run_dir / "metrics.csv")["judge"])
    assert judges == ({"openai:emu-judge-2"} if "emu-judge-2" in override else {"openai:emu-service"})
    assert_reports_exactly(run_dir, grid(), m=m)


def runner_url(run_dir: Path) -> str:
    return read_json_yaml(run_dir / "params.yaml")["service"]["base_url"]


def read_json_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


# -- --force means one thing ------------------------------------------------------------------------------------


def test_force_a_stage_redoes_its_units_and_what_depends_on_them(case):
    run_dir, before, apply = case
    after = apply(force=("finetune",))["after"]
    assert redone(before, after, "adapter") == grid()
    assert redone(before, after, "answers") == grid() | {(t, mo, 0) for t, mo, _ in grid()}
    assert {("finetune",), ("infer",), ("evaluate",), ("report",)} <= redone(before, after, "stage")
    assert {("coverage",), ("synthesize",), ("deduplicate",)} & redone(before, after, "stage") == set()


def test_changed_params_without_force_are_refused(case):
    from llamaduo_nb.core.errors import UserError

    run_dir, before, apply = case
    with pytest.raises(UserError, match=r"infer\.k: 1 → 2"):
        apply("infer.k=2", force=())
    assert snapshot(run_dir) == before


def test_a_run_folder_of_the_earlier_layout_is_refused_with_one_line(tmp_path, finished):
    from llamaduo_nb import cli

    params_file, _, _ = finished
    old = tmp_path / "old"
    (old / "synth").mkdir(parents=True)
    (old / "models").mkdir()
    code = cli.main(["run", str(params_file), "--run-dir", str(old)])
    assert code == 2
    assert sorted(p.name for p in old.iterdir()) == ["models", "synth"]  # nothing written


def test_opening_the_report_notebook_on_a_finished_run_changes_no_file(finished, tmp_path):
    """Notebook 08 executed by hand (papermill, as JupyterLab would) on a finished run: every file byte-identical."""
    import papermill as pm

    params_file, source, _ = finished
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    pm.execute_notebook(str(runner.NOTEBOOK_DIR / "08_report.ipynb"), str(tmp_path / "07.ipynb"),
                        parameters={"params_file": str(run_dir / "params.yaml"), "run_dir": str(run_dir)},
                        kernel_name="python3", cwd=str(runner.NOTEBOOK_DIR), progress_bar=False)
    now = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in run_dir.rglob("*") if p.is_file()}
    assert now == files
