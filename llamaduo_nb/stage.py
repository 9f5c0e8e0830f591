"""The run folder and the stage contract.

A stage is `run(params, run_dir, force=False) -> StageResult`. It reads only files
of earlier stages, writes only under its own folder (atomically), and writes
`<folder>/DONE.json` last. DONE.json holds the stage's fingerprint: a hash of the
params the stage depends on, its prompt files, and the completion ids of the stages
it reads from. A stage whose DONE.json carries the current fingerprint is skipped.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import platform
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import __version__
from .io import file_fingerprint, fingerprint, read_json, write_json
from .params import PROJECT_ROOT, Params, resolve_prompt

STAGES = ["coverage", "synthesize", "deduplicate", "finetune", "infer", "evaluate", "report"]
NOTEBOOKS = {
    "coverage": "01_coverage.ipynb",
    "synthesize": "02_synthesize.ipynb",
    "deduplicate": "03_deduplicate.ipynb",
    "finetune": "04_finetune.ipynb",
    "infer": "05_infer.ipynb",
    "evaluate": "06_evaluate.ipynb",
    "report": "07_report.ipynb",
}
FOLDERS = {
    "coverage": "coverage",
    "synthesize": "synth",
    "deduplicate": "dedup",
    "finetune": "models",
    "infer": "responses",
    "evaluate": "judgements",
    "report": "figures",
}
UPSTREAM = {
    "coverage": [],
    "synthesize": ["coverage"],
    "deduplicate": ["coverage", "synthesize"],
    "finetune": ["deduplicate"],
    "infer": ["coverage", "finetune"],
    "evaluate": ["coverage", "infer"],
    "report": ["deduplicate", "finetune", "infer", "evaluate"],
}
# Params each stage's outputs depend on (dotted paths into the params).
DEPENDS_ON = {
    "coverage": ["tasks", "coverage"],
    "synthesize": ["seed", "tasks", "service", "synthesize"],
    "deduplicate": ["deduplicate"],
    "finetune": ["seed", "finetune"],
    "infer": ["seed", "infer"],
    "evaluate": ["evaluate", "service"],
    "report": ["evaluate.zetas", "cycle.target"],
}
# Service settings that change how fast answers come, not what they are.
OPERATIONAL = {"batch_api", "max_concurrency", "requests_per_minute", "tokens_per_minute", "timeout_s", "max_retries", "batch_size", "price_input_per_mtok", "price_output_per_mtok", "api_key_env"}
PACKAGES = ["torch", "transformers", "peft", "trl", "datasets", "xgrammar", "datasketch", "rouge-score", "papermill", "openai", "anthropic", "google-genai", "pydantic", "sentence-transformers"]


def _get(tree: dict, dotted: str) -> Any:
    node: Any = tree
    for key in dotted.split("."):
        node = node.get(key) if isinstance(node, dict) else None
    return node


def _strip_operational(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _strip_operational(v) for k, v in node.items() if k not in OPERATIONAL}
    if isinstance(node, list):
        return [_strip_operational(v) for v in node]
    return node


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
    return base / FOLDERS[stage]


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


def stage_fingerprint(stage: str, params: Params, run_dir: Path | str) -> str:
    dumped = params.dump()
    parts: dict = {"stage": stage, "params": {k: _strip_operational(_get(dumped, k)) for k in DEPENDS_ON[stage]}}
    if stage == "synthesize":
        parts["prompt"] = file_fingerprint(resolve_prompt(params.synthesize.prompt))
    if stage == "evaluate":
        parts["prompt"] = file_fingerprint(resolve_prompt(params.evaluate.prompt))
        if params.evaluate.pairwise:
            parts["pairwise_prompt"] = file_fingerprint(resolve_prompt(params.evaluate.pairwise_prompt))
    upstream = {}
    for up in UPSTREAM[stage]:
        done = read_done(run_dir, up)
        upstream[up] = done.get("completion_id") if done else None
    parts["upstream"] = upstream
    cycle = cycle_of(run_dir)
    if cycle > 1 and stage in ("deduplicate", "finetune", "infer"):
        # dedup and fine-tuning read every earlier cycle's kept pairs; infer reuses cycle 1's base-model answers
        earlier = "deduplicate" if stage != "infer" else "infer"
        cycles = range(1, cycle) if stage != "infer" else [1]
        parts["earlier_cycles"] = [(read_done(cycle_folder(run_dir, c), earlier) or {}).get("completion_id") for c in cycles]
    if stage == "report":  # the report covers every cycle
        parts["cycles"] = [(read_done(folder, "evaluate") or {}).get("completion_id") for _, folder in cycle_folders(run_dir)[1:]]
    parts["version"] = __version__
    return fingerprint(parts)


def is_done(stage: str, params: Params, run_dir: Path | str) -> bool:
    done = read_done(run_dir, stage)
    return bool(done) and done.get("fingerprint") == stage_fingerprint(stage, params, run_dir)


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
        state = "skipped (up to date)" if self.skipped else f"done in {self.seconds:.1f} s"
        return f"{self.stage}: {state}; " + ", ".join(f"{k}={v}" for k, v in self.counts.items() if not isinstance(v, (dict, list)))


class StageRun:
    """Bookkeeping for one execution of a stage: skip check, DONE.json, manifest."""

    def __init__(self, stage: str, params: Params, run_dir: Path | str, force: bool = False):
        self.stage = stage
        self.params = params
        self.run_dir = Path(run_dir)
        self.dir = stage_dir(run_dir, stage)
        self.force = force
        self.fingerprint = stage_fingerprint(stage, params, run_dir)
        self.started = time.time()

    def up_to_date(self) -> bool:
        done = read_done(self.run_dir, self.stage)
        return not self.force and bool(done) and done.get("fingerprint") == self.fingerprint

    def skipped(self) -> StageResult:
        done = read_done(self.run_dir, self.stage) or {}
        return StageResult(self.stage, self.run_dir, True, counts=done.get("counts", {}), seconds=done.get("seconds", 0.0), llm=done.get("llm", {}))

    def begin(self) -> None:
        for up in UPSTREAM[self.stage]:
            if read_done(self.run_dir, up) is None:
                from .errors import UserError

                raise UserError(f"stage '{self.stage}' needs stage '{up}' to have finished in {self.run_dir} first")
        self.dir.mkdir(parents=True, exist_ok=True)
        # An old DONE.json must not vouch for outputs this execution is about to replace.
        with contextlib.suppress(FileNotFoundError):
            done_path(self.run_dir, self.stage).unlink()

    def finish(self, counts: dict, llm: Optional[dict] = None, outputs: Optional[dict] = None) -> StageResult:
        seconds = round(time.time() - self.started, 2)
        done = {
            "stage": self.stage,
            "fingerprint": self.fingerprint,
            "completion_id": uuid.uuid4().hex,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": seconds,
            "counts": counts,
            "llm": llm or {},
            "upstream": {u: (read_done(self.run_dir, u) or {}).get("completion_id") for u in UPSTREAM[self.stage]},
        }
        update_manifest(self.run_dir, self.params, self.stage, done)
        write_json(done_path(self.run_dir, self.stage), done)
        return StageResult(self.stage, self.run_dir, False, counts=counts, seconds=seconds, llm=llm or {}, outputs=outputs or {})


def _git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict:
    out = {"python": platform.python_version(), "llamaduo-nb": __version__}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def update_manifest(run_dir: Path | str, params: Params, stage: Optional[str] = None, done: Optional[dict] = None) -> dict:
    """Record versions, seeds, git commit and (when given) one stage's DONE record in manifest.json."""
    path = Path(run_dir) / "manifest.json"
    manifest = read_json(path) if path.exists() else {}
    manifest.setdefault("created_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    manifest["run_name"] = params.run_name
    manifest["seed"] = params.seed
    manifest["git_commit"] = _git_commit()
    manifest["versions"] = _versions()
    manifest["params_fingerprint"] = fingerprint(params.dump())
    stages = manifest.setdefault("stages", {})
    if stage and done:
        stages[stage] = {k: done[k] for k in ("fingerprint", "completion_id", "finished_at", "seconds", "counts", "llm")}
    totals: dict = {}
    for record in stages.values():
        for acc in (record.get("llm") or {}).values():
            for key in ("requests", "cache_hits", "api_calls", "retries", "reasks", "failures", "input_tokens", "output_tokens", "cost_usd"):
                totals[key] = round(totals.get(key, 0) + (acc.get(key) or 0), 6)
    manifest["llm_totals"] = totals
    write_json(path, manifest)
    return manifest
