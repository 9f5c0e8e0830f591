"""`llamaduo doctor PARAMS`, and a stage stopped by the circuit breaker through the CLI: one line, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from llamaduo_nb.cli import main
from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.params import PROJECT_ROOT

pytestmark = pytest.mark.emulator

KEY = "sk-test-DOCTOR-2468"
KEY_ENV = "LLAMADUO_DOCTOR_KEY"
SCORE = '{"ok": true}'


def _params(tmp_path, url, model="gpt-4o", extra=""):
    path = tmp_path / "p.yaml"
    path.write_text(
        "tasks: [closed_qa]\n"
        "coverage: {source: bundled, max_test_prompts: 1}\n"
        f"service: {{backend: openai, model: {model}, base_url: '{url}', api_key_env: {KEY_ENV}, requests_per_minute: 5000{extra}}}\n"
        "synthesize: {samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 64}\n"
        "finetune: {base_models: [smollm2-135m-instruct], volumes: [2], quantization: none}\n"
    )
    return path


def test_doctor_sends_one_request_and_shows_mode_and_limits(emulator_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, KEY)
    headers = {"x-ratelimit-limit-requests": "500", "x-ratelimit-remaining-requests": "499", "x-ratelimit-reset-requests": "120ms"}
    emu = emulator_factory("openai", reply=lambda ctx: SCORE, api_key=KEY, json_types=("text", "json_object"),
                           rate_limit_headers=headers)
    assert main(["doctor", str(_params(tmp_path, emu.url))]) == 0
    out = capsys.readouterr().out
    assert "live request: answered (2 requests; JSON mode json_object+schema, valid JSON)" in out
    assert "provider's limit: 500 requests/min (499 remaining); params say 5000: paced at 500" in out
    assert emu.stats.total == 2 and KEY not in out


def test_doctor_one_line_per_problem(emulator_factory, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(KEY_ENV, "sk-wrong-key-0000")
    emu = emulator_factory("openai", reply=lambda ctx: SCORE, api_key=KEY)
    params = _params(tmp_path, emu.url)
    assert main(["doctor", str(params)]) == 2
    out = capsys.readouterr().out
    problems = [line for line in out.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 1 and "401 AuthenticationError: Incorrect API key provided: ***" in problems[0]
    assert emu.stats.total == 1
    monkeypatch.delenv(KEY_ENV)
    assert main(["doctor", str(params), "--offline"]) == 2
    out = capsys.readouterr().out
    assert f"problem: service 'openai:gpt-4o': environment variable {KEY_ENV} is not set" in out
    assert emu.stats.total == 1  # --offline sends nothing


@pytest.mark.slow
def test_wrong_key_stops_synthesis_with_one_line_and_exit_2(emulator_factory, tmp_path):
    emu = emulator_factory("openai", api_key=KEY)
    params = _params(tmp_path, emu.url)
    run_dir = tmp_path / "run"
    env = dict(os.environ, **{KEY_ENV: "sk-wrong-key-1357"})
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", str(params), "--run-dir", str(run_dir),
                           "--stages", "coverage,synthesize"], cwd=PROJECT_ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: stage synthesize: service 'openai:gpt-4o' stopped: 3 requests in a row failed: 401 Incorrect API key")
    assert "sk-wrong-key-1357" not in proc.stderr + proc.stdout
    assert emu.stats.total == 3  # not 612
    assert not (run_dir / "synthesize" / "DONE.json").exists()
    assert read_jsonl(run_dir / "coverage" / "train.jsonl")  # the stage before is intact


def test_run_refuses_a_gated_hub_model_without_hf_token_before_paying(tmp_path, monkeypatch, capsys):
    """Fine-tuning a gated model would fail only after synthesis was paid for: `run` says so first, writes nothing."""
    from llamaduo_nb.cli import main as cli_main

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    params = tmp_path / "gated.yaml"
    params.write_text("tasks: [closed_qa]\nservice: {backend: local, model: smollm2-135m-instruct}\n"
                      "finetune: {base_models: [google/gemma-2b-it], quantization: nf4}\n")
    run_dir = tmp_path / "run"
    assert cli_main(["run", str(params), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "google/gemma-2b-it is gated on the Hub: accept its licence and set HF_TOKEN" in err[0]
    assert "nf4" not in err[0]  # no CUDA here: QLoRA falls back to LoRA, which is no reason to refuse
    assert not run_dir.exists()


def test_run_refuses_a_tracker_that_is_not_installed_before_paying(tmp_path, monkeypatch, capsys):
    """tracking.mlflow / tracking.report_to name packages of an optional extra: missing, `run` says so first."""
    import importlib.util

    from llamaduo_nb.cli import main as cli_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("mlflow", "tensorboard") else real(name, *a))
    params = tmp_path / "tracked.yaml"
    params.write_text("tasks: [closed_qa]\nservice: {backend: local, model: smollm2-135m-instruct}\n"
                      "tracking: {mlflow: true, report_to: [tensorboard]}\n")
    run_dir = tmp_path / "run"
    assert cli_main(["run", str(params), "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tracking.mlflow: true needs mlflow (pip install -e '.[track]')" in err[0], err
    assert "tracking.report_to: tensorboard needs the tensorboard package" in err[0]
    assert not run_dir.exists()
