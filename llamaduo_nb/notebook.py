"""What a notebook calls: one line to set up, one line per stage.

    from llamaduo_nb import notebook as nb
    params, run_dir = nb.setup(params_file, run_dir, overrides)
    result = nb.run_stage("synthesize", params, run_dir, force)
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from llamaduo_nb.core.params import Params
from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.core.units import StageResult, check_layout
from llamaduo_nb.pipeline import runner


def setup(params_file: str | Path, run_dir: str | Path, overrides: list[str] | None = None) -> tuple[Params, Path]:
    """Load and validate the params. Writes nothing: a notebook opened to explore a finished run only reads
    it; the stage writes (its folder, params.yaml, manifest.json) only when it runs."""
    exit_with_runner()
    params = load_params(params_file, overrides)
    run_dir = Path(run_dir).resolve()
    check_layout(run_dir)
    return params, run_dir


def exit_with_runner(poll_s: float = 0.25) -> bool:
    """In a kernel started by `llamaduo run`: exit as soon as that process is gone.

    The runner puts its pid in LLAMADUO_RUNNER_PID. Killed with SIGKILL, it cannot stop the kernel
    it started (in a session of its own), which would go on training or paying for calls unseen; a
    daemon thread notices the runner's death (this process re-parented, or the pid gone) and ends the
    kernel. A notebook opened by hand (no such variable) is left alone. True when the watch started.
    """
    global _WATCHING
    pid = os.environ.get("LLAMADUO_RUNNER_PID", "")
    if _WATCHING or not pid.isdigit() or int(pid) == os.getpid():
        return False
    runner, parent = int(pid), os.getppid()

    def alive() -> bool:
        if os.getppid() != parent:  # the runner (our parent) died: we were re-parented
            return False
        try:
            os.kill(runner, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        try:  # a killed runner not yet reaped is a zombie
            return Path(f"/proc/{runner}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True

    def watch() -> None:
        while alive():
            time.sleep(poll_s)
        os._exit(137)

    threading.Thread(target=watch, name="llamaduo-exit-with-runner", daemon=True).start()
    _WATCHING = True
    return True


_WATCHING = False


def run_stage(stage: str, params: Params, run_dir: str | Path, force: bool = False) -> StageResult:
    result = runner.run_stage(stage, params, run_dir, force)
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
