"""End to end: `llamaduo run` executes the eight notebooks with papermill on tiny params.

One run (module-scoped) is shared by the checks; it takes a few minutes on a 2-core CPU.
"""

import json
import os
import subprocess
import sys

import nbformat
from nbformat.sign import NotebookNotary
import pandas as pd
import pytest

from llamaduo_nb.core.params import PROJECT_ROOT
from llamaduo_nb.stages import NAMES as STAGES, NOTEBOOKS

pytestmark = [pytest.mark.slow, pytest.mark.notebooks]

TINY = """\
run_name: tiny
tasks: [closed_qa]
coverage: {source: bundled, max_test_prompts: 2}
service: {backend: local, model: smollm2-135m-instruct, batch_size: 8}
synthesize: {samples_per_task: 8, pairs_per_call: 2, max_new_tokens: 96}
finetune:
  base_models: [smollm2-135m-instruct]
  volumes: [2, 4]
  quantization: none
  max_length: 256
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 1
infer: {k: 2, max_new_tokens: 16, batch_size: 2}
evaluate: {m: 2}
deploy: {enabled: true, parity: false}  # exports only: the parity check runs in make test-real-server
"""


def llamaduo(*args, cwd=PROJECT_ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "llamaduo_nb", *args], cwd=cwd, capture_output=True, text=True,
                          env=env or os.environ.copy(), timeout=1500)


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "tiny.yaml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def run(tiny_params, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_every_stage_wrote_its_outputs_and_done(run):
    run_dir, _ = run
    for stage in STAGES:
        done = json.loads((run_dir / stage / "DONE.json").read_text())
        assert done["stage"] == stage and done["fingerprint"]
    assert (run_dir / "params.yaml").exists()
    assert (run_dir / "finetune" / "closed_qa" / "smollm2-135m-instruct" / "4" / "adapter_config.json").exists()
    assert (run_dir / "infer" / "closed_qa" / "smollm2-135m-instruct" / "0.jsonl").exists()
    cells = pd.read_csv(run_dir / "deploy" / "cells.csv")
    assert len(cells) == 1 and cells["task"].tolist() == ["closed_qa"] and cells["parity"].str.startswith("not measured").all()
    assert list((run_dir / "deploy" / "closed_qa" / "smollm2-135m-instruct").glob("*@c1/export/model.q8_0.gguf"))


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_metrics_csv(run):
    run_dir, _ = run
    m = pd.read_csv(run_dir / "metrics.csv")
    for col in ["cycle", "task", "local_model", "judge", "volume", "metric", "mean", "median", "coverage_50", "coverage_70", "n"]:
        assert col in m.columns
    assert set(m["volume"]) == {-1, 0, 2, 4}  # -1: the service LLM's own answers (evaluate.service_answers)
    assert set(m.loc[m["volume"] == -1, "local_model"]) == {"service:local:smollm2-135m-instruct"}
    assert set(m["metric"]) == {"similarity", "precision"}
    assert (m["n"] == 2 * 2).all()  # 2 test prompts × K=2
    assert m["mean"].between(0, 100).all()


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_figures_png_and_svg(run):
    run_dir, _ = run
    for name in ("similarity_vs_volume", "precision_vs_volume", "precision_coverage", "dedup_funnel"):
        png = run_dir / "report" / f"{name}.png"
        assert png.stat().st_size > 5000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (run_dir / "report" / f"{name}.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_manifest(run):
    run_dir, _ = run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert set(manifest["stages"]) == set(STAGES)
    assert manifest["versions"]["transformers"] and manifest["seed"] == 42
    assert manifest["llm_totals"]["requests"] > 0
    synth = manifest["stages"]["synthesize"]["llm"]["local:smollm2-135m-instruct"]
    calls = (run_dir / "synthesize" / "calls.jsonl").read_text().splitlines()
    assert synth["requests"] == len(calls) >= 5 and synth["output_tokens"] > 0  # 8 pairs, 2 a call, 15 % expected loss
    assert (run_dir / "report.html").stat().st_size > 10_000


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_executed_notebooks_have_outputs(run):
    run_dir, _ = run
    for name in NOTEBOOKS.values():
        nb = nbformat.read(run_dir / "notebooks" / name, as_version=4)
        assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code"), name
        injected = [c for c in nb.cells if "injected-parameters" in c.metadata.get("tags", [])]
        assert len(injected) == 1 and str(run_dir) in injected[0].source
        assert NotebookNotary().check_signature(nb), name  # trusted: JupyterLab shows its tables' styles


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_second_run_reexecutes_nothing(run, tiny_params):
    run_dir, _ = run
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*") if p.is_file() and "cache" not in p.parts}
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("up to date, skipped") == len(NOTEBOOKS)
    after = {p: p.stat().st_mtime_ns for p in before}
    changed = [str(p) for p in before if after[p] != before[p] and p.name not in ("invocations.jsonl", "params.yaml")]
    assert changed == []


def test_bad_params_exit_2_and_write_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("finetune:\n  lora:\n    r: eight\n")
    run_dir = tmp_path / "never"
    proc = llamaduo("run", str(bad), "--run-dir", str(run_dir))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {bad}: finetune.lora.r: Input should be a valid integer, unable to parse string as an integer"]
    assert not run_dir.exists()
    proc = llamaduo("run", str(bad.with_name("missing.yaml")))
    assert proc.returncode == 2 and "params file not found" in proc.stderr


def test_missing_api_key_exit_2_before_work(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("service: {backend: openai, model: gpt-4o, api_key_env: LLAMADUO_NO_SUCH_KEY}\n")
    env = {k: v for k, v in os.environ.items() if k != "LLAMADUO_NO_SUCH_KEY"}
    proc = llamaduo("run", str(params), "--run-dir", str(tmp_path / "r"), env=env)
    assert proc.returncode == 2 and "LLAMADUO_NO_SUCH_KEY is not set" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_validate_and_doctor():
    proc = llamaduo("validate", "params/quickstart.yaml")
    assert proc.returncode == 0 and "valid" in proc.stdout
    proc = llamaduo("doctor", env=dict(os.environ, OPENAI_API_KEY="sk-should-never-print"))
    assert proc.returncode == 0
    assert "OPENAI_API_KEY: set" in proc.stdout and "sk-should-never-print" not in proc.stdout
    assert "smollm2-135m-instruct: installed" in proc.stdout


@pytest.mark.long
def test_only_redoes_one_cell_and_reuses_the_others(run, tiny_params):
    run_dir, _ = run
    models = run_dir / "finetune" / "closed_qa" / "smollm2-135m-instruct"
    answers = run_dir / "infer" / "closed_qa" / "smollm2-135m-instruct"
    before = {p: p.stat().st_mtime_ns for p in (models / "2" / "UNIT.json", models / "4" / "UNIT.json", answers / "2.jsonl",
                                                 answers / "4.jsonl", answers / "0.jsonl")}
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), "--only", "volume=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed = {p.parent.name + "/" + p.name for p in before if p.stat().st_mtime_ns != before[p]}
    assert changed == {"2/UNIT.json", "smollm2-135m-instruct/2.jsonl"}
    finetune = json.loads((run_dir / "finetune" / "DONE.json").read_text())["counts"]
    assert (finetune["trained"], finetune["reused"]) == (1, 1)
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), "--only", "volume=4096")
    assert proc.returncode == 2 and "volume 4096 is not in the grid (volumes: 2, 4)" in proc.stderr


@pytest.mark.long
def test_two_cycles_from_one_command_stop_for_the_stated_reason(run, tiny_params):
    run_dir, _ = run
    cycle_args = ["--set", "cycle.max_cycles=2", "--set", "cycle.target=precision mean >= 100", "--set", "cycle.step=4"]
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), *cycle_args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[cycle 1] target precision mean ≥ 100 not met in cycle 1" in proc.stdout
    for stage in ("synthesize", "deduplicate", "finetune", "infer", "evaluate"):
        assert f"[cycle 2 · {stage}] done" in proc.stdout
    cycles = json.loads((run_dir / "cycles.json").read_text())
    assert cycles["stopped"] and [c["cycle"] for c in cycles["cycles"]] == [1, 2]
    assert cycles["stop_reason"].endswith("Cycle budget spent (cycle.max_cycles = 2)")
    assert cycles["stop_short"] == "target precision mean ≥ 100 not met in cycle 2; cycle budget spent (cycle.max_cycles = 2)"
    later = run_dir / "cycle-2"
    new_pairs = [json.loads(line) for line in (later / "synthesize" / "pairs.jsonl").read_text().splitlines()]
    assert new_pairs and all("-c2-" in p["id"] and p["cycle"] == 2 for p in new_pairs)
    kept = [len((folder / "deduplicate" / "kept.jsonl").read_text().splitlines()) for folder in (run_dir, later)]
    assert cycles["cycles"][1]["kept_pairs_total"] == {"closed_qa": sum(kept)}
    # cycle 2 trains once on everything kept so far; the base model's answers are cycle 1's
    assert (later / "finetune" / "closed_qa" / "smollm2-135m-instruct" / str(sum(kept)) / "adapter_config.json").exists()
    base = "infer/closed_qa/smollm2-135m-instruct/0.jsonl"
    assert (later / base).read_text() == (run_dir / base).read_text()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["cycle"]) == {1, 2}
    assert set(metrics[metrics["cycle"] == 2]["volume"]) == {-1, 0, sum(kept)}
    judged = json.loads((later / "manifest.json").read_text())["stages"]["evaluate"]["llm"]["local:smollm2-135m-instruct"]
    assert judged["cache_hits"] >= 2 * 2 * 2  # the base model's answers were judged in cycle 1: 2 prompts × K × M
    # the same command again: every stage of both cycles is up to date
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), *cycle_args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("up to date, skipped") == len(NOTEBOOKS) + 5


@pytest.mark.long  # the shared tiny run takes minutes: make test-long (CI); notebooks run in make test via test_notebooks
def test_changed_param_redoes_only_downstream(run, tiny_params):
    run_dir, _ = run
    had_cycle_2 = (run_dir / "cycle-2").exists()
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), "--set", "evaluate.zetas=[50,60]")
    assert proc.returncode == 2 and "was made with different params (evaluate.zetas: [50, 70] → [50, 60]); add --force" in proc.stderr
    proc = llamaduo("run", str(tiny_params), "--run-dir", str(run_dir), "--set", "evaluate.zetas=[50,60]", "--force")
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = [line for line in proc.stdout.splitlines() if "skipped" in line]
    assert len(skipped) == 5  # coverage … infer untouched
    assert "[evaluate] done" in proc.stdout and "[report] done" in proc.stdout
    assert "coverage_60" in pd.read_csv(run_dir / "metrics.csv").columns
    assert not (run_dir / "cycle-2").exists()
    # a longer loop's cycle 2 (left by test_two_cycles…, in make test-long) is moved aside, never deleted
    assert len(list(run_dir.glob("superseded/cycle-2-*"))) == int(had_cycle_2)
