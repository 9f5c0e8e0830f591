"""Progress bars: widgets in an interactive notebook, plain text when `llamaduo run` drives the kernel
(papermill forwards a kernel's text output to the terminal, not widget updates)."""

import contextlib
import importlib
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
    bars = {library: _library_bars(library, False) for library in ("datasets", "transformers")}
    try:
        with warnings.catch_warnings():
            warnings.showwarning = lambda message, category, filename, lineno, file=None, line=None: log.write(
                warnings.formatwarning(message, category, filename, lineno, line))
            yield path
    finally:
        for logger, handlers, propagate in saved:
            logger.handlers, logger.propagate = handlers, propagate
        for library, was in bars.items():
            _library_bars(library, was)
        log.close()


def _library_bars(library: str, on: bool | None) -> bool | None:
    """Turn a library's own progress bars on or off (datasets' per-step Map bars; transformers' "Loading weights",
    once per model loaded: the trainer's progress is its callback's, not these). Both libraries' logging modules
    share the same three calls. Returns whether they were on (None: the library is absent, nothing changes)."""
    try:
        logging_module = importlib.import_module(f"{library}.utils.logging")
    except ImportError:
        return None
    was = logging_module.is_progress_bar_enabled()
    if on is True:
        logging_module.enable_progress_bar()
    elif on is False:
        logging_module.disable_progress_bar()
    return was
