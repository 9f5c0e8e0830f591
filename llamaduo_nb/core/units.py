"""The run folder and the unit contract.

A stage is `run(params, run_dir, force=False) -> StageResult`. It reads only files of earlier
stages, writes only under its own folder `<run>/<stage>/` (atomically), and writes DONE.json last.

A stage is made of *units*, the smallest things it makes and can reuse: the coverage split, a
synthesis call (the response cache), the deduplication pass, an adapter, an answer file, a
judgement (the response cache), a figure set. Each unit records, beside its outputs, a fingerprint
of everything it was made from: the params it depends on and the *content* fingerprints of its
inputs (the adapter's weights, the pairs it trained on, the answers' text), never "the file
exists". A unit is reused only when that fingerprint matches and its outputs still have the content
it recorded; otherwise it is redone, and everything downstream follows, because downstream
fingerprints hold the content fingerprints of what they read.

A stage's DONE.json holds the stage fingerprint (its params and the content fingerprints of its
inputs) and the content fingerprint of its outputs, which later stages take as input; a stage whose
DONE.json matches and whose outputs are unchanged is skipped without looking at its units.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import json
import platform
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

from llamaduo_nb import __version__
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.io import file_fingerprint, fingerprint, read_json, write_json, write_text, write_yaml
from llamaduo_nb.core.params import PROJECT_ROOT, Params
from llamaduo_nb.core.progress import library_output_to

# Service settings that change how fast or how cheaply answers come, never what they are. Requests are
# cached by content, so a local service's batch_size (which prompts are generated together) changes
# nothing either, and a cost cap only decides how far a run gets. Only these exact fields (a service's or a judge's) count as operational.
SERVICE_OPERATIONAL = {"batch_api", "max_concurrency", "requests_per_minute", "tokens_per_minute", "timeout_s", "max_retries",
                       "batch_size", "price_input_per_mtok", "price_output_per_mtok", "api_key_env", "max_cost_usd"}
PACKAGES = ["torch", "transformers", "peft", "trl", "datasets", "xgrammar", "datasketch", "rouge-score", "papermill", "openai",
            "anthropic", "google-genai", "pydantic", "sentence-transformers"]
LAYOUT = 2  # run-folder layout; a folder of another layout is refused (see check_layout)
EARLIER_LAYOUT_FOLDERS = ("synth", "dedup", "models", "responses", "judgements", "figures")
LOGS_DIR = "logs"  # <run>/logs/<stage>.log: the libraries' warnings and log lines while the stage ran
CYCLES_JSON = "cycles.json"  # the cycle loop's decisions (written by the runner when it cycles)
INVOCATIONS_JSONL = "invocations.jsonl"  # every command run on the folder, appended by the runner
SEARCH_JSON = "search.json"  # the volume search's steps (written by the runner in a search)
ORPHANED = "orphaned"  # outputs of cells no longer in the grid are moved here, never reported


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def without_operational(dumped: dict) -> dict:
    """The dumped params without the operational settings: of `service`, of every judge, `execution` and `tracking`."""

    def strip(service):
        if isinstance(service, dict):
            return {k: v for k, v in service.items() if k not in SERVICE_OPERATIONAL}
        if isinstance(service, list):
            return [strip(s) for s in service]
        return service

    out = dict(dumped)
    out.pop("execution", None)  # where units run (local, Ray) changes none of them
    out.pop("tracking", None)  # nor where the run is also logged
    if "service" in out:
        out["service"] = strip(out["service"])
    if isinstance(out.get("evaluate"), dict) and out["evaluate"].get("judges") is not None:
        out["evaluate"] = dict(out["evaluate"], judges=strip(out["evaluate"]["judges"]))
    return out


def depends_on(params: Params, paths: Iterable[str]) -> dict:
    dumped = without_operational(params.dump())
    return {path: _get(dumped, path) for path in paths}


# -- content fingerprints --------------------------------------------------------------------------
RECORD_NAMES = ("DONE.json", "UNIT.json")


def content_fingerprint(paths: Path | str | Iterable[Path | str], base: Optional[Path] = None) -> Optional[str]:
    """A hash of the bytes (and relative names) of files or folders; None when any is missing.

    Bookkeeping files (DONE.json, UNIT.json, `*.unit.json`, hidden temporaries) do not count."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    h = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _bookkeeping(p))
        elif path.is_file():
            files = [path]
        else:
            return None
        for f in files:
            name = f.relative_to(base) if base and f.is_relative_to(base) else f.relative_to(path) if path.is_dir() else Path(f.name)
            h.update(str(name).encode() + b"\0" + file_fingerprint(f).encode() + b"\0")
    return h.hexdigest()[:16]


def _bookkeeping(path: Path) -> bool:
    return path.name in RECORD_NAMES or path.name.endswith(".unit.json") or path.name.startswith(".")


# -- units ---------------------------------------------------------------------------------------------
class Unit:
    """One reusable output and its record (`UNIT.json` in its folder, or `<file>.unit.json` beside it).

    `made_from` is everything the unit depends on: params and the content fingerprints of its inputs."""

    def __init__(self, outputs: Path | list[Path], record: Path, made_from: dict):
        self.outputs = [outputs] if isinstance(outputs, Path) else list(outputs)
        self.record_path = record
        self.made_from = made_from
        self.fingerprint = fingerprint(made_from)

    @classmethod
    def folder(cls, folder: Path, made_from: dict) -> "Unit":
        return cls(folder, folder / "UNIT.json", made_from)

    @classmethod
    def file(cls, path: Path, made_from: dict) -> "Unit":
        return cls(path, path.with_name(path.name + ".unit.json"), made_from)

    def record(self) -> Optional[dict]:
        if not self.record_path.exists():
            return None
        with contextlib.suppress(ValueError, OSError):
            return read_json(self.record_path)
        return None

    def current(self, force: bool = False) -> Optional[dict]:
        """The record when the unit can be reused: same fingerprint, outputs unchanged since recorded."""
        record = self.record()
        if force or not record or record.get("fingerprint") != self.fingerprint:
            return None
        if record.get("content") != content_fingerprint(self.outputs):
            return None
        return record

    def discard(self) -> None:
        """Remove a stale record first, so a crash mid-redo never leaves outputs vouched for by it."""
        with contextlib.suppress(FileNotFoundError):
            self.record_path.unlink()

    def commit(self, **extra) -> dict:
        record = dict(extra, fingerprint=self.fingerprint, made_from=self.made_from, content=content_fingerprint(self.outputs),
                      made_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), unit_id=uuid.uuid4().hex, code=code_identity())
        write_json(self.record_path, record)
        return record


# -- cycles ---------------------------------------------------------------------------------------------
CYCLE_FOLDER = re.compile(r"^cycle-(\d+)$")
SHARED_STAGES = {"coverage"}  # one coverage set for all cycles, at the run folder's top


def cycle_of(folder: Path | str) -> int:
    """1 for the run folder itself, t for its `cycle-<t>/` folder."""
    match = CYCLE_FOLDER.match(Path(folder).name)
    return int(match[1]) if match and int(match[1]) >= 2 else 1


def root_of(folder: Path | str) -> Path:
    """The run folder a cycle folder belongs to (itself for cycle 1)."""
    return Path(folder).parent if cycle_of(folder) > 1 else Path(folder)


def cycle_folder(run_dir: Path | str, cycle: int) -> Path:
    root = root_of(run_dir)
    return root if cycle == 1 else root / f"cycle-{cycle}"


def cycle_folders(run_dir: Path | str) -> list[tuple[int, Path]]:
    """(cycle, folder) of every cycle the run folder has, in order."""
    root = root_of(run_dir)
    later = sorted((cycle_of(p), p) for p in root.glob("cycle-*") if p.is_dir() and cycle_of(p) > 1)
    return [(1, root)] + later


def stage_dir(run_dir: Path | str, stage: str) -> Path:
    base = root_of(run_dir) if stage in SHARED_STAGES else Path(run_dir)
    return base / stage


def done_path(run_dir: Path | str, stage: str) -> Path:
    return stage_dir(run_dir, stage) / "DONE.json"


def read_done(run_dir: Path | str, stage: str) -> Optional[dict]:
    path = done_path(run_dir, stage)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except ValueError:
        return None


def output_content(run_dir: Path | str, stage: str) -> Optional[str]:
    """The content fingerprint a finished stage recorded for its outputs (None when not finished)."""
    return (read_done(run_dir, stage) or {}).get("content")


# -- layout check ------------------------------------------------------------------------------------------
def check_layout(run_dir: Path | str) -> None:
    """Refuse a run folder written by an earlier layout (folders synth/, models/, …; no unit records):
    its outputs carry no record of what made them, so none can be trusted or reused."""
    root = root_of(run_dir)
    old = [name for name in EARLIER_LAYOUT_FOLDERS if (root / name).is_dir()]
    manifest = root / "manifest.json"
    layout = None
    if manifest.exists():
        with contextlib.suppress(ValueError, OSError):
            layout = read_json(manifest).get("layout")
    if old or (manifest.exists() and layout != LAYOUT):
        found = f"folders {', '.join(n + '/' for n in old)}" if old else f"layout {layout or 1}"
        raise UserError(f"{root} was made by an earlier version of the workbench ({found}); its outputs record nothing of what "
                        f"made them. Run the experiment again into a new folder: llamaduo run PARAMS --run-dir NEW_FOLDER "
                        f"(the old folder is left as it is)")


# -- orphans ------------------------------------------------------------------------------------------------
def set_aside(run_dir: Path | str, stage: str, paths: Iterable[Path], why: str, log=print) -> list[Path]:
    """Move outputs of cells no longer in the grid to `<run>/orphaned/<cycle-folder>/<stage>/…` (never deleted,
    never reported) and say so."""
    moved = []
    root = root_of(run_dir)
    for path in paths:
        if not path.exists():
            continue
        relative = path.relative_to(Path(run_dir))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        cycle_part = Path(run_dir).name if cycle_of(run_dir) > 1 else "."
        target = root / ORPHANED / cycle_part / f"{relative}.{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(target))
        record = path.with_name(path.name + ".unit.json")  # an answer file's record travels with it
        if record.exists():
            shutil.move(str(record), str(target.with_name(target.name + ".unit.json")))
        moved.append(target)
    if moved:
        log(f"[{stage}] {len(moved)} output(s) of cells no longer in the grid ({why}) moved to "
            f"{root / ORPHANED}: " + ", ".join(str(p.relative_to(root / ORPHANED)) for p in moved[:4])
            + (" …" if len(moved) > 4 else ""))
    return moved


# -- stages -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """What a stage is made from, declared next to its `run` (`STAGE = Stage(...)` in `stages/<name>.py`).

    `name` is one word everywhere: module `stages/<name>.py`, folder `<run>/<name>/`, notebook `0N_<name>.ipynb`,
    the CLI's --stages/--force word. `upstream`: stages whose outputs it reads (their content fingerprints are its
    inputs); `optional_upstream`: read when they have run. `depends_on`: dotted params paths its outputs depend on
    (operational settings are left out). `reads(params, run_dir) -> dict`: any other content it reads (a prompt
    file, the human labels, earlier cycles' outputs), fingerprinted with the rest. The order of stages is the list
    in `stages/__init__.py`."""

    name: str
    upstream: tuple[str, ...]
    depends_on: tuple[str, ...]
    reads: Optional[Callable[[Params, Path], dict]] = None
    optional_upstream: tuple[str, ...] = ()
    make: Optional[Callable[..., "StageResult"]] = field(default=None, compare=False)

    def produces(self, make: Callable[..., "StageResult"]) -> Callable[..., "StageResult"]:
        """Decorator: `make(stage_run, params, run_dir, force)` writes the stage's outputs (after `stage_run.begin()`)."""
        object.__setattr__(self, "make", make)
        return make

    def run(self, params: Params, run_dir: Path | str, force: bool = False) -> "StageResult":
        """The one preamble of every stage: skipped when up to date, else its `make`."""
        stage_run = StageRun(self, params, run_dir, force)
        if stage_run.up_to_date():
            return stage_run.skipped()
        with library_output_to(Path(run_dir) / LOGS_DIR / f"{self.name}.log"):  # the notebook keeps the story
            return self.make(stage_run, params, Path(run_dir), force)

    def inputs(self) -> list[str]:
        return list(self.upstream) + list(self.optional_upstream)


def stage_fingerprint(stage: Stage, params: Params, run_dir: Path | str) -> str:
    """The params the stage depends on, what else it reads (its `reads`), and the content of every input stage."""
    parts: dict = {"stage": stage.name, "params": depends_on(params, stage.depends_on), "layout": LAYOUT}
    if stage.reads:
        parts.update(stage.reads(params, Path(run_dir)))
    parts["inputs"] = {up: output_content(run_dir, up) for up in stage.inputs()}
    return fingerprint(parts)


def earlier_cycles(run_dir: Path | str, stage: str) -> list[Optional[str]]:
    """The content of `stage` in every cycle before this one (none in cycle 1)."""
    return [output_content(cycle_folder(run_dir, c), stage) for c in range(1, cycle_of(run_dir))]


def later_cycles(run_dir: Path | str, stage: str) -> list[Optional[str]]:
    """The content of `stage` in every cycle after the first (for stages that cover every cycle)."""
    return [output_content(folder, stage) for _, folder in cycle_folders(run_dir)[1:]]


def optional_file(path: Path) -> Optional[str]:
    return file_fingerprint(path) if path.exists() else None


def is_done(stage: Stage, params: Params, run_dir: Path | str) -> bool:
    """DONE.json carries the current fingerprint and the stage's outputs still have the recorded content."""
    done = read_done(run_dir, stage.name)
    if not done or done.get("fingerprint") != stage_fingerprint(stage, params, run_dir):
        return False
    return done.get("content") == stage_content(run_dir, stage.name, done.get("outputs") or [])


def stage_content(run_dir: Path | str, stage: str, outputs: list[str]) -> Optional[str]:
    folder = stage_dir(run_dir, stage)
    return content_fingerprint([folder / o for o in outputs], base=folder) if outputs else None


@dataclass
class StageResult:
    stage: str
    run_dir: Path
    skipped: bool
    counts: dict = field(default_factory=dict)
    seconds: float = 0.0
    llm: dict = field(default_factory=dict)
    outputs: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:  # the counts are those of the execution that made the outputs: what it did "now" was then
            counts = {k: v for k, v in self.counts.items() if not k.endswith("_now")}
            state = "up to date, nothing redone; its outputs"
        else:
            counts, state = self.counts, f"done in {self.seconds:.1f} s"
        return f"{self.stage}: {state}: " + ", ".join(f"{k}={v}" for k, v in counts.items() if not isinstance(v, (dict, list)))


_executions: dict = {}  # run folder -> the stage executing in it now (a fresh token per execution)


def current_execution(run_dir: Path | str) -> str:
    """The stage execution under way in `run_dir` (its spend ledgers are per execution); '' outside one."""
    return _executions.get(str(Path(run_dir).resolve()), "")


class StageRun:
    """Bookkeeping for one execution of a stage: skip check, DONE.json, manifest.

    Until `begin()` nothing is written: a notebook opened to explore a finished run only reads it."""

    def __init__(self, stage: Stage, params: Params, run_dir: Path | str, force: bool = False):
        check_layout(run_dir)
        self.contract = stage
        self.stage = stage.name
        self.params = params
        self.run_dir = Path(run_dir)
        self.dir = stage_dir(run_dir, stage.name)
        self.force = force
        self.fingerprint = stage_fingerprint(stage, params, run_dir)
        self.started = time.time()

    def up_to_date(self) -> bool:
        return not self.force and is_done(self.contract, self.params, self.run_dir)

    def skipped(self) -> StageResult:
        done = read_done(self.run_dir, self.stage) or {}
        return StageResult(self.stage, self.run_dir, True, counts=done.get("counts", {}), seconds=done.get("seconds", 0.0), llm=done.get("llm", {}))

    def begin(self) -> None:
        _executions[str(Path(self.run_dir).resolve())] = f"{self.stage}@{uuid.uuid4().hex}"
        for up in self.contract.upstream:
            if read_done(self.run_dir, up) is None:
                raise UserError(f"stage '{self.stage}' needs stage '{up}' to have finished in {self.run_dir} first")
        self.dir.mkdir(parents=True, exist_ok=True)
        # An old DONE.json must not vouch for outputs this execution is about to replace.
        with contextlib.suppress(FileNotFoundError):
            done_path(self.run_dir, self.stage).unlink()
        resolved = root_of(self.run_dir) / "params.yaml"
        if not resolved.exists():  # a notebook run by hand on a new folder
            write_yaml(resolved, self.params.dump())

    def finish(self, counts: dict, outputs: list[str], llm: Optional[dict] = None, units: Optional[dict] = None,
               extra: Optional[dict] = None) -> StageResult:
        """`outputs`: the stage's output files and folders, relative to its folder; their content becomes the
        stage's content fingerprint, the input of later stages. `units`: what was redone, reused or set aside."""
        seconds = round(time.time() - self.started, 2)
        done = {
            "stage": self.stage,
            "layout": LAYOUT,
            "fingerprint": self.fingerprint,
            "content": stage_content(self.run_dir, self.stage, outputs),
            "outputs": sorted(outputs),
            "completion_id": uuid.uuid4().hex,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": seconds,
            "counts": counts,
            "units": units or {},
            "llm": llm or {},
            "inputs": {u: output_content(self.run_dir, u) for u in self.contract.upstream},
            "code": {"git_commit": code_identity()["git_commit"], "dirty": code_identity()["dirty"], "versions": _versions()},
            **(extra or {}),
        }
        update_manifest(self.run_dir, self.params, self.stage, done)
        write_json(done_path(self.run_dir, self.stage), done)
        return StageResult(self.stage, self.run_dir, False, counts=counts, seconds=seconds, llm=llm or {})


@functools.lru_cache(maxsize=1)
def code_identity() -> dict:
    """The code of this process: the package version, the git commit of the checkout and whether it had local
    changes (asked once per process: every unit and stage record carries it)."""
    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", str(PROJECT_ROOT), *args], capture_output=True, text=True, timeout=5)
            return out.stdout.strip() if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD") or None
    changes = git("status", "--porcelain", "--untracked-files=no", "--", "llamaduo_nb") if commit else None
    return {"llamaduo-nb": __version__, "git_commit": commit, "dirty": bool(changes)}


def _versions() -> dict:
    out = {"python": platform.python_version(), "llamaduo-nb": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def record_invocation(run_dir: Path | str, params: Params, arguments: list[str]) -> Path:
    """Append one command (its arguments, the code that ran it, the params' fingerprint) to `invocations.jsonl`, the
    run folder's history of commands. An append-only log of its own, not a list inside manifest.json: the manifest is
    then rewritten only when a stage made outputs, so an invocation that skips every stage changes no record."""
    path = Path(run_dir) / INVOCATIONS_JSONL
    line = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "arguments": arguments, "code": code_identity(),
            "params_fingerprint": fingerprint(without_operational(params.dump()))}
    earlier = path.read_text(encoding="utf-8") if path.exists() else ""
    return write_text(path, earlier + json.dumps(line, ensure_ascii=False) + "\n")  # whole or not at all, as every record


def update_manifest(run_dir: Path | str, params: Params, stage: Optional[str] = None, done: Optional[dict] = None) -> dict:
    """Record seeds, params and (when given) one stage's DONE record in manifest.json. The code (git commit, package
    versions) is recorded per stage, when the stage made its outputs (and per unit, in its record): the top-level
    `git_commit` / `versions` are the code of the stage that ran last."""
    path = Path(run_dir) / "manifest.json"
    manifest = read_json(path) if path.exists() else {}
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest["layout"] = LAYOUT
    manifest["run_name"] = params.run_name
    manifest["seed"] = params.seed
    manifest["params_fingerprint"] = fingerprint(without_operational(params.dump()))
    stages = manifest.setdefault("stages", {})
    if stage and done:
        stages[stage] = {k: done.get(k) for k in ("fingerprint", "content", "inputs", "completion_id", "finished_at", "seconds", "counts",
                                                  "units", "llm")}
        if done.get("code"):
            stages[stage]["code"] = done["code"]
            manifest["git_commit"], manifest["versions"] = done["code"]["git_commit"], done["code"]["versions"]
        if done.get("warnings"):  # e.g. the deploy stage's parity check: the served model is not the evaluated one
            stages[stage]["warnings"] = done["warnings"]
    totals: dict = {}
    for record in stages.values():
        for acc in (record.get("llm") or {}).values():
            for key in ("requests", "cache_hits", "api_calls", "retries", "reasks", "failures", "input_tokens", "output_tokens", "cost_usd"):
                totals[key] = round(totals.get(key, 0) + (acc.get(key) or 0), 6)
    manifest["llm_totals"] = totals
    write_json(path, manifest)
    return manifest

