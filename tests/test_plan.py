"""`llamaduo run --dry-run` prints the grid and the calls it implies, and runs nothing."""

import subprocess
import sys

from llamaduo_nb.core.params import PROJECT_ROOT

from llamaduo_nb.core.params_file import load_params
from llamaduo_nb.pipeline.plan import describe


def test_paper_grid_and_call_counts():
    params = load_params(PROJECT_ROOT / "params" / "paper.yaml", ["coverage.max_test_prompts=100"])
    text = describe(params)
    assert "tasks (4)" in text and "local models (4)" in text and "volumes (9)" in text and "144 adapters" in text
    # 300k valid pairs per task, 5 per call, 15 % expected loss: ceil(300000 / 4.25) = 70,589 calls per task
    assert "synthesize: 282,356 calls" in text
    # (4 tasks × 4 models × 10 volumes (with the base) + 4 tasks of the service LLM's own answers) × 100 prompts × K=4 × M=10
    assert "656,000 calls per judge" in text


def test_dry_run_writes_nothing(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "llamaduo_nb", "run", "params/quickstart.yaml", "--dry-run", "--run-dir", str(tmp_path / "r")],
                          cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "Grid:" in proc.stdout
    assert not (tmp_path / "r").exists()


def test_dry_run_names_the_spend_caps():
    params = load_params(PROJECT_ROOT / "params" / "quickstart.yaml", ["cycle.max_cost_usd=20", "service.max_cost_usd=5"])
    text = describe(params)
    assert "Run-wide cost cap (cycle.max_cost_usd, enforced while calls are in flight, counting every stage and cycle): $20" in text
    assert "Cost caps per stage (max_cost_usd of each service, shared by every client a stage builds" in text and ": $5 per stage allows" in text
