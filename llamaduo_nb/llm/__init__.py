"""The service-LLM layer: one call path (client.ServiceLLM) over several backends."""

from pathlib import Path

from llamaduo_nb.core.units import current_execution, root_of
from llamaduo_nb.llm.cache import ResponseCache
from llamaduo_nb.llm.client import ServiceLLM, StageLedger

_caches: dict = {}


def cache_for(run_dir) -> ResponseCache:
    """The run's persistent response cache (one per run folder, shared by its cycles, and process)."""
    path = (root_of(Path(run_dir).resolve()) / "cache" / "llm.sqlite").resolve()
    if path not in _caches:
        _caches[path] = ResponseCache(path)
    return _caches[path]


_ledgers: dict = {}


def service_llm(cfg, params, run_dir):
    """A stage's service LLM (or judge) `cfg` on the run's response cache, under the run-wide spend cap
    (`cycle.max_cost_usd`, checked in flight against everything the run has paid so far) and the stage's
    (`max_cost_usd` of `cfg`), whose ledger every client of this service in the stage's current execution shares."""
    key = (str(Path(run_dir).resolve()), current_execution(run_dir), cfg.label)
    ledger = _ledgers.setdefault(key, StageLedger())
    return ServiceLLM(cfg, cache_for(run_dir), run_max_cost_usd=params.cycle.max_cost_usd, ledger=ledger)
