"""What changed since a run folder was made, and whether to accept it.

A run folder remembers its resolved params (`params.yaml`). Running it again with params that would
change its outputs is refused with the fields that differ, unless `--force` accepts them; then only
the units whose fingerprints changed are redone (see `units.py`). Operational settings (rate limits,
concurrency, prices, key names), the run name, the cycle budget and how to deploy (`deploy.*`: the
deploy stage redoes its exports when they change; the experiment's results stay as they are) may change freely.
"""

from __future__ import annotations

from pathlib import Path

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.params import Params
from llamaduo_nb.core.units import without_operational


def refuse_changed_params(run_dir: Path, params: Params, accepted: bool) -> None:
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
        raise UserError(f"{run_dir} was made with different params ({shown}); add --force to redo what they affect "
                        f"there, or choose another --run-dir")


def params_differences(old: dict, new: dict) -> list[str]:
    """Dotted fields whose values differ; operational service settings, the run name, the cycle settings and
    the deploy settings left out."""
    out: list[str] = []
    old, new = without_operational(old), without_operational(new)

    def walk(a, b, prefix):
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not prefix and key in ("run_name", "cycle", "deploy"):
                    continue
                walk(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(isinstance(x, dict) for x in a + b):
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{prefix}[{i}]")
        elif a != b:
            out.append(f"{prefix}: {a!r} → {b!r}")

    walk(old, new, "")
    return out
