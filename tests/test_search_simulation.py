"""The volume search's error guarantee and its saving, measured on score curves with a known truth
(tests/search_simulation.py; the table is in docs/MEASUREMENTS.md)."""

import math

import pytest

from .search_simulation import GRID, SCENARIOS, simulate
from llamaduo_nb.methods.verdict import ALPHA


@pytest.fixture(scope="module")
def results():
    return {(name, n): simulate(name, n, reps=2000) for name in SCENARIOS for n in (6, 20, 100)}


def _limit(reps: int) -> float:
    return ALPHA + 3 * math.sqrt(ALPHA * (1 - ALPHA) / reps)  # α plus three Monte Carlo standard errors


def test_the_search_picks_a_volume_worse_than_the_margin_at_most_alpha_of_the_time(results):
    for (name, n), r in results.items():
        assert r["search_wrong"] <= _limit(r["reps"]), (name, n, r)
        assert r["sweep_wrong"] <= _limit(r["reps"]), (name, n, r)


def test_at_the_boundary_every_pick_is_wrong_and_stays_within_alpha(results):
    for n in (6, 20, 100):
        r = results[("flat at the margin", n)]
        assert r["search_found"] == pytest.approx(r["search_wrong"])  # flat at the margin: any volume found is a wrong pick
        assert r["search_wrong"] > 0.005  # the bound is nearly used: the test is not trivially conservative


def test_the_search_trains_fewer_adapters_than_the_sweep_when_a_volume_suffices(results):
    for name in ("monotone", "early plateau", "non-monotone"):
        r = results[(name, 100)]
        assert r["search_found"] > 0.95
        assert r["search_adapters"] < len(GRID)
        assert r["search_gpu_share"] < 0.5, (name, r)
    early = results[("early plateau", 100)]
    assert early["search_adapters"] <= 3 and early["search_gpu_share"] < 0.05


def test_the_search_pays_with_power_on_few_prompts(results):
    # α / 10 per look: at 6 prompts the search finds a sufficient volume less often than the sweep's fixed sequence
    r = results[("monotone", 6)]
    assert r["search_found"] < r["sweep_found"]


def test_when_no_volume_suffices_the_search_trains_the_whole_grid_and_finds_nothing(results):
    for n in (6, 20, 100):
        r = results[("never", n)]
        assert r["search_found"] == 0 and r["search_adapters"] == len(GRID)
