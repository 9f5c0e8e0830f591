"""`llamaduo run`: execute the numbered notebooks in order with papermill.

Stages whose DONE.json carries the current fingerprint are skipped without starting a
kernel; the rest run, each writing its executed notebook to `<run>/notebooks/`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

from .errors import UserError
from .io import write_yaml
from .llm.client import check_keys
from .params import PROJECT_ROOT, Params, load_params
from .stage import NOTEBOOKS, STAGES, is_done, update_manifest

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
        stages: str | None = None, force: list[str] | None = None, log=print) -> Path:
    """Run (or resume) an experiment; returns the run folder."""
    params = load_params(params_file, overrides)  # refuses bad params before anything is written
    chosen = parse_stages(stages)
    forced = parse_stages(",".join(force)) if force else []
    check_keys([params.service] + params.judges)
    check_notebooks()
    run_dir = Path(run_dir).resolve() if run_dir else default_run_dir(params)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "params.yaml"
    write_yaml(resolved, params.dump())
    update_manifest(run_dir, params)
    (run_dir / "notebooks").mkdir(exist_ok=True)
    log(f"run folder: {run_dir}")
    os.environ["LLAMADUO_TEXT_PROGRESS"] = "1"  # kernels inherit it: text progress bars reach this terminal
    executed_now = []
    for stage in chosen:
        executed = run_dir / "notebooks" / NOTEBOOKS[stage]
        if stage not in forced and is_done(stage, params, run_dir) and executed.exists():
            log(f"[{stage}] up to date, skipped")
            continue
        executed_now.append(stage)
        log(f"[{stage}] running {NOTEBOOKS[stage]} …")
        began = time.time()
        _execute(stage, resolved, run_dir, executed, stage in forced)
        log(f"[{stage}] done in {time.time() - began:.1f} s")
    report_notebook = run_dir / "notebooks" / NOTEBOOKS["report"]
    if report_notebook.exists() and ("report" in executed_now or not (run_dir / "report.html").exists()):
        export_html(report_notebook, run_dir / "report.html")
        log(f"report: {run_dir / 'report.html'}")
    return run_dir


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
        if exc.ename in ("PermissionError", "OSError", "FileNotFoundError") or "No space left" in str(exc.evalue):
            raise UserError(f"stage {stage} could not write its outputs ({exc.ename}: {exc.evalue}); earlier stages are intact") from None
        raise StageFailed(f"stage {stage} failed: {exc.ename}: {exc.evalue} (executed notebook: {failed})") from None
    os.replace(running, executed)


class StageFailed(Exception):
    """A notebook raised; the run stops there (earlier stages stay done)."""
