"""Progress bars: widgets in an interactive notebook, plain text when `llamaduo run` drives the kernel
(papermill forwards a kernel's text output to the terminal, not widget updates)."""

import contextlib
import logging
import os
import time
import warnings

if os.environ.get("LLAMADUO_TEXT_PROGRESS"):
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["tqdm"]


# The libraries whose log lines and warnings (PEFT's "Could not find a config file", transformers' deprecations,
# datasets' per-step Map bars) would otherwise fill a stage's executed notebook, once per adapter.
LIBRARY_LOGGERS = ("transformers", "datasets", "peft", "trl", "accelerate", "huggingface_hub", "torch")


class _LogFile:
    """Appends to a stage's log file; a full disk or a read-only folder costs the log, never the stage."""

    def __init__(self, path):
        self.path, self.handle = path, None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(path, "a", encoding="utf-8")
        except OSError:
            pass

    def write(self, text: str) -> None:
        if self.handle is not None:
            try:
                self.handle.write(text)
                self.handle.flush()
            except OSError:
                self.handle = None

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if self.handle is not None:
            with contextlib.suppress(OSError):
                self.handle.close()


@contextlib.contextmanager
def library_output_to(path):
    """While a stage makes its outputs: Python warnings, the libraries' log lines and datasets' progress bars go to
    `path` (the stage's log file), so the executed notebook keeps the story and the stage's own progress bar."""
    log = _LogFile(path)
    log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers, logger.propagate = [handler], False
    datasets_bars, loading_bars = _datasets_bars(False), _transformers_bars(False)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield path
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        _datasets_bars(datasets_bars)
        _transformers_bars(loading_bars)
        log.close()


def _datasets_bars(on: bool | None) -> bool | None:
    """Turn datasets' progress bars on or off; returns whether they were on (None: datasets not imported yet or
    absent, then nothing changes)."""
    try:
        from datasets.utils import logging as datasets_logging
    except ImportError:
        return None
    was = datasets_logging.is_progress_bar_enabled()
    if on is True:
        datasets_logging.enable_progress_bar()
    elif on is False:
        datasets_logging.disable_progress_bar()
    return was


def _transformers_bars(on: bool | None) -> bool | None:
    """transformers' own bars ("Loading weights", "Converting and de-quantizing GGUF tensors"), once per model
    loaded: off while a stage runs (the trainer's progress is its callback's, not these)."""
    try:
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return None
    was = transformers_logging.is_progress_bar_enabled()
    if on is True:
        transformers_logging.enable_progress_bar()
    elif on is False:
        transformers_logging.disable_progress_bar()
    return was
