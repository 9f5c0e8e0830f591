"""Command line: `llamaduo run|validate|doctor|report|serve` (also `python -m llamaduo_nb`)."""

from __future__ import annotations

import argparse
import os
import sys

from llamaduo_nb import serving
from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.models import available
from llamaduo_nb.core.params import PROJECT_ROOT
from llamaduo_nb.core.params_file import load_family, load_params
from llamaduo_nb.methods.planning import pooled_sd
from llamaduo_nb.pipeline.doctor import check_params
from llamaduo_nb.pipeline.plan import describe
from llamaduo_nb.pipeline.runner import WRITE_ERRNOS, StageFailed, default_run_dir, run
from llamaduo_nb.stages.report import compare_runs, export_pdf, load_verdicts

KEY_ENVS = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llamaduo", description="LlamaDuo workbench: service LLM → small local LLM.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run (or resume) an experiment: the seven notebooks in order")
    r.add_argument("params", help="params YAML file, e.g. params/quickstart.yaml")
    r.add_argument("--run-dir", help="run folder (default results/<run_name>-<timestamp>); an existing one is resumed")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a param (repeatable)")
    r.add_argument("--stages", help="comma-separated subset of stages to run")
    r.add_argument("--force", action="append", default=[], nargs="?", const="", metavar="STAGE",
                   help="redo STAGE even if it is up to date (repeatable); bare --force: accept params that differ from "
                        "those the run folder was made with, redoing the stages they affect")
    r.add_argument("--only", metavar="CELLS", help="redo single grid cells of an existing run, e.g. task=coding,volume=4096 "
                                                     "(keys task, model, volume; several values with |)")
    r.add_argument("--dry-run", action="store_true", help="print the grid, the service-LLM calls and the estimated cost; run nothing")
    r.add_argument("--gpus", type=int, metavar="N", help="with --dry-run: how many units run at once on N GPUs, and the wall-hours")
    v = sub.add_parser("validate", help="check a params file")
    v.add_argument("params")
    v.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    d = sub.add_parser("doctor", help="what is available: models, GPU, API keys (names only); with PARAMS: what that run needs")
    d.add_argument("params", nargs="?", help="check what this params file needs: keys, one live request per service LLM, JSON mode, limits")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    d.add_argument("--offline", action="store_true", help="no live request (checks keys, packages and hardware only)")
    srv = sub.add_parser("serve", help="serve GGUF files with llama.cpp's Python server (llama-cpp-python[server]), the weight "
                                       "repack off: the stock server crashes on AMX CPUs (Sapphire Rapids and later) without it")
    srv.add_argument("gguf", nargs="+", help="GGUF file(s), e.g. results/<run>/deploy/<task>/<model>/<volume>@c1/export/model.q8_0.gguf")
    srv.add_argument("--alias", action="append", default=[], help="the model name a GGUF answers to (one per file, in order; default its path)")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8080)
    srv.add_argument("--n-ctx", type=int, default=4096)
    srv.add_argument("--threads", type=int, default=None, help="CPU threads (default: llama.cpp's own choice)")
    rep = sub.add_parser("report", help="rebuild a run's report (figures, report.html); several runs: overlay them")
    rep.add_argument("runs", nargs="+", help="run folders")
    rep.add_argument("--out", help="folder for a comparison of several runs (default results/compare-<timestamp>)")
    rep.add_argument("--pdf", action="store_true", help="also print report.html to report.pdf (needs Chrome or Chromium on PATH)")
    return p


def doctor() -> int:
    import importlib.util
    import platform


    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} CPU cores")
    try:
        import torch

        gpu = f"CUDA: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "no CUDA GPU (CPU only: LoRA in float32; nf4/QLoRA and vLLM unavailable)"
        print(f"torch {torch.__version__}; {gpu}")
    except ImportError:
        print("torch: not installed")
    for alias, state in available().items():
        print(f"local model {alias}: {state}")
    for pkg in ("xgrammar", "bitsandbytes", "vllm", "openai", "anthropic", "google.genai"):
        found = importlib.util.find_spec(pkg.split(".")[0]) is not None and (pkg != "google.genai" or importlib.util.find_spec(pkg) is not None)
        print(f"package {pkg}: {'installed' if found else 'not installed'}")
    for name in KEY_ENVS:
        print(f"API key {name}: {'set' if os.environ.get(name) else 'not set'}")
    return 0


def _keys_not_needed(params_file) -> None:
    """The report stage sends no request: let the run's key check pass without the keys. A variable
    that is not set gets a value no provider accepts, in this process and the kernels it starts."""

    params = load_params(params_file)
    for cfg in [params.service] + params.judges:
        if cfg.api_key_env and not os.environ.get(cfg.api_key_env):
            os.environ[cfg.api_key_env] = "not-needed-by-report"
        if cfg.backend != "local" and not cfg.api_key_env and not cfg.base_url:
            sdk_vars = {"openai": ["OPENAI_API_KEY"], "anthropic": ["ANTHROPIC_API_KEY"], "gemini": ["GEMINI_API_KEY", "GOOGLE_API_KEY"]}
            names = sdk_vars.get(cfg.backend, [])
            if names and not any(os.environ.get(n) for n in names):
                os.environ[names[0]] = "not-needed-by-report"


def report(runs: list[str], out: str | None, pdf: bool = False) -> int:
    import time
    from pathlib import Path

    if len(runs) == 1 and (Path(runs[0]) / "sweep.json").exists():  # a sweep over service LLMs: compare its runs
        import json

        sweep = Path(runs[0])
        members = [str(sweep / f) for f in json.loads((sweep / "sweep.json").read_text())["folders"] if (sweep / f / "metrics.csv").exists()]
        if len(members) < 2:
            raise UserError(f"{sweep}: fewer than two finished runs in this sweep")
        runs, out = members, out or str(sweep / "comparison")
    for run_dir in runs:
        if not (Path(run_dir) / "metrics.csv").exists():
            raise UserError(f"{run_dir}: not a finished run folder (no metrics.csv)")
    if len(runs) == 1:
        run_dir = Path(runs[0]).resolve()
        _keys_not_needed(run_dir / "params.yaml")
        run(run_dir / "params.yaml", run_dir, stages="report", force=["report"])
        print(f"report: {run_dir / 'report.html'}\n  figures: {run_dir / 'report'}")
        if pdf:
            print(f"  pdf: {export_pdf(run_dir / 'report.html', run_dir / 'report.pdf')}")
        return 0

    target = Path(out) if out else PROJECT_ROOT / "results" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    for path in compare_runs(runs, target):
        print(path)
    return 0


def _pilot(params, run_dir: str | None) -> dict:
    """The planner's pilot: the spread of the verdicts of an earlier run of these params, when its report exists."""
    from pathlib import Path


    folder = Path(run_dir) if run_dir else default_run_dir(params)
    verdicts = load_verdicts(folder) if folder.exists() else None
    if verdicts is None or verdicts.empty:
        return {}
    return {"pilot_sd": pooled_sd(verdicts["sd"]), "pilot_source": f"the run in {folder}"}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "validate":
            family = load_family(args.params, args.overrides)
            params = family[0]
            services = f" × {len(family)} service LLMs" if len(family) > 1 else ""
            print(f"{args.params}: valid ({len(params.tasks)} tasks × {len(params.finetune.base_models)} local models × "
                  f"{len(params.finetune.volumes)} volumes × {len(params.judges)} judge(s){services})")
            return 0
        if args.command == "doctor":
            code = doctor()
            if args.params:
                code = check_params(args.params, args.overrides, offline=args.offline)
            return code
        if args.command == "report":
            return report(args.runs, args.out, args.pdf)
        if args.command == "serve":
            return serving.serve(args.gguf, args.alias, args.host, args.port, args.n_ctx, args.threads)
        if args.command == "run" and args.gpus is not None and not args.dry_run:
            raise UserError("--gpus goes with --dry-run (a run uses the GPUs its Ray cluster or machine has)")
        if args.command == "run" and args.dry_run:
            if args.gpus is not None and args.gpus < 1:
                raise UserError(f"--gpus: {args.gpus} is not a number of GPUs (1 or more)")
            family = load_family(args.params, args.overrides)
            print(describe(family, gpus=args.gpus, **_pilot(family[0], args.run_dir)))
            return 0
        if args.command == "run":
            try:
                run_dir = run(args.params, args.run_dir, args.overrides, args.stages, args.force, only=args.only)
            except StageFailed as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"results: {run_dir}\n  metrics: {run_dir / 'metrics.csv'}\n  figures: {run_dir / 'report'}\n  notebooks: {run_dir / 'notebooks'}")
            return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # unwritable run folder, disk full, …

        where = f"{exc.filename}: " if getattr(exc, "filename", None) else ""
        hint = " (the run folder must be writable and its disk not full)" if exc.errno in WRITE_ERRNOS else ""
        print(f"error: {where}{exc.strerror or exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
