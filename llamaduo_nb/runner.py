"""`llamaduo run`: execute the numbered notebooks in order with papermill.

Stages whose DONE.json carries the current fingerprint are skipped without starting a
kernel; the rest run, each writing its executed notebook to `<run>/notebooks/`. After 06,
the cycle (`cycle.py`) decides whether to run 02→06 again in `cycle-<t>/`; 07 then reports
on every cycle.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from pathlib import Path

import pandas as pd

from .errors import UserError
from .io import write_json, write_yaml
from .llm.client import check_keys
from .params import PROJECT_ROOT, Params, load_family, service_slug
from .stage import NOTEBOOKS, STAGES, cycle_folder, is_done, update_manifest

CYCLE_STAGES = ["synthesize", "deduplicate", "finetune", "infer", "evaluate"]

NOTEBOOK_DIR = PROJECT_ROOT / "notebooks"


def default_run_dir(params: Params) -> Path:
    return PROJECT_ROOT / "results" / f"{params.run_name}-{time.strftime('%Y%m%d-%H%M%S')}"


def parse_stages(text: str | None) -> list[str]:
    if not text:
        return list(STAGES)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise UserError(f"--stages: unknown stage(s) {', '.join(unknown)} (stages: {', '.join(STAGES)})")
    return [s for s in STAGES if s in chosen]


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


def run(params_file: str | Path, run_dir: str | Path | None = None, overrides: list[str] | None = None,
        stages: str | None = None, force: list[str] | None = None, log=print, only: str | None = None) -> Path:
    """Run (or resume) an experiment, or a sweep over service LLMs; returns the run folder.

    `force`: stage names to redo even when up to date; an empty string (bare `--force`) only
    accepts params that differ from those the run folder was made with."""
    family = load_family(params_file, overrides)  # refuses bad params before anything is written
    chosen = parse_stages(stages)
    forced = parse_stages(",".join(force)) if force and any(force) else []
    for params in family:
        check_keys([params.service] + params.judges)
    check_notebooks()
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(family[0])
    if len(family) == 1:
        return _run_one(family[0], run_dir, chosen, forced, bool(force), log, only)
    members = {service_slug(p): p for p in family}
    for slug, params in members.items():  # refuse before any member runs
        refuse_changed_params(run_dir / slug, params, bool(force))
    log(f"sweep over {len(family)} service LLMs: {', '.join(p.service.label for p in family)}; run folder: {run_dir}")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "sweep.json", {"service_llms": {slug: p.service.label for slug, p in members.items()},
                                        "folders": list(members)})
    for slug, params in members.items():
        log(f"=== service LLM {params.service.label}: {run_dir / slug}")
        _run_one(params, run_dir / slug, chosen, forced, True, log, only)  # params already checked above
    finished = [run_dir / slug for slug in members if (run_dir / slug / "metrics.csv").exists()]
    if len(finished) > 1 and "report" in chosen:
        from .report import compare_runs

        paths = compare_runs(finished, run_dir / "comparison")
        log(f"comparison of the service LLMs: {run_dir / 'comparison'} ({len(paths)} files)")
    return run_dir


def refuse_changed_params(run_dir: Path, params: Params, accepted: bool) -> None:
    """A run folder made with other params is not silently reused: name what differs, ask for --force.

    Settings that change no output (rate limits, concurrency, prices, key names), the run name and
    the cycle budget may change freely: a finished run can be given more cycles."""
    previous_file = run_dir / "params.yaml"
    if accepted or not previous_file.exists():
        return
    import yaml

    try:
        previous = yaml.safe_load(previous_file.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise UserError(f"{previous_file}: unreadable; add --force to replace it") from None
    differences = params_differences(previous, params.dump())
    if differences:
        shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "")
        raise UserError(f"{run_dir} was made with different params ({shown}); add --force to redo the stages they affect "
                        f"there, or choose another --run-dir")


def params_differences(old: dict, new: dict) -> list[str]:
    """Dotted fields whose values differ, operational settings and the cycle budget left out."""
    from .stage import OPERATIONAL

    out: list[str] = []

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if key in OPERATIONAL or (not prefix and key in ("run_name", "cycle")):
                    continue
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif a != b:
            out.append(f"{prefix}: {a!r} → {b!r}")

    walk(old, new, "")
    return out


def parse_only(text: str, params: Params) -> list[tuple[str, str, int]]:
    """`task=coding,volume=4096[,model=gemma-2b-it]` → the (task, model, volume) cells it names.

    A key may list several values with `|` (`task=coding|closed_qa`); an absent key means all."""
    from .models import short_name

    grid = {"task": list(params.tasks), "model": [short_name(m) for m in params.finetune.base_models],
            "volume": [str(v) for v in params.finetune.volumes]}
    chosen = dict(grid)
    for item in [i.strip() for i in text.split(",") if i.strip()]:
        key, _, values = item.partition("=")
        key = key.strip()
        if key not in grid or not values:
            raise UserError(f"--only {text}: expected key=value with key one of {', '.join(grid)} (e.g. task=coding,volume=4096)")
        wanted = [v.strip() for v in values.split("|")]
        unknown = [v for v in wanted if v not in grid[key]]
        if unknown:
            raise UserError(f"--only {text}: {key} {', '.join(unknown)} is not in the grid ({key}s: {', '.join(grid[key])})")
        chosen[key] = wanted
    return [(t, m, int(v)) for t in chosen["task"] for m in chosen["model"] for v in chosen["volume"]]


def redo_cells(run_dir: Path, cells: list[tuple[str, str, int]], log) -> int:
    """Remove the named cells' adapters and answers and the DONE.json of the stages that hold them:
    the next stages retrain and re-answer those cells only (every other unit is reused; the judge's
    cache answers unchanged answers for free)."""
    import shutil

    from .stage import done_path, stage_dir

    removed = 0
    for task, model, volume in cells:
        for path in (stage_dir(run_dir, "finetune") / task / model / str(volume), stage_dir(run_dir, "infer") / task / model / f"{volume}.jsonl"):
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            else:
                continue
            removed += 1
    for stage in ("finetune", "infer", "evaluate", "report"):
        with contextlib.suppress(FileNotFoundError):
            done_path(run_dir, stage).unlink()
    log(f"--only: {len(cells)} cell(s) to redo: " + ", ".join(f"{t}/{m}/{v}" for t, m, v in cells))
    return removed


def _run_one(params: Params, run_dir: Path, chosen: list[str], forced: list[str], accepted: bool, log, only: str | None = None) -> Path:
    refuse_changed_params(run_dir, params, accepted)
    cells = parse_only(only, params) if only else []
    if cells and not (run_dir / "models" / "runs.csv").exists():
        raise UserError(f"--only {only}: {run_dir} has no fine-tuned cells yet; run the whole grid once, then redo single cells")
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "params.yaml"
    write_yaml(resolved, params.dump())
    update_manifest(run_dir, params)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    log(f"run folder: {run_dir}")
    if cells:
        redo_cells(run_dir, cells, log)
    os.environ["LLAMADUO_TEXT_PROGRESS"] = "1"  # kernels inherit it: text progress bars reach this terminal
    executed_now = []
    for stage in [s for s in chosen if s != "report"]:
        if _run_stage(stage, params, resolved, run_dir, stage in forced, log):
            executed_now.append(stage)
    if "evaluate" in chosen and (run_dir / "metrics.csv").exists():
        executed_now += run_cycles(params, resolved, run_dir, chosen, forced, log)
    if "report" in chosen and _run_stage("report", params, resolved, run_dir, "report" in forced, log):
        executed_now.append("report")
    report_notebook = run_dir / "notebooks" / NOTEBOOKS["report"]
    if report_notebook.exists() and ("report" in executed_now or not (run_dir / "report.html").exists()):
        export_html(report_notebook, run_dir / "report.html")
        log(f"report: {run_dir / 'report.html'}")
    return run_dir


def _run_stage(stage: str, params: Params, params_file: Path, folder: Path, force: bool, log, label: str = "") -> bool:
    """Run one stage's notebook in `folder` (the run folder or a cycle folder) unless it is up to date."""
    from .cycle import params_for_cycle

    executed = folder / "notebooks" / NOTEBOOKS[stage]
    name = f"{label}{stage}"
    if not force and is_done(stage, params_for_cycle(params, folder), folder) and executed.exists():
        log(f"[{name}] up to date, skipped")
        return False
    executed.parent.mkdir(parents=True, exist_ok=True)
    log(f"[{name}] running {NOTEBOOKS[stage]} …")
    began = time.time()
    _execute(stage, params_file, folder, executed, force)
    log(f"[{name}] done in {time.time() - began:.1f} s")
    return True


def run_cycles(params: Params, params_file: Path, run_dir: Path, chosen: list[str], forced: list[str], log) -> list[str]:
    """The LlamaDuo cycle: while the target is unmet and budget remains, run 02→06 again in `cycle-<t>/`.

    Writes `cycles.json` after every decision, so an interrupted loop shows where it stood and
    `run` again picks it up (finished cycles are skipped stage by stage)."""
    from . import cycle as cyc

    executed, decisions, t = [], [], 1
    while True:
        folder = cycle_folder(run_dir, t)
        metrics = pd.read_csv(run_dir / "metrics.csv")
        cost = sum(cyc.cycle_cost(cycle_folder(run_dir, c)) for c in range(1, t + 1))
        decision = cyc.decide(params, t, metrics, cost, cyc.pair_counts(folder) if t > 1 else None)
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
            if _run_stage(stage, params, params_file, folder, stage in forced, log, label=f"cycle {t} · "):
                executed.append(f"cycle-{t}/{stage}")
            stalled = cyc.no_new_pairs(t, cyc.pair_counts(folder)) if stage == "deduplicate" else None
            if stalled:
                decision = cyc.Decision(True, f"{stalled}; stopping before fine-tuning on the same data")
                decisions.append((t, decision))
                log(f"[cycle {t}] {decision.reason}")
                cyc.record(params, run_dir, decisions, True)
                return executed


def export_html(notebook: Path, target: Path) -> Path:
    """The executed report as one standalone HTML file (figures embedded), written atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    from .io import write_text

    body, _ = HTMLExporter(exclude_input_prompt=True, exclude_output_prompt=True).from_notebook_node(
        nbformat.read(notebook, as_version=4)
    )
    return write_text(target, body)


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
        if exc.ename == "UserError":
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
    os.replace(running, executed)


# A stage that fails with one of these could not write: the folder is read-only or the disk is full.
WRITE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
WRITE_FAILURES = ("No space left", "File too large", "Read-only file system", "Disk quota", "disk is full",
                  "readonly database", "unable to open database file", "disk I/O error")


class StageFailed(Exception):
    """A notebook raised; the run stops there (earlier stages stay done)."""
