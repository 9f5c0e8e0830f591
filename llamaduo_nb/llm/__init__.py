"""The service-LLM layer: one call path (client.ServiceLLM) over several backends."""

from pathlib import Path

from .cache import ResponseCache

_caches: dict = {}


def cache_for(run_dir) -> ResponseCache:
    """The run's persistent response cache (one per run folder and process)."""
    path = (Path(run_dir) / "cache" / "llm.sqlite").resolve()
    if path not in _caches:
        _caches[path] = ResponseCache(path)
    return _caches[path]
