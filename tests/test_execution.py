"""Where units run (`execution.backend`): the dry run's arithmetic, and the grid on a local Ray cluster.

The Ray cases share one tiny finished run (2 tasks × 1 local model × volumes 2 and 4, the OpenAI emulator as
service LLM and judge, stages in process) made with the local backend; each copies it and redoes fine-tuning
and what follows on `ray.init(num_cpus=2)`. They take minutes, so they are `long` (make test-long, CI).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import read_json, write_jsonl
from llamaduo_nb.core.execution import UnitsFailed, unit_needs, units_at_once, wall_hours
from llamaduo_nb.core.params import PROJECT_ROOT, ExecutionParams
from tests.test_change_matrix import emulator  # noqa: F401 - the OpenAI emulator answering like the change matrix's


# -- arithmetic (fast) ----------------------------------------------------------------------------------------
def test_units_at_once_follow_the_gpus_and_each_units_share():
    assert units_at_once(ExecutionParams(backend="local"), 8) == 1
    assert units_at_once(ExecutionParams(backend="ray"), 8) == 8
    assert units_at_once(ExecutionParams(backend="ray", gpus_per_unit=2), 8) == 4
    assert units_at_once(ExecutionParams(backend="ray", gpus_per_unit=0.5), 8) == 16


def test_wall_hours_start_the_longest_units_first():
    assert wall_hours([1, 1, 1, 1], 2) == 2
    assert wall_hours([8, 1, 1, 1, 1], 4) == 8  # the largest unit alone bounds the wall time
    assert wall_hours([3, 3, 2, 2, 2], 2) == 7  # longest first: [3, 2, 2] and [3, 2]


def test_a_unit_the_cluster_can_never_fit_is_refused_naming_the_field():
    with pytest.raises(UserError, match=r"execution.gpus_per_unit: a unit needs 1 GPU\(s\) but the Ray cluster has 0"):
        unit_needs(ExecutionParams(backend="ray", gpus_per_unit=1), {"CPU": 2.0})
    with pytest.raises(UserError, match="execution.cpus_per_unit"):
        unit_needs(ExecutionParams(backend="ray", cpus_per_unit=4), {"CPU": 2.0})
    assert unit_needs(ExecutionParams(backend="ray"), {"CPU": 2.0}) == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert unit_needs(ExecutionParams(backend="ray"), {"CPU": 64.0, "GPU": 8.0}) == {"num_cpus": 1.0, "num_gpus": 1.0}


def test_dry_run_states_the_backend_the_units_at_once_and_the_hours_for_n_gpus():
    cmd = [sys.executable, "-m", "llamaduo_nb", "run", "params/paper.yaml", "--dry-run", "--gpus", "8", "--set", "execution.backend=ray"]
    proc = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Execution: ray" in proc.stdout
    assert "on 8 GPU(s): 8 unit(s) at once (1 GPU each)" in proc.stdout
    assert "144 adapters" in proc.stdout and "GPU-hours" in proc.stdout and "wall-hours" in proc.stdout
    bad = subprocess.run(cmd[:-2] + ["--gpus", "-1"], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--gpus" in bad.stderr


def test_execution_backend_is_validated_naming_the_field_and_file(tmp_path):
    from llamaduo_nb.core.params_file import load_params

    with pytest.raises(UserError, match=r"quickstart.yaml.*execution.backend: Input should be 'local' or 'ray'"):
        load_params(PROJECT_ROOT / "params" / "quickstart.yaml", ["execution.backend=slurm"])


# -- a local Ray cluster (long) ------------------------------------------------------------------------------
SMOL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="pip install -e '.[ray]'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def local_run(emulator, tmp_path_factory):
    """(params file, run folder) of the tiny run made with the local backend."""
    from tests.test_change_matrix import coverage_rows, params_text

    base = tmp_path_factory.mktemp("execution")
    cov = base / "coverage.jsonl"
    write_jsonl(cov, coverage_rows())
    text = params_text(emulator.url, cov)
    base_models = next(line for line in text.splitlines() if "base_models:" in line)
    params_file = base / "params.yaml"
    params_file.write_text(text.replace(base_models, f"  base_models: [{SMOL}]"))
    run(params_file, base / "run")
    return params_file, base / "run"


def run(params_file: Path, run_dir: Path, *overrides: str, force=()):
    from llamaduo_nb.pipeline import runner

    runner.run(params_file, run_dir, list(overrides), force=list(force), log=lambda line: None, execute=runner.execute_in_process)


def adapter_records(run_dir: Path) -> dict:
    return {tuple(p.parent.relative_to(run_dir / "finetune").parts): read_json(p) for p in run_dir.glob("finetune/*/*/*/UNIT.json")}


def answers(run_dir: Path) -> dict:
    from llamaduo_nb.core.io import read_jsonl

    return {str(p.relative_to(run_dir)): [r["response"] for r in read_jsonl(p)] for p in sorted(run_dir.glob("infer/*/*/*.jsonl"))}


@pytest.mark.long
def test_ray_gives_the_local_metrics_training_units_side_by_side(ray_cluster, local_run, tmp_path):
    params_file, local_dir = local_run
    ray_dir = tmp_path / "run"
    shutil.copytree(local_dir, ray_dir)
    run(params_file, ray_dir, "execution.backend=ray", force=("finetune",))
    records = adapter_records(ray_dir)
    assert len(records) == 4 and all(r["unit_id"] != adapter_records(local_dir)[k]["unit_id"] for k, r in records.items())
    # the same answers and scores as one process made with the same seeds (the adapters' bytes may differ in the
    # last bits of CPU sums, which follow the thread count)
    assert answers(ray_dir) == answers(local_dir)
    assert (ray_dir / "metrics.csv").read_text() == (local_dir / "metrics.csv").read_text()
    spans = sorted((r["training_started"], r["training_finished"]) for r in records.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), f"no two units trained at once: {spans}"
    assert not (ray_dir / "finetune" / ".running").exists()


@pytest.mark.long
def test_a_worker_killed_mid_unit_loses_only_its_unit_and_a_rerun_redoes_only_that(ray_cluster, local_run, tmp_path):
    params_file, local_dir = local_run
    run_dir = tmp_path / "run"
    shutil.copytree(local_dir, run_dir)
    killed: dict = {}

    def kill_the_first_unit_in_training():
        deadline = time.time() + 600
        while time.time() < deadline and not killed:
            for marker in run_dir.glob("finetune/*/*/*/.training.json"):
                pid = (read_json(marker) if marker.stat().st_size else {}).get("pid")
                if pid and pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed["unit"] = tuple(marker.parent.relative_to(run_dir / "finetune").parts)
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_the_first_unit_in_training, daemon=True)
    watcher.start()
    with pytest.raises(UnitsFailed, match="1 of 4 units lost"):
        run(params_file, run_dir, "execution.backend=ray", "execution.max_retries=0", force=("finetune",))
    watcher.join()
    before = adapter_records(run_dir)
    assert killed["unit"] not in before and len(before) == 3  # every other unit finished and recorded
    run(params_file, run_dir, "execution.backend=ray")
    after = adapter_records(run_dir)
    assert {k for k in after if before.get(k, {}).get("unit_id") != after[k]["unit_id"]} == {killed["unit"]}
    assert (run_dir / "metrics.csv").read_text() == (local_dir / "metrics.csv").read_text()


def test_ray_without_the_ray_package_is_refused_before_anything_runs(monkeypatch, tmp_path):
    import importlib.util

    from llamaduo_nb.pipeline import runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(UserError, match=r"execution.backend: ray needs the ray package \(pip install -e '.\[ray\]'\)"):
        runner.run(PROJECT_ROOT / "params" / "quickstart.yaml", tmp_path / "run", ["execution.backend=ray"])
    assert not (tmp_path / "run").exists()
