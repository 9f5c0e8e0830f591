"""`llamaduo run`: execute the numbered notebooks in order with papermill.

Stages whose DONE.json carries the current fingerprint (and whose outputs are unchanged) are
skipped without starting a kernel; the rest run, each writing its executed notebook to
`<run>/notebooks/`, and inside each stage only the units whose fingerprints changed are redone.
After 06, the cycle (`cycle.py`) decides whether to run 02→06 again in `cycle-<t>/`; 07 then
reports on every cycle.

`--force` means one thing: a bare `--force` accepts params that differ from the run folder's (the
units they change are redone); `--force STAGE` redoes every unit of that stage and of every stage
that depends on it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import write_json, write_yaml
from llamaduo_nb.llm.common import check_keys
from llamaduo_nb.pipeline.changes import refuse_changed_params
from llamaduo_nb.core.execution import check_backend
from llamaduo_nb.pipeline.grid import parse_only, redo_cells
from llamaduo_nb.core.params import PROJECT_ROOT, Params
from llamaduo_nb.core.params_file import service_slug
from llamaduo_nb.core.params_file import load_family, load_params
from llamaduo_nb.core.units import StageResult, check_layout, cycle_folder, is_done, read_done, record_invocation
from llamaduo_nb.pipeline import cycle as cyc
from llamaduo_nb.pipeline import tracking
from llamaduo_nb.pipeline import search
from llamaduo_nb.pipeline.doctor import before_paying
from llamaduo_nb.stages import BY_NAME, NAMES, NOTEBOOKS, evaluate
from llamaduo_nb.stages.report import compare_runs, export_html

CYCLE_STAGES = ["synthesize", "deduplicate", "finetune", "infer", "evaluate"]
AFTER_CYCLES = ("deploy", "report")  # once, over every cycle's results

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def default_run_dir(params: Params) -> Path:
    return PROJECT_ROOT / "results" / f"{params.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(NAMES)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in NAMES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(NAMES)})")
    return [s for s in NAMES if s in chosen]


def check_notebooks() -> None:
    import nbformat

    for stage, name in NOTEBOOKS.items():
        path = NOTEBOOK_DIR / name
        if not path.exists():
            raise UserError(f"{path}: notebook missing")
        nb = nbformat.read(path, as_version=4)
        tagged = sum("parameters" in c.metadata.get("tags", []) for c in nb.cells)
        if tagged != 1:
            raise UserError(f"{path}: needs exactly one cell tagged 'parameters' (found {tagged})")


def downstream(stages: list[str]) -> list[str]:
    """The stages and every stage that depends on them, in order."""
    out = set(stages)
    for stage in NAMES:  # in the order they run
        if any(up in out for up in BY_NAME[stage].inputs()):
            out.add(stage)
    return [s for s in NAMES if s in out]


def run(params_file: str | Path, run_dir: str | Path | None = None, overrides: list[str] | None = None,
        stages: str | None = None, force: list[str] | None = None, log=print, only: str | None = None,
        execute=None) -> Path:
    """Run (or resume) an experiment, or a sweep over service LLMs; returns the run folder.

    `force`: stage names whose units are all redone, with every stage that depends on them; an empty
    string (bare `--force`) accepts params that differ from those the run folder was made with.
    `execute(stage, params_file, folder, executed_notebook, force)` runs one stage (default: its
    notebook through papermill; `execute_in_process` calls the same stage function directly)."""
    family = load_family(params_file, overrides)  # refuses bad params before anything is written
    chosen = parse_stages(stages)
    forced = downstream(parse_stages(",".join(force))) if force and any(force) else []
    execute = execute or _execute
    for params in family:
        check_keys([params.service] + params.judges)
        check_backend(params.execution)
    problems = before_paying(family)
    if problems:  # one line, before anything is written or paid for
        raise UserError("; ".join(problems) + " (llamaduo doctor PARAMS checks everything a run needs)")
    check_notebooks()
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(family[0])
    def stages_for(params: Params) -> list[str]:  # deploy by name, or at the end of a whole run when enabled
        return chosen if stages or params.deploy.enabled else [s for s in chosen if s != "deploy"]

    accepted = "" in (force or [])  # a bare --force accepts changed params; --force STAGE only redoes STAGE
    invocation = ([str(params_file)] + [f"--set {o}" for o in overrides or []] + ([f"--stages {stages}"] if stages else [])
                  + [f"--force {f}".strip() for f in force or []] + ([f"--only {only}"] if only else []))
    if len(family) == 1:
        return _run_one(family[0], run_dir, stages_for(family[0]), forced, accepted, log, only, execute, invocation)
    members = {service_slug(p): p for p in family}
    for slug, params in members.items():  # refuse before any member runs
        refuse_changed_params(run_dir / slug, params, accepted)
    log(f"sweep over {len(family)} service LLMs: {', '.join(p.service.label for p in family)}; run folder: {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "sweep.json", {"service_llms": {slug: p.service.label for slug, p in members.items()},
                                        "folders": list(members)})
    for slug, params in members.items():
        log(f"=== service LLM {params.service.label}: {run_dir / slug}")
        _run_one(params, run_dir / slug, stages_for(params), forced, True, log, only, execute, invocation)  # params checked above
    finished = [run_dir / slug for slug in members if (run_dir / slug / "metrics.csv").exists()]
    if len(finished) > 1 and "report" in chosen:
        paths = compare_runs(finished, run_dir / "comparison")
        log(f"comparison of the service LLMs: {run_dir / 'comparison'} ({len(paths)} files)")
    return run_dir


def _run_one(params: Params, run_dir: Path, chosen: list[str], forced: list[str], accepted: bool, log, only: str | None = None,
             execute=None, invocation: list[str] | None = None) -> Path:
    check_layout(run_dir)
    refuse_changed_params(run_dir, params, accepted)
    cells = parse_only(only, params) if only else []
    if cells and not (run_dir / "finetune" / "runs.csv").exists():
        raise UserError(f"--only {only}: {run_dir} has no fine-tuned cells yet; run the whole grid once, then redo single cells")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "params.yaml"
    write_yaml(resolved, params.dump())
    record_invocation(run_dir, params, invocation or [])
    (run_dir / "notebooks").mkdir(exist_ok=True)
    log(f"run folder: {run_dir}")
    if cells:
        redo_cells(run_dir, cells, log)
    os.environ["LLAMADUO_TEXT_PROGRESS"] = "1"  # kernels inherit it: text progress bars reach this terminal
    executed_now = []
    before_cycles = [s for s in chosen if s not in AFTER_CYCLES]
    if params.finetune.search and "finetune" in before_cycles:
        executed_now += run_search(params, resolved, run_dir, before_cycles, forced, log, execute)
    else:
        for stage in before_cycles:
            if _run_stage(stage, params, resolved, run_dir, stage in forced, log, execute=execute):
                executed_now.append(stage)
    if "evaluate" in chosen and read_done(run_dir, "evaluate") is not None:
        cyc.publish_run_tables(run_dir)
        executed_now += run_cycles(params, resolved, run_dir, chosen, forced, log, execute)
    if "deploy" in chosen and _run_stage("deploy", params, resolved, run_dir, "deploy" in forced, log, execute=execute):
        executed_now.append("deploy")
    if "report" in chosen and _run_stage("report", params, resolved, run_dir, "report" in forced, log, execute=execute):
        executed_now.append("report")
    report_notebook = run_dir / "notebooks" / NOTEBOOKS["report"]
    if report_notebook.exists() and ("report" in executed_now or not (run_dir / "report.html").exists()):
        export_html(report_notebook, run_dir / "report.html")
        log(f"report: {run_dir / 'report.html'}")
    if params.tracking.mlflow:
        tracking.log_run(params, run_dir, log)
    return run_dir


def _run_stage(stage: str, params: Params, params_file: Path, folder: Path, force: bool, log, label: str = "", execute=None) -> bool:
    """Run one stage's notebook in `folder` (the run folder or a cycle folder) unless it is up to date."""
    executed = folder / "notebooks" / NOTEBOOKS[stage]
    name = f"{label}{stage}"
    in_process = execute is execute_in_process  # no executed notebook to keep then
    if not force and is_done(BY_NAME[stage], cyc.params_for_cycle(params, folder), folder) and (executed.exists() or in_process):
        log(f"[{name}] up to date, skipped")
        return False
    executed.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] running {NOTEBOOKS[stage]} …")
    began = time.time()
    (execute or _execute)(stage, params_file, folder, executed, force)  # after evaluate, run_stage gathers the run tables
    log(f"[{name}] done in {time.time() - began:.1f} s")
    return True


def run_search(params: Params, params_file: Path, run_dir: Path, stages: list[str], forced: list[str], log, execute=None) -> list[str]:
    """The volume search (pipeline/search.py): stages 01→06 of cycle 1 with the volumes reached so far, judged, then
    one more volume for every (task, local model) not yet decided, until each is found, exhausted or undecidable."""
    executed, step_no = [], 0
    while True:
        step_no += 1
        volumes = search.tried(params, run_dir)
        log(f"[search] step {step_no}: volumes " + "; ".join(f"{task} {', '.join(map(str, v))}" for task, v in volumes.items()))
        for stage in stages:
            # a forced stage is redone once, at the first step; later steps only add volumes
            if _run_stage(stage, params, params_file, run_dir, stage in forced and step_no == 1, log, execute=execute):
                executed.append(stage)
        if "evaluate" not in stages:
            return executed  # nothing judged: the search cannot take a step
        step = search.next_step(params, evaluate.run_verdicts(params, run_dir, up_to_cycle=1), volumes)
        search.record(params, run_dir, step, evaluate.verdict_rule(params))
        log(f"[search] {step.line()}")
        if step.done:
            for line in search.summary_lines(search.state(run_dir)):
                log(f"[search] {line}")
            return executed


def run_cycles(params: Params, params_file: Path, run_dir: Path, chosen: list[str], forced: list[str], log, execute=None) -> list[str]:
    """The LlamaDuo cycle: while the target is unmet and budget remains, run 02→06 again in `cycle-<t>/`.

    Writes `cycles.json` after every decision, so an interrupted loop shows where it stood and
    `run` again picks it up (finished cycles are skipped stage by stage)."""
    executed, decisions, t = [], [], 1
    while True:
        folder = cycle_folder(run_dir, t)
        verdicts = evaluate.run_verdicts(params, run_dir, up_to_cycle=t)
        cost = cyc.run_spend(run_dir)
        decision = cyc.decide(params, t, verdicts, cost, cyc.pair_counts(folder) if t > 1 else None)
        decisions.append((t, decision))
        log(f"[cycle {t}] {decision.reason}")
        cyc.record(params, run_dir, decisions, decision.stop)
        if decision.stop:
            for moved in cyc.retire_later_cycles(run_dir, t):
                log(f"[cycle] {moved.name}: a later cycle of an earlier loop, moved to {moved.parent.name}/")
            return executed
        t += 1
        folder = cycle_folder(run_dir, t)
        folder.mkdir(exist_ok=True)
        for stage in [s for s in CYCLE_STAGES if s in chosen]:
            if _run_stage(stage, params, params_file, folder, stage in forced, log, label=f"cycle {t} · ", execute=execute):
                executed.append(f"cycle-{t}/{stage}")
            stalled = cyc.no_new_pairs(t, cyc.pair_counts(folder)) if stage == "deduplicate" else None
            if stalled:
                decision = cyc.Decision(True, f"{stalled}; stopping before fine-tuning on the same data")
                decisions.append((t, decision))
                log(f"[cycle {t}] {decision.reason}")
                cyc.record(params, run_dir, decisions, True)
                return executed


def _execute(stage: str, params_file: Path, run_dir: Path, executed: Path, force: bool) -> None:
    import papermill as pm

    failed = executed.with_suffix(".failed.ipynb")
    running = executed.with_name(f".{executed.stem}.running.ipynb")  # renamed into place only on success
    with contextlib.suppress(FileNotFoundError):
        failed.unlink()
    os.environ["LLAMADUO_RUNNER_PID"] = str(os.getpid())  # the kernel exits when this process dies (notebook.setup)
    try:
        pm.execute_notebook(
            str(NOTEBOOK_DIR / NOTEBOOKS[stage]), str(running),
            parameters={"params_file": str(params_file), "run_dir": str(run_dir), "overrides": [], "force": force},
            kernel_name="python3", language="python", cwd=str(NOTEBOOK_DIR), progress_bar=False,
            log_output=True, stdout_file=sys.stdout, stderr_file=sys.stderr,
        )
    except pm.PapermillExecutionError as exc:
        if running.exists():
            os.replace(running, failed)  # kept for debugging, under a name the skip logic never trusts
        if exc.ename in user_error_names():  # bad input, or a provider that can only fail (ServiceStopped): exit 2
            raise UserError(f"stage {stage}: {exc.evalue}") from None
        if exc.ename in ("PermissionError", "OSError", "FileNotFoundError") or any(m in str(exc.evalue) for m in WRITE_FAILURES):
            raise UserError(f"stage {stage} could not write its outputs ({exc.ename}: {exc.evalue}); earlier stages are intact") from None
        raise StageFailed(f"stage {stage} failed: {exc.ename}: {exc.evalue} (executed notebook: {failed})") from None
    except OSError as exc:  # papermill could not write the executed notebook (read-only folder, full disk)
        with contextlib.suppress(OSError):
            running.unlink()  # maybe half-written
        if exc.errno not in WRITE_ERRNOS:
            raise
        raise UserError(f"stage {stage} could not write its outputs ({exc.filename or running}: {exc.strerror}); earlier stages are intact") from None
    trust(running)
    os.replace(running, executed)


def trust(notebook: Path) -> None:
    """Sign an executed notebook as its user's own (what `jupyter trust` does): the user ran it with their own
    command, and JupyterLab strips the styles of an untrusted notebook's tables (the colours of the verdicts, the
    widths of the columns). Where the signature store cannot be written (read-only home), the notebook stays unsigned:
    its outputs read the same, uncoloured."""
    import sqlite3

    import nbformat
    from nbformat.sign import NotebookNotary

    with contextlib.suppress(OSError, sqlite3.Error, nbformat.ValidationError):
        NotebookNotary().sign(nbformat.read(notebook, as_version=4))


def user_error_names() -> set[str]:
    """Names of UserError and its subclasses: a kernel reports an exception by its class name only."""
    names, todo = set(), [UserError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return names


# A stage that fails with one of these could not write: the folder is read-only or the disk is full.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
WRITE_FAILURES = ("No space left", "File too large", "Read-only file system", "Disk quota", "disk is full",
                  "readonly database", "unable to open database file", "disk I/O error")


def execute_in_process(stage: str, params_file: Path, run_dir: Path, executed: Path, force: bool) -> None:
    """Run a stage by calling the function its notebook calls, in this process, without a kernel: the same
    units and files, but no executed notebook (and so no report.html). The tests use it where a kernel per
    stage would cost minutes."""
    folder = Path(run_dir).resolve()
    check_layout(folder)
    print(run_stage(stage, load_params(params_file), folder, force).summary())


def run_stage(stage: str, params: Params, run_dir: str | Path, force: bool = False) -> StageResult:
    """One stage in one folder (the run folder or a cycle's), as its notebook runs it; after evaluate, every
    cycle's tables in one at the run folder's top."""
    if stage not in BY_NAME:
        raise ValueError(f"unknown stage {stage!r} (stages: {', '.join(NAMES)})")
    result = BY_NAME[stage].run(cyc.params_for_cycle(params, run_dir), run_dir, force=force)
    if stage == "evaluate":
        cyc.publish_run_tables(run_dir)
    return result


class StageFailed(Exception):
    """A notebook raised; the run stops there (earlier stages stay done)."""
