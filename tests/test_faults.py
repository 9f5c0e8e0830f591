"""Faults: nothing lost, nothing paid twice, one clear line when the disk or the folder refuses writes.

`python -m llamaduo_nb run` against the OpenAI emulator (a thread of this test process, 127.0.0.1
only), on tiny params: one task, two test prompts, K 1, M 12, one LoRA volume of 4 steps.

- kill -9 during judging (evaluate), at seeded random points: the run is started again on the same
  folder and must end with every judgement (volume × prompt × k × m) present exactly once, while the
  emulator has answered each judge request exactly once over both runs;
- kill -9 during training (finetune) at seeded random moments: the unit resumes from its last
  complete checkpoint, every adapter is there once, no synthesis request is repeated;
- the kernel a killed runner started exits by itself (it would otherwise go on judging or training);
- 429 storms with Retry-After, 5xx bursts, timeouts, dropped connections, malformed and truncated JSON
  and empty `choices` while judging: every judgement valid, every request accounted for;
- a full disk (RLIMIT_FSIZE: writes fail with EFBIG) and read-only folders (`chattr +i` as root, who
  writes through chmod; chmod otherwise): exit 2, one `error:` line naming the stage or the file, earlier stages
  byte-for-byte unchanged, no temporary file left behind.

One module-scoped base run (coverage → infer, about 3 minutes on 2 cores) is copied for each case.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from llamaduo_nb.core.io import file_fingerprint, read_jsonl
from llamaduo_nb.core.params import PROJECT_ROOT
from tests.emulators import Fault, OpenAIEmulator
from tests.test_service_pipeline import KEY, KEY_ENV, _kill_tree, llamaduo, service_reply

pytestmark = [pytest.mark.slow, pytest.mark.emulator, pytest.mark.long]  # make test-long (CI runs it)

PARAMS = """\
run_name: faults
tasks: [closed_qa]
coverage: {{source: bundled, max_test_prompts: 2}}
service: {{backend: openai, model: openai-emu-model, base_url: "{url}", api_key_env: {key_env},
           max_retries: 6, max_reasks: 2, timeout_s: 4, max_concurrency: 4}}
synthesize: {{samples_per_task: 4, pairs_per_call: 2, max_new_tokens: 128}}
finetune:
  base_models: [smollm2-135m-instruct]
  volumes: [2]
  quantization: none
  max_length: 128
  max_steps: 4
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 1
infer: {{k: 1, max_new_tokens: 8, batch_size: 2}}
evaluate: {{m: 12, bootstrap: 0, reference_metrics: false, service_answers: false, human_labels: null}}  # the judging path alone
"""
LABEL = "openai:openai-emu-model"
JUDGEMENTS = "evaluate/openai_openai-emu-model.jsonl"
UNIT = "finetune/closed_qa/smollm2-135m-instruct/2"
LATENCY = 0.6  # seconds the emulator takes per judge answer while a kill is aimed


@pytest.fixture(scope="module")
def emu():
    emulator = OpenAIEmulator(reply=service_reply, api_key=KEY).start()  # one URL for the module: params stay equal
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def base(emu, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    params = root / "faults.yaml"
    params.write_text(PARAMS.format(url=emu.url, key_env=KEY_ENV))
    run_dir = root / "base"
    proc = llamaduo("run", str(params), "--run-dir", str(run_dir), "--stages", "coverage,synthesize,deduplicate")
    assert proc.returncode == 0, proc.stderr[-3000:]
    synth_calls = len(read_jsonl(run_dir / "synthesize" / "calls.jsonl"))
    assert emu.stats.total == synth_calls >= 2
    after_dedup = root / "after-dedup"
    shutil.copytree(run_dir, after_dedup)
    proc = llamaduo("run", str(params), "--run-dir", str(run_dir), "--stages", "finetune,infer")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answers = sum(len(read_jsonl(p)) for p in (run_dir / "infer").rglob("*.jsonl"))
    assert answers == 2 * 2  # (base model + volume 2) × 2 prompts × k 1
    return SimpleNamespace(params=params, root=root, after_dedup=after_dedup, after_infer=run_dir,
                           synth_calls=synth_calls, needed=answers * 12)


def copy_run(source: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(source, target)
    return target


def done(run_dir: Path, folder: str) -> dict:
    return json.loads((run_dir / folder / "DONE.json").read_text())


def start(params: Path, run_dir: Path, stages: str, log: Path, **popen) -> subprocess.Popen:
    args = [sys.executable, "-m", "llamaduo_nb", "run", str(params), "--run-dir", str(run_dir), "--stages", stages]
    return subprocess.Popen(args, cwd=PROJECT_ROOT, env=dict(os.environ, **{KEY_ENV: KEY}),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, **popen)


def kernels(cli: subprocess.Popen) -> list[psutil.Process]:
    try:
        children = psutil.Process(cli.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for proc in children:
        try:
            if "ipykernel" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.NoSuchProcess:
            pass
    return out


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill9(cli: subprocess.Popen, how: str) -> None:
    """SIGKILL the CLI alone (its kernel must notice and exit by itself) or the CLI and its kernel."""
    running = kernels(cli)
    assert running, "no kernel was running at the kill"
    if how == "tree":
        _kill_tree(cli.pid)
    else:
        os.kill(cli.pid, signal.SIGKILL)
    cli.wait(timeout=30)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all(gone(k) for k in running):
        time.sleep(0.05)
    left = [k.pid for k in running if not gone(k)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert left == [], f"kernel(s) {left} still running 5 s after the runner was killed"


def no_temporaries(run_dir: Path) -> list[str]:
    return [str(p) for p in run_dir.rglob("*") if p.name.endswith(".tmp") or ".running." in p.name]


def fingerprints(run_dir: Path, folders: list[str]) -> dict[str, str]:
    return {str(p.relative_to(run_dir)): file_fingerprint(p) for f in folders for p in sorted((run_dir / f).rglob("*"))
            if p.is_file()}


def unchanged(before: dict, after: dict) -> bool:
    """Every earlier file byte for byte; the only newcomer allowed is the failed stage's notebook, kept for
    debugging under a name the skip logic never trusts."""
    assert {k: after.get(k) for k in before} == before
    assert set(after) - set(before) <= {"notebooks/06_evaluate.failed.ipynb"}, set(after) - set(before)
    return True


# -- kill -9 while judging ------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize("seed, how", [(1, "cli"), (2, "tree"), (3, "cli")])
def test_kill9_while_judging_then_resume(seed, how, base, emu, tmp_path):
    run_dir = copy_run(base.after_infer, tmp_path)
    emu.stats.reset()
    emu.latency = LATENCY
    rng = random.Random(seed)
    target = rng.randint(3, base.needed - 8)  # answers delivered before the kill
    offset = rng.uniform(0.1, LATENCY - 0.15)  # into the next wave of requests, after the last answer was cached
    cli = start(base.params, run_dir, "evaluate", tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 300
        while True:
            answered = [r.answered for r in emu.stats.successes()]
            if len(answered) >= target and time.monotonic() - max(answered) >= offset:
                break
            assert cli.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "judging never got going"
            time.sleep(0.01)
        kill9(cli, how)
    finally:
        if cli.poll() is None:
            _kill_tree(cli.pid)
            cli.wait(timeout=30)
    paid_before = len(emu.stats.successes())
    time.sleep(1.0)  # requests in flight at the kill find their client gone
    assert len(emu.stats.successes()) == paid_before, "answers kept being delivered after the kill"
    assert target <= paid_before < base.needed
    assert not (run_dir / "evaluate" / "DONE.json").exists()

    emu.latency = 0.0
    resumed = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "[evaluate] done" in resumed.stdout

    rows = read_jsonl(run_dir / JUDGEMENTS)
    keys = Counter((r["volume"], r["prompt_id"], r["k"], r["m"]) for r in rows)
    prompts = {r["prompt_id"] for r in read_jsonl(run_dir / "coverage" / "test.jsonl")}
    expected = {(v, p, 0, m) for v in (0, 2) for p in prompts for m in range(12)}
    lost, doubled = expected - set(keys), [k for k, n in keys.items() if n > 1]
    assert (len(lost), len(doubled), len(rows)) == (0, 0, base.needed) and all(r["valid"] for r in rows)
    paid = len(emu.stats.successes())
    acc = done(run_dir, "evaluate")["llm"][LABEL]
    assert acc["cache_hits"] == paid_before and acc["api_calls"] == base.needed - paid_before
    assert paid == base.needed, f"{paid - base.needed} judge request(s) paid twice"
    assert emu.stats.total == paid + emu.stats.undelivered  # nothing but the killed run's unfinished requests
    assert no_temporaries(run_dir) == []
    print(f"seed {seed} ({how}): killed after {paid_before}/{base.needed} judgements, {emu.stats.undelivered} in flight; "
          f"lost {len(lost)}, paid twice {paid - base.needed}")


# -- kill -9 while training -------------------------------------------------------------------------------
@pytest.mark.long
@pytest.mark.parametrize("seed, how", [(1, "cli"), (2, "tree")])
def test_kill9_while_training_then_resume(seed, how, base, emu, tmp_path):
    run_dir = copy_run(base.after_dedup, tmp_path)
    emu.stats.reset()
    emu.latency = 0.0
    rng = random.Random(seed)
    checkpoint = rng.randint(1, 2)  # of 4 steps, one checkpoint a step
    extra = rng.uniform(0.0, 3.0)  # then this long: mid-step or mid-save
    checkpoints = run_dir / UNIT / "checkpoints"
    cli = start(base.params, run_dir, "finetune", tmp_path / "killed.log")
    try:
        deadline = time.monotonic() + 400
        while not (checkpoints / f"checkpoint-{checkpoint}").exists():
            assert cli.poll() is None, "the run ended before it could be killed:\n" + (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "training never reached its checkpoint"
            time.sleep(0.05)
        time.sleep(extra)
        assert not (run_dir / UNIT / "UNIT.json").exists(), "training ended before the kill"
        kill9(cli, how)
    finally:
        if cli.poll() is None:
            _kill_tree(cli.pid)
            cli.wait(timeout=30)
    left = sorted(p.name for p in checkpoints.glob("checkpoint-*"))
    complete = [p for p in left if (checkpoints / p / "trainer_state.json").exists()]
    assert complete, f"no complete checkpoint to resume from ({left})"

    resumed = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "finetune")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    unit = json.loads((run_dir / UNIT / "UNIT.json").read_text())
    assert unit["resumed"] and unit["steps"] == 4 and not (run_dir / UNIT / "checkpoints").exists()
    adapters = sorted(str(p.parent.relative_to(run_dir)) for p in (run_dir / "finetune").rglob("adapter_config.json"))
    assert adapters == [UNIT]
    assert done(run_dir, "finetune")["counts"]["adapters"] == 1
    log = (run_dir / UNIT / "train_log.csv").read_text().splitlines()
    steps = [int(line.split(",")[0]) for line in log[1:]]
    resumed_from = max(int(p.split("-")[1]) for p in complete)
    assert steps == [1, 2, 3, 4], steps  # each step logged once: the steps before the checkpoint come from it
    assert emu.stats.total == 0  # no synthesis (nor any other) request repeated
    assert no_temporaries(run_dir) == []
    print(f"seed {seed} ({how}): killed {extra:.1f} s after checkpoint-{checkpoint}; checkpoints left {left}; "
          f"resumed from step {resumed_from}; adapters {len(adapters)}; synthesis calls repeated {emu.stats.total}")


# -- storms of faults while judging ----------------------------------------------------------------------
def test_fault_storms_while_judging_every_judgement_accounted_for(base, emu, tmp_path):
    run_dir = copy_run(base.after_infer, tmp_path)
    emu.stats.reset()
    emu.latency = 0.0
    rng = random.Random(7)
    kinds = [Fault.slow(6.0), Fault.drop(), Fault.malformed(), Fault.truncated(), Fault.empty()]

    def policy(ctx):
        if ctx.index < 10:
            return Fault.rate_limit(retry_after=1)  # a 429 storm
        if ctx.index < 16:
            return Fault.error(rng.choice([500, 502, 503]))  # a 5xx burst
        if ctx.index < 46 and ctx.index % 3 == 1:
            return kinds[(ctx.index // 3) % len(kinds)]  # timeouts, dropped connections, bad JSON, no choices
        return None

    emu.policy = policy
    try:
        proc = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate")
    finally:
        emu.policy = None
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = read_jsonl(run_dir / JUDGEMENTS)
    keys = Counter((r["volume"], r["prompt_id"], r["k"], r["m"]) for r in rows)
    assert len(keys) == len(rows) == base.needed and all(r["valid"] for r in rows)
    acc = done(run_dir, "evaluate")["llm"][LABEL]
    faults = emu.stats.by_fault
    assert faults["429"] == 10 and sum(faults[s] for s in ("500", "502", "503")) == 6
    assert all(faults[k] == 2 for k in ("slow", "drop", "malformed", "truncated", "empty")), faults
    assert acc["failures"] == 0 and acc["requests"] == base.needed
    assert emu.stats.total == acc["api_calls"] == base.needed + acc["retries"] + acc["reasks"]
    print(f"faults served {dict(faults)}; retries {acc['retries']}, re-asks {acc['reasks']}; "
          f"judgements {len(rows)}/{base.needed}, lost {base.needed - len(rows)}")


# -- a full disk and a read-only run folder --------------------------------------------------------------
def _one_error_line(proc) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
    return errors[0]


def _file_size_limit(limit: int):
    def apply():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    return apply


EARLIER = ["coverage", "synthesize", "deduplicate", "finetune", "infer"]


@pytest.mark.parametrize("limit, what", [(None, "notebook"), (40_000, "outputs")])
def test_disk_full_while_judging(limit, what, base, emu, tmp_path):
    run_dir = copy_run(base.after_infer, tmp_path)
    emu.stats.reset()
    emu.latency = 0.0
    if what == "notebook":  # room for params.yaml and the history of invocations, not for the executed notebook
        small = max((run_dir / name).stat().st_size for name in ("params.yaml", "invocations.jsonl"))
        limit = small + 1500
        assert limit < (PROJECT_ROOT / "notebooks" / "06_evaluate.ipynb").stat().st_size
    before = fingerprints(run_dir, EARLIER + ["notebooks"])
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate"],
                          cwd=PROJECT_ROOT, env=dict(os.environ, **{KEY_ENV: KEY}), capture_output=True, text=True,
                          timeout=600, preexec_fn=_file_size_limit(limit))
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = _one_error_line(proc)
    assert line.startswith("error: stage evaluate could not write its outputs (") and "earlier stages are intact" in line, line
    assert any(m in line for m in ("File too large", "disk is full", "disk I/O error")), line
    if what == "notebook":  # papermill could not write the executed notebook: nothing was asked
        assert "06_evaluate" in line and emu.stats.total == 0
    assert unchanged(before, fingerprints(run_dir, EARLIER + ["notebooks"]))  # earlier stages byte for byte
    assert not (run_dir / "evaluate" / "DONE.json").exists() and no_temporaries(run_dir) == []
    paid = len(emu.stats.successes())

    again = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate")  # room again: the run completes
    assert again.returncode == 0, again.stderr[-3000:]
    rows = read_jsonl(run_dir / JUDGEMENTS)
    assert len({(r["volume"], r["prompt_id"], r["m"]) for r in rows}) == len(rows) == base.needed
    repeated = len(emu.stats.successes()) - base.needed
    acc = done(run_dir, "evaluate")["llm"][LABEL]
    # answers that reached the cache before the disk filled are not paid again; one whose cache write failed may be
    assert 0 <= repeated <= 4 and acc["cache_hits"] >= paid - 4
    print(f"limit {limit} B ({what}): {line}\n  paid before {paid}; repeated after {repeated}; lost 0")


@contextlib.contextmanager
def read_only(*folders: Path):
    """Folders nobody may write to, root included: the immutable attribute as root (chattr +i), else chmod."""
    root = os.geteuid() == 0
    try:
        for folder in folders:
            if root:
                if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
                    pytest.skip("chattr +i is not available here (root writes through chmod)")
            else:
                folder.chmod(0o555)
        yield
    finally:
        for folder in folders:
            if root:
                subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
            else:
                folder.chmod(0o755)


@pytest.mark.parametrize("which", ["run folder", "evaluate folder", "notebooks folder"])
def test_read_only_run_folder(which, base, emu, tmp_path):
    run_dir = copy_run(base.after_infer, tmp_path)
    emu.stats.reset()
    emu.latency = 0.0
    if which == "evaluate folder":
        (run_dir / "evaluate").mkdir()
    folder = {"run folder": run_dir, "evaluate folder": run_dir / "evaluate", "notebooks folder": run_dir / "notebooks"}[which]
    before = fingerprints(run_dir, EARLIER + ["notebooks"])
    with read_only(folder):
        proc = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate")
        assert proc.returncode == 2, proc.stderr[-3000:]
        line = _one_error_line(proc)
        if which == "run folder":  # refused before any stage: the resolved params cannot be written
            assert line.startswith(f"error: {run_dir / 'params.yaml'}: ") and line.endswith(
                "(the run folder must be writable and its disk not full)"), line
            assert emu.stats.total == 0
        else:
            assert line.startswith("error: stage evaluate could not write its outputs (") and line.endswith(
                "earlier stages are intact"), line
            assert ("evaluate" if which == "evaluate folder" else "06_evaluate") in line, line
        assert unchanged(before, fingerprints(run_dir, EARLIER + ["notebooks"]))
        assert not (run_dir / "evaluate" / "DONE.json").exists() and no_temporaries(run_dir) == []
    paid = len(emu.stats.successes())
    again = llamaduo("run", str(base.params), "--run-dir", str(run_dir), "--stages", "evaluate")  # writable again
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(read_jsonl(run_dir / JUDGEMENTS)) == base.needed
    repeated = len(emu.stats.successes()) - base.needed
    assert repeated == 0, f"{repeated} judge request(s) paid twice"
    print(f"read-only {which}: {line}\n  paid before {paid}; repeated after {repeated}; lost 0")
