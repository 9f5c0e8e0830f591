"""Progress bars: widgets in an interactive notebook, plain text when `llamaduo run` drives the kernel
(papermill forwards a kernel's text output to the terminal, not widget updates)."""

import os

if os.environ.get("LLAMADUO_TEXT_PROGRESS"):
    from tqdm.std import tqdm
else:
    from tqdm.auto import tqdm

__all__ = ["tqdm"]
