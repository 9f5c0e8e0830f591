"""Where the grid's independent units run (`execution.backend`).

`local`: one after another in this process. `ray`: each unit is a Ray task asking for the CPUs and GPUs
it needs (`execution.cpus_per_unit`, `execution.gpus_per_unit`), and Ray runs as many at once as the
cluster fits. A unit writes its outputs and its record (`UNIT.json`, `<file>.unit.json`) into the run
folder itself, atomically, so a worker that dies loses only its own unit and a re-run redoes only that
one. On a cluster of several machines the run folder must be on storage every node mounts at the same
path (NFS, Lustre, a shared cloud file system), and every node needs the same environment installed.

While units run, a line says how many are done, running and queued: a unit marks itself running in
`<stage>/.running/` (a hidden folder no fingerprint reads) for as long as it works.
"""

from __future__ import annotations

import heapq
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import write_json
from llamaduo_nb.core.params import ExecutionParams

RUNNING_FOLDER = ".running"


@dataclass
class UnitJob:
    """One unit of a stage: `fn(*args, **kwargs)` makes it and writes it into the run folder."""

    key: str  # e.g. "closed_qa/smollm2-135m-instruct/4": names the unit in progress lines and errors
    fn: Callable
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)


class UnitsFailed(RuntimeError):
    """Some units were lost (a worker died, or the unit raised); every other unit is finished and recorded."""


def run_units(stage: str, folder: Path, jobs: list[UnitJob], execution: ExecutionParams, log=print) -> list[Any]:
    """Make every unit, locally or on Ray; the results in the order of `jobs`."""
    if execution.backend == "ray" and jobs:
        return _run_on_ray(stage, Path(folder), jobs, execution, log)
    results = []
    for done, job in enumerate(jobs):
        log(f"[{stage}] {job.key} · units: {done} done · 1 running · {len(jobs) - done - 1} queued")
        results.append(job.fn(*job.args, **job.kwargs))
    return results


def check_backend(execution: ExecutionParams) -> None:
    """Refuse, before anything runs, a backend whose package is missing (the dry run needs none)."""
    import importlib.util

    if execution.backend == "ray" and importlib.util.find_spec("ray") is None:
        raise UserError("execution.backend: ray needs the ray package (pip install -e '.[ray]')")


# -- Ray ------------------------------------------------------------------------------------------------------
def connect(execution: ExecutionParams) -> dict:
    """Join (or start) the Ray cluster once per process; its total resources."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine unasked
        ray.init(address=execution.address)
    return dict(ray.cluster_resources())


def unit_needs(execution: ExecutionParams, cluster: dict) -> dict:
    """The Ray resources one unit asks for; a unit the cluster can never fit is refused (it would wait forever)."""
    gpus = execution.gpus_per_unit if execution.gpus_per_unit is not None else (1.0 if cluster.get("GPU", 0) >= 1 else 0.0)
    if gpus > cluster.get("GPU", 0):
        raise UserError(f"execution.gpus_per_unit: a unit needs {gpus:g} GPU(s) but the Ray cluster has {cluster.get('GPU', 0):g}")
    if execution.cpus_per_unit > cluster.get("CPU", 0):
        raise UserError(f"execution.cpus_per_unit: a unit needs {execution.cpus_per_unit:g} CPU(s) but the Ray cluster has "
                        f"{cluster.get('CPU', 0):g}")
    return {"num_cpus": execution.cpus_per_unit, "num_gpus": gpus}


def _marker(running: Path, key: str) -> Path:
    return running / (key.replace("/", "__") + ".json")


def run_marked(marker: str, threads: int, fn: Callable, args: tuple, kwargs: dict) -> Any:
    """In a Ray worker: mark the unit running, use the cores Ray gave it, make it."""
    import torch

    torch.set_num_threads(max(1, threads))
    os.environ["OMP_NUM_THREADS"] = str(max(1, threads))  # models.torch_threads keeps to it
    write_json(Path(marker), {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    try:
        return fn(*args, **kwargs)
    finally:
        Path(marker).unlink(missing_ok=True)


def _run_on_ray(stage: str, folder: Path, jobs: list[UnitJob], execution: ExecutionParams, log) -> list[Any]:
    import ray

    joined = ray.is_initialized()  # a cluster this process joined before (a test, a notebook) stays; one started here stops
    try:
        return _schedule(stage, folder, jobs, execution, log)
    finally:
        if not joined and ray.is_initialized():
            ray.shutdown()


def _schedule(stage: str, folder: Path, jobs: list[UnitJob], execution: ExecutionParams, log) -> list[Any]:
    import ray

    needs = unit_needs(execution, connect(execution))
    running = folder / RUNNING_FOLDER
    shutil.rmtree(running, ignore_errors=True)  # marks left by workers of an earlier, killed run
    running.mkdir(parents=True, exist_ok=True)
    task = ray.remote(run_marked).options(max_retries=execution.max_retries, retry_exceptions=False, name=f"llamaduo-{stage}", **needs)
    threads = max(1, int(needs["num_cpus"]))
    refs = {task.remote(str(_marker(running, job.key)), threads, job.fn, job.args, job.kwargs): i for i, job in enumerate(jobs)}
    log(f"[{stage}] {len(jobs)} units on Ray, each with {needs['num_cpus']:g} CPU(s) and {needs['num_gpus']:g} GPU(s)")
    results: list[Any] = [None] * len(jobs)
    failed: dict[str, BaseException] = {}
    pending, shown = list(refs), None
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=2.0)
        for ref in ready:
            job = jobs[refs[ref]]
            try:
                results[refs[ref]] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                failed[job.key] = exc.cause if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause else exc
                log(f"[{stage}] {job.key} lost: {_first_line(failed[job.key])}")
        in_progress = sum(_marker(running, jobs[refs[r]].key).exists() for r in pending)
        state = (len(jobs) - len(pending), in_progress, len(pending) - in_progress)
        if state != shown:
            log(f"[{stage}] units: {state[0]} done · {state[1]} running · {state[2]} queued" + (f" ({len(failed)} lost)" if failed else ""))
            shown = state
    shutil.rmtree(running, ignore_errors=True)
    if failed:
        user_errors = [exc for exc in failed.values() if isinstance(exc, UserError)]
        if user_errors:
            raise user_errors[0]
        raise UnitsFailed(f"{stage}: {len(failed)} of {len(jobs)} units lost ({', '.join(sorted(failed))}: "
                          f"{_first_line(next(iter(failed.values())))}); the others are finished and recorded: run the same "
                          f"command again to redo only the lost ones")
    return results


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"


# -- the dry run ----------------------------------------------------------------------------------------------
def units_at_once(execution: ExecutionParams, gpus: int) -> int:
    """How many units run side by side on `gpus` GPUs (the local backend: one)."""
    if execution.backend == "local":
        return 1
    per_unit = execution.gpus_per_unit if execution.gpus_per_unit is not None else (1.0 if gpus else 0.0)
    return max(1, int(gpus // per_unit)) if per_unit > 0 else 1


def wall_hours(unit_hours: list[float], slots: int) -> float:
    """Hours until the last unit ends when `slots` run at once, the longest started first."""
    ends = [0.0] * max(1, slots)
    for hours in sorted(unit_hours, reverse=True):
        heapq.heappush(ends, heapq.heappop(ends) + hours)
    return max(ends)


def describe(execution: ExecutionParams, unit_hours: list[float], gpus: Optional[int]) -> list[str]:
    """The dry run's lines on where the fine-tuning units run and the wall time that implies."""
    gpu_hours = sum(unit_hours)
    where = "local (one unit at a time in this process)" if execution.backend == "local" else \
        f"ray ({execution.address or 'RAY_ADDRESS or a Ray instance on this machine'})"
    lines = [f"Execution: {where}"]
    if gpus is None:
        lines.append(f"  {len(unit_hours)} adapters one after another ≈ {gpu_hours:,.1f} wall-hours on one GPU "
                     f"(--gpus N: how many run at once on N GPUs)")
        return lines
    slots = units_at_once(execution, gpus)
    per_unit = execution.gpus_per_unit if execution.gpus_per_unit is not None else 1.0
    lines.append(f"  on {gpus} GPU(s): {slots} unit(s) at once ({per_unit:g} GPU each)" if execution.backend == "ray" else
                 f"  on {gpus} GPU(s): 1 unit at a time (execution.backend: ray runs {units_at_once(execution.model_copy(update={'backend': 'ray'}), gpus)} at once)")
    lines.append(f"  {len(unit_hours)} adapters ≈ {gpu_hours * (per_unit if execution.backend == 'ray' else 1):,.1f} GPU-hours, "
                 f"≈ {wall_hours(unit_hours, slots):,.1f} wall-hours (longest units first; the largest alone takes "
                 f"{max(unit_hours, default=0):,.1f} h)")
    return lines
