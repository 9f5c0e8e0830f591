"""The pipeline through the CLI with each provider's emulator as the service LLM.

`python -m llamaduo_nb run` executes the notebooks with papermill; the service LLM
(synthesis and judge) is the OpenAI, Anthropic or Gemini emulator, chosen by params only
(service.backend, model, base_url, api_key_env), while the local model stays
smollm2-135m-instruct. The emulators (threads of this test process, 127.0.0.1 only) reply
to synthesis prompts with pairs and to judge prompts with assessments, and count every
request: nothing may be asked twice, a re-run asks nothing, the key leaks nowhere, and a
run killed with SIGKILL pays for nothing twice when resumed.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest

from llamaduo_nb.core.io import read_jsonl
from llamaduo_nb.core.params import PROJECT_ROOT
from tests.emulators import Fault

pytestmark = [pytest.mark.slow, pytest.mark.emulator]

KEY = "sk-test-LEAKCHECK-9f8e7d"
KEY_ENV = "LLAMADUO_EMU_KEY"

TINY = """\
run_name: emulated
tasks: [closed_qa]
coverage: {source: bundled, max_test_prompts: 1}
service: {backend: local, model: smollm2-135m-instruct, max_retries: 3, max_reasks: 2, timeout_s: 20, max_concurrency: 4}
synthesize: {samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 128}
finetune:
  base_models: [smollm2-135m-instruct]
  volumes: [2]
  quantization: none
  max_length: 128
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 1
infer: {k: 1, max_new_tokens: 8, batch_size: 1}
evaluate: {m: 2}
"""

_WORDS = (
    "amber basalt cedar delta ember fjord garnet harbor iris juniper kelp lagoon meadow nectar onyx prairie quartz "
    "reef sierra tundra umber valley willow xenon yarrow zephyr anchor beacon canyon dune estuary falcon glacier "
    "heron island jasper kestrel lantern marble nimbus orchid pebble quill raven saffron thistle urchin violet "
    "walnut yonder zinnia acorn bramble cobalt drizzle eddy flint grove hollow indigo jade knoll lichen moss"
).split()


def service_reply(ctx) -> str:
    """A synthesis prompt gets `n` new pairs, a judge prompt two assessments (decided by its text)."""
    text = ctx.prompt
    if "similarity_assessment" in text:
        score = 40 + int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) % 50
        return json.dumps({"similarity_assessment": {"score": score, "reason": "close to the reference"},
                           "precision_assessment": {"score": score + 5, "reason": "answers the question"}})
    n = int(m.group(1)) if (m := re.search(r"Write (\d+) new", text)) else 1
    rng = random.Random(f"{text}|{ctx.index}")  # distinct pairs: deduplication keeps them all
    pairs = [{"instruction": " ".join(rng.choice(_WORDS) for _ in range(10)) + "?",
              "response": " ".join(rng.choice(_WORDS) for _ in range(8)) + "."} for _ in range(n)]
    return json.dumps({"contents": pairs})


def llamaduo(*args, timeout=600, env=None):
    env = dict(os.environ, **{KEY_ENV: KEY}, **(env or {}))
    return subprocess.run([sys.executable, "-m", "llamaduo_nb", *args], cwd=PROJECT_ROOT, capture_output=True,
                          text=True, env=env, timeout=timeout)


def provider_overrides(provider: str, emu) -> list[str]:
    """Only these four service params change between the providers."""
    sets = {"backend": provider, "model": f"{provider}-emu-model", "base_url": emu.url, "api_key_env": KEY_ENV}
    return [arg for k, v in sets.items() for arg in ("--set", f"service.{k}={v}")]


def leaks(run_dir: Path, *procs) -> list[str]:
    """Every file under the run folder (read as bytes) and every CLI output that holds the key."""
    needle = KEY.encode()
    found = [str(p) for p in run_dir.rglob("*") if p.is_file() and needle in p.read_bytes()]
    for proc in procs:
        if KEY in proc.stdout or KEY in proc.stderr:
            found.append(f"CLI output of {proc.args[3:]}")
    return found


def done(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "DONE.json").read_text())


@pytest.fixture(scope="module")
def params_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("params") / "emulated.yaml"
    path.write_text(TINY)
    return path


# -- each provider: synthesis through its emulator; a re-run asks nothing ------------------------------
@pytest.mark.parametrize("provider,batch_api", [
    pytest.param("openai", False, id="openai"), pytest.param("anthropic", False, id="anthropic"),
    pytest.param("gemini", False, id="gemini"), pytest.param("openai", True, id="openai-batch-api"),
    pytest.param("gemini", True, id="gemini-batch-api", marks=pytest.mark.long),  # 18 s: make test-long
])
def test_synthesis_through_each_provider(provider, batch_api, params_file, tmp_path, emulator_factory):
    emu = emulator_factory(provider, reply=service_reply, api_key=KEY, batch_polls=2)
    run_dir = tmp_path / "run"
    args = ["run", str(params_file), "--run-dir", str(run_dir), "--stages", "coverage,synthesize",
            *provider_overrides(provider, emu)]
    if batch_api:
        args += ["--set", "service.batch_api=true"]
    env = {"LLAMADUO_BATCH_POLL_S": "0.05"}
    first = llamaduo(*args, env=env)
    assert first.returncode == 0, first.stderr[-3000:]

    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    pairs = read_jsonl(run_dir / "synthesize" / "pairs.jsonl")
    assert len(calls) >= 2 and all(c["ok"] for c in calls)  # samples_per_task 4 at 2 pairs a call
    assert len(pairs) == 2 * len(calls) >= 4 and len({p["id"] for p in pairs}) == len(pairs)
    assert {p["service_model"] for p in pairs} == {f"{provider}:{provider}-emu-model"}
    acc = done(run_dir, "synthesize")["llm"][f"{provider}:{provider}-emu-model"]
    assert emu.stats.total == acc["api_calls"] == len(calls)  # one request per call, none repeated
    assert len(emu.stats.successes()) == len(calls)
    assert all(bool(r.batch_id) == batch_api for r in emu.stats.snapshot())
    if batch_api:
        assert acc["batch_jobs"] == done(run_dir, "synthesize")["counts"]["rounds"] and acc["batch_discount"] == 0.5
        assert emu.control["batches.create"] == acc["batch_jobs"]
    control = dict(emu.control)

    # the stage redone from scratch is answered from the run's cache
    again = llamaduo(*args, "--force", "synthesize", env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert emu.stats.total == len(calls) and dict(emu.control) == control
    acc = done(run_dir, "synthesize")["llm"][f"{provider}:{provider}-emu-model"]
    assert acc["api_calls"] == 0 and acc["cache_hits"] == len(calls)
    assert read_jsonl(run_dir / "synthesize" / "pairs.jsonl") == pairs
    assert leaks(run_dir, first, again) == []


# -- OpenAI: the whole pipeline, with faults --------------------------------------------------------------
@pytest.mark.long  # minutes: a fault run, in `make test-long` (CI runs it)
def test_whole_pipeline_openai_with_faults(params_file, tmp_path, emulator_factory):
    judged = []

    def policy(ctx):
        if ctx.index == 0:
            return Fault.rate_limit(retry_after=1)  # 429 with Retry-After
        if ctx.index == 1:
            return Fault.error(503)
        if "similarity_assessment" in ctx.prompt:
            judged.append(ctx.index)
            if len(judged) == 1:
                return Fault.malformed()  # the first judgement: not JSON, re-asked
        return None

    emu = emulator_factory("openai", reply=service_reply, policy=policy, api_key=KEY)
    run_dir = tmp_path / "run"
    args = ["run", str(params_file), "--run-dir", str(run_dir), *provider_overrides("openai", emu)]
    first = llamaduo(*args)
    assert first.returncode == 0, first.stderr[-3000:]

    label = "openai:openai-emu-model"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert set(metrics["judge"]) == {label} and len(metrics) > 0
    judgements = read_jsonl(run_dir / "evaluate" / "openai_openai-emu-model.jsonl")
    answers = done(run_dir, "evaluate")["counts"]["answers"]  # 1 prompt × k 1 × (base model + volume 2)
    assert answers >= 1 and len(judgements) == 2 * answers and all(j["valid"] for j in judgements)  # m 2
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    assert len(calls) >= 2 and all(c["ok"] for c in calls)

    synth_acc, judge_acc = done(run_dir, "synthesize")["llm"][label], done(run_dir, "evaluate")["llm"][label]
    # the service's own answers to the test prompts and the judge's check against human labels
    others = [acc for name, acc in done(run_dir, "evaluate")["llm"].items() if name != label]
    assert all(acc["failures"] == 0 and acc["retries"] == 0 and acc["reasks"] == 0 for acc in others)
    extra = sum(acc["api_calls"] for acc in others)
    needed = len(calls) + len(judgements) + extra
    assert synth_acc["retries"] + judge_acc["retries"] == 2  # the 429 and the 503
    assert synth_acc["reasks"] + judge_acc["reasks"] == 1 and judge_acc["reasks"] == 1  # the malformed judgement
    assert emu.stats.total == needed + 2 + 1 == synth_acc["api_calls"] + judge_acc["api_calls"] + extra
    assert len(emu.stats.successes()) == needed + 1  # each request (the re-ask is one) answered once
    assert emu.stats.by_fault["429"] == 1 and emu.stats.by_fault["503"] == 1 and emu.stats.by_fault["malformed"] == 1

    # a second run skips every stage and asks nothing; the judge redone comes from the cache
    second = llamaduo(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("up to date, skipped") == 7
    rejudge = llamaduo(*args, "--stages", "evaluate", "--force", "evaluate")
    assert rejudge.returncode == 0, rejudge.stderr[-3000:]
    assert emu.stats.total == needed + 3
    again = done(run_dir, "evaluate")["llm"][label]
    assert again["api_calls"] == 0 and again["cache_hits"] == len(judgements) + 1
    assert leaks(run_dir, first, second, rejudge) == []

    # the same answers judged through notebook 06 by the Anthropic and the Gemini emulator: only params change
    for provider in ("anthropic", "gemini"):
        other = emulator_factory(provider, reply=service_reply, api_key=KEY)
        proc = llamaduo("run", str(params_file), "--run-dir", str(run_dir), "--stages", "evaluate", *provider_overrides(provider, other),
                        "--force")  # another judge on a finished run: accepted with a bare --force
        assert proc.returncode == 0, proc.stderr[-3000:]
        label = f"{provider}:{provider}-emu-model"
        assert set(pd.read_csv(run_dir / "metrics.csv")["judge"]) == {label}
        assert [p.name for p in (run_dir / "evaluate").glob("*.jsonl")] == [f"{provider}_{provider}-emu-model.jsonl"]
        accounts = done(run_dir, "evaluate")["llm"]
        assert accounts[label]["api_calls"] == len(judgements)
        assert other.stats.total == sum(acc["api_calls"] for acc in accounts.values())  # judgements, answers, label checks
        assert leaks(run_dir, proc) == []


# -- a run killed with SIGKILL mid-synthesis pays for nothing twice when resumed ---------------------------
def _kill_tree(pid: int) -> None:
    """SIGKILL the CLI and the notebook kernel it started (its own session), by pid."""
    try:
        parent = psutil.Process(pid)
        tree = parent.children(recursive=True) + [parent]
    except psutil.NoSuchProcess:
        return
    for proc in tree:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.long  # a kill -9 run, with the others in `make test-long`
def test_kill9_mid_synthesis_then_resume_pays_nothing_twice(params_file, tmp_path, emulator_factory):
    n_calls = 40
    emu = emulator_factory("openai", reply=service_reply, api_key=KEY, latency=1.0)
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "llamaduo_nb", "run", str(params_file), "--run-dir", str(run_dir),
            "--stages", "coverage,synthesize", *provider_overrides("openai", emu),
            "--set", f"synthesize.samples_per_task={n_calls}", "--set", "synthesize.pairs_per_call=1",
            "--set", "service.max_concurrency=4"]
    env = dict(os.environ, **{KEY_ENV: KEY})
    cli = subprocess.Popen(args, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # wait for a few waves of 4 answers, then kill half-way through the next wave's 1 s latency,
        # when every delivered answer has long been written to the cache
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            answered = [r.answered for r in emu.stats.successes()]
            if len(answered) >= 8 and time.monotonic() - max(answered) >= 0.5:
                break
            assert cli.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("the run never got going")
        _kill_tree(cli.pid)
    finally:
        if cli.poll() is None:
            _kill_tree(cli.pid)
        cli.wait(timeout=30)
    paid_before = len(emu.stats.successes())
    assert 8 <= paid_before < n_calls
    time.sleep(1.5)  # the requests in flight at the kill find their client gone
    assert len(emu.stats.successes()) == paid_before and emu.stats.undelivered <= 4
    print(f"killed after {paid_before} answers; {emu.stats.undelivered} in flight, never delivered")
    assert not (run_dir / "synthesize" / "DONE.json").exists()

    resumed = llamaduo(*args[3:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    calls = read_jsonl(run_dir / "synthesize" / "calls.jsonl")
    pairs = read_jsonl(run_dir / "synthesize" / "pairs.jsonl")
    needed = len(calls)  # distinct requests (samples_per_task plus the stage's allowance for losses)
    assert needed >= n_calls and sorted(c["call"] for c in calls) == list(range(needed))
    assert all(c["ok"] and c["reasks"] == 0 for c in calls)
    # every request answered (paid) exactly once over both runs
    assert len(emu.stats.successes()) == needed
    acc = done(run_dir, "synthesize")["llm"]["openai:openai-emu-model"]
    assert acc["cache_hits"] == paid_before and acc["api_calls"] == needed - paid_before
    expected_ids = {f"closed_qa-c1-{c['call']:06d}-0" for c in calls}
    assert sorted(p["id"] for p in pairs) == sorted(expected_ids)  # each expected row, once
    assert leaks(run_dir, resumed) == []


# -- a list of service LLMs is a sweep: one run folder each, from one params file ------------------------
def test_service_llm_sweep_runs_each_in_its_own_folder(tmp_path, emulator_factory):
    import yaml

    emus = {p: emulator_factory(p, reply=service_reply, api_key=KEY) for p in ("openai", "anthropic")}
    raw = yaml.safe_load(TINY)
    raw["service"] = [dict(raw["service"], name=f"{p}-emu", backend=p, model=f"{p}-emu-model", base_url=emu.url, api_key_env=KEY_ENV)
                      for p, emu in emus.items()]
    params = tmp_path / "sweep.yaml"
    params.write_text(yaml.safe_dump(raw))
    dry = llamaduo("run", str(params), "--dry-run")
    assert dry.returncode == 0 and "service LLMs (2): openai-emu, anthropic-emu" in dry.stdout
    run_dir = tmp_path / "sweep"
    proc = llamaduo("run", str(params), "--run-dir", str(run_dir), "--stages", "coverage,synthesize")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run_dir / "sweep.json").read_text())["folders"] == ["openai-emu", "anthropic-emu"]
    for provider, emu in emus.items():
        member = run_dir / f"{provider}-emu"
        pairs = read_jsonl(member / "synthesize" / "pairs.jsonl")
        assert pairs and {p["service_model"] for p in pairs} == {f"{provider}-emu"}
        assert emu.stats.total == len(read_jsonl(member / "synthesize" / "calls.jsonl"))  # each service answered only its own run
        assert yaml.safe_load((member / "params.yaml").read_text())["service"]["backend"] == provider
    assert leaks(run_dir, dry, proc) == []
