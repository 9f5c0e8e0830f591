"""The volume search against the full sweep, on score curves with a known truth.

Cells: the base model then the paper's 9 volumes (1k … 256k). Every experiment draws n test prompts; the local
model at each cell and the service LLM answer them with the generative model of `verdict_simulation` (prompt
difficulty shared by every cell and the service LLM, answer noise, judges rounding to 5 and clipping to 0–100,
K = 2, M = 2). Each cell's true mean difference is computed from 400,000 prompts; a pick is wrong when the chosen
cell is truly not better than −δ (H0 true). The search reads the cells smallest first, each at α / 10 (the
workbench's `search_sequence`); the sweep reads them largest first at α (`fixed_sequence`), both through the
verdict module's own t-interval (`t_bounds`).

`python -m tests.search_simulation` prints the table docs/MEASUREMENTS.md holds.
"""

from __future__ import annotations

import numpy as np

from llamaduo_nb.methods.verdict import ALPHA, t_bounds
from .verdict_simulation import PROMPT_SD, side, truth

GRID = [1024 * 2**n for n in range(9)]
VOLUMES = [0] + GRID  # the base model first
SERVICE_MU = 60.0
MARGIN = 5.0
# local − service shift (points, before clipping) per cell: base model, 1k, …, 256k
SCENARIOS = {
    "monotone": [-30, -26, -22, -18, -14, -10, -6, 0, 3, 5],
    "early plateau": [-20, -10, 2, 4, 5, 5, 6, 6, 6, 6],
    "flat at the margin": [-5] * 10,  # every cell exactly δ worse: any pick is wrong
    "noisy": [-30, -12, -20, -8, -14, -3, -9, 1, -4, 3],
    "non-monotone": [-20, -10, 0, 3, -12, -15, -8, 3, 4, 5],
    "never": [-30, -28, -26, -24, -22, -20, -18, -16, -14, -12],
}
LOOKS = len(VOLUMES)


def experiments(rng, reps: int, n: int, shifts: list[float], k: int = 2, m: int = 2) -> np.ndarray:
    """Per-prompt differences (mean statistic), shape (cells, reps, n): every cell against the same service answers."""
    b = rng.normal(0, PROMPT_SD, (reps, n, 1, 1))
    service, _ = side(rng, b, SERVICE_MU, k, m, 50)
    return np.stack([side(rng, b, SERVICE_MU + s, k, m, 50)[0] - service for s in shifts])


def simulate(name: str, n: int, reps: int = 2000, seed: int = 7) -> dict:
    shifts = SCENARIOS[name]
    true = np.array([truth(SERVICE_MU, float(s))[0] for s in shifts])
    margin = -true[0] if name.startswith("flat") else MARGIN  # flat: δ is exactly the true gap (the boundary of H0)
    null = true <= -margin + 1e-9
    d = experiments(np.random.default_rng(seed), reps, n, shifts)
    passes_search = np.stack([t_bounds(d[c], ALPHA / LOOKS)[0] >= -margin for c in range(len(shifts))])  # (cells, reps)
    passes_sweep = np.stack([t_bounds(d[c], ALPHA)[0] >= -margin for c in range(len(shifts))])
    # the search: the first passing cell, smallest first; -1 = none
    any_search = passes_search.any(0)
    search_pick = np.where(any_search, passes_search.argmax(0), -1)
    # the sweep's fixed sequence: largest first while passing; the smallest of that unbroken run
    run = np.cumprod(passes_sweep[::-1], axis=0)[::-1].astype(bool)
    sweep_pick = np.where(run.any(0), run.argmax(0), -1)
    tried = np.where(any_search, np.maximum(search_pick, 1), len(GRID))  # adapters trained: the base model needs none
    cost = np.array([sum(GRID[: t]) for t in range(len(GRID) + 1)])[tried] / sum(GRID)
    wrong = lambda pick: float(np.mean((pick >= 0) & null[np.clip(pick, 0, None)]))  # noqa: E731
    return {
        "scenario": name, "n": n, "reps": reps, "margin": round(float(margin), 2),
        "search_wrong": wrong(search_pick), "sweep_wrong": wrong(sweep_pick),
        "search_found": float(np.mean(search_pick >= 0)), "sweep_found": float(np.mean(sweep_pick >= 0)),
        "search_adapters": float(tried.mean()), "sweep_adapters": len(GRID), "search_gpu_share": float(cost.mean()),
        "same_pick": float(np.mean(search_pick == sweep_pick)),
    }


def table(sizes=(6, 20, 100), reps: int = 2000) -> list[dict]:
    return [simulate(name, n, reps) for name in SCENARIOS for n in sizes]


if __name__ == "__main__":
    print("| scenario | n | wrong pick: search | wrong pick: sweep | found: search | found: sweep | adapters: search (sweep 9) "
          "| GPU-hours: search / sweep | same pick |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in table():
        print(f"| {r['scenario']} | {r['n']} | {r['search_wrong']:.3f} | {r['sweep_wrong']:.3f} | {r['search_found']:.2f} | "
              f"{r['sweep_found']:.2f} | {r['search_adapters']:.1f} | {r['search_gpu_share']:.0%} | {r['same_pick']:.2f} |")
