"""Run the finetune stage outside papermill, e.g. under `accelerate launch` for several GPUs:

    accelerate launch --config_file params/accelerate/ddp.yaml -m llamaduo_nb.finetune_cli params/paper.yaml --run-dir results/<run>

The run folder must hold finished coverage, synthesize and deduplicate stages (`llamaduo run ... --stages
coverage,synthesize,deduplicate`); afterwards `llamaduo run` on the same folder skips finetune and goes on.
"""

import argparse
import sys

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.stages import finetune
from llamaduo_nb.core.params_file import load_params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m llamaduo_nb.finetune_cli")
    ap.add_argument("params")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--force", action="store_true")
    args = ap.parse_args(argv)
    try:
        params = load_params(args.params, args.overrides)
        print(finetune.run(params, args.run_dir, force=args.force).summary())
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
