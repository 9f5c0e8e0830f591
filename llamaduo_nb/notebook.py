"""What a notebook calls: one line to set up, one line per stage.

    from llamaduo_nb import notebook as nb
    params, run_dir = nb.setup(params_file, run_dir, overrides)
    result = nb.run_stage("synthesize", params, run_dir, force)
"""

from __future__ import annotations

import importlib
from pathlib import Path

from .io import write_yaml
from .params import Params, load_params
from .stage import StageResult, update_manifest

STAGE_MODULES = {
    "coverage": "coverage", "synthesize": "synth", "deduplicate": "dedup", "finetune": "finetune",
    "infer": "infer", "evaluate": "evaluate", "report": "report",
}


def setup(params_file: str | Path, run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Params, Path]:
    """Load and validate the params; create the run folder with its resolved params.yaml."""
    params = load_params(params_file, overrides)
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = run_dir / "params.yaml"
    if not resolved.exists() or Path(params_file).resolve() != resolved:
        write_yaml(resolved, params.dump())
    update_manifest(run_dir, params)
    return params, run_dir


def run_stage(stage: str, params: Params, run_dir: str | Path, force: bool = False) -> StageResult:
    from .cycle import params_for_cycle

    module = importlib.import_module(f".{STAGE_MODULES[stage]}", __package__)
    result = module.run(params_for_cycle(params, run_dir), run_dir, force=force)
    print(result.summary())
    return result


def llm_table(result: StageResult):
    """The stage's service-LLM accounting as a small table."""
    import pandas as pd

    if not result.llm:
        return pd.DataFrame()
    frame = pd.DataFrame(result.llm).T
    frame.index.name = "service LLM"
    return frame.drop(columns=["failure_reasons"], errors="ignore")
