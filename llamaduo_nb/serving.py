"""A real llama.cpp server (`llama-cpp-python[server]`, `pip install 'llama-cpp-python[server]==0.3.36'`):
`python -m llama_cpp.server` on 127.0.0.1, a free port, its log in a file. The deploy stage serves an
exported GGUF with it for the parity check; the `real_server` test tier uses it as the service LLM.

llama.cpp repacks weights into CPU-specific layouts ("extra buffer types"); on machines that report AMX
(Sapphire Rapids and later, as many cloud VMs do) llama-cpp-python 0.3.36 then crashes with SIGSEGV on
its first multi-token batch. llama.cpp's own server turns that off with `--no-repack`; the Python server
has no such flag, so the launcher sets the same model parameter (`use_extra_bufts = False`) and then
runs the stock `llama_cpp.server` module unchanged.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.models import resolve

LAUNCHER = """
import runpy, sys
import llama_cpp.llama_cpp as low
_default = low.llama_model_default_params
def _no_repack():
    params = _default()
    params.use_extra_bufts = False  # = llama-server --no-repack
    return params
low.llama_model_default_params = _no_repack
sys.argv = ["llama_cpp.server"] + sys.argv[1:]
runpy.run_module("llama_cpp.server", run_name="__main__")
"""


def available() -> bool:
    try:  # the server's own modules and its extras (fastapi, sse-starlette, starlette-context, uvicorn)
        import llama_cpp.server.app  # noqa: F401
        import uvicorn  # noqa: F401
    except Exception:  # noqa: BLE001 - ImportError, or a build that does not load
        return False
    return True


SERVER_PIP = "pip install 'llama-cpp-python[server]==0.3.36'"


def launch_command(models: list[tuple[Path, str | None]], host: str, port: int, n_ctx: int, threads: int | None,
                   config: Path | None = None) -> list[str]:
    """The stock `llama_cpp.server`, through the launcher that turns the weight repack off, for one GGUF (flags) or
    several (a config file written to `config`)."""
    if len(models) == 1:
        (model, alias), = models
        cmd = [sys.executable, "-c", LAUNCHER, "--model", str(model), "--host", host, "--port", str(port), "--n_ctx", str(n_ctx)]
        cmd += ["--model_alias", alias] if alias else []
        cmd += ["--n_threads", str(threads), "--n_threads_batch", str(threads)] if threads else []
        return cmd
    threads_part = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    config.write_text(json.dumps({"host": host, "port": port, "models": [
        {"model": str(path), "model_alias": alias or str(path), "n_ctx": n_ctx, **threads_part} for path, alias in models]}))
    return [sys.executable, "-c", LAUNCHER, "--config_file", str(config)]


def serve(ggufs: list[str], aliases: list[str], host: str = "127.0.0.1", port: int = 8080, n_ctx: int = 4096,
          threads: int | None = None) -> int:
    """`llamaduo serve`: llama.cpp's Python server in the foreground, the repack off (see the module's docstring)."""
    import tempfile


    if not available():
        raise UserError(f"llamaduo serve needs llama.cpp's Python server: {SERVER_PIP}")
    if aliases and len(aliases) != len(ggufs):
        raise UserError(f"--alias: {len(aliases)} given for {len(ggufs)} GGUF file(s); give one per file, in order")
    missing = [g for g in ggufs if not Path(g).is_file()]
    if missing:
        raise UserError(f"{missing[0]}: no such GGUF file")
    models = [(Path(g).resolve(), aliases[i] if aliases else None) for i, g in enumerate(ggufs)]
    config = Path(tempfile.mkdtemp(prefix="llamaduo-serve-")) / "models.json"
    cmd = launch_command(models, host, port, n_ctx, threads, config)
    print(f"serving {', '.join(a or str(p) for p, a in models)} at http://{host}:{port}/v1 (llama.cpp, weight repack off)", flush=True)
    os.execv(cmd[0], cmd)  # the server replaces this process: Ctrl-C and signals reach it directly
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def packaged_gguf() -> Path:
    source = resolve("smollm2-135m-instruct")
    return Path(source.location) / source.gguf_file


class LlamaServer:
    """`with LlamaServer(log, model=path, alias=name) as server: ... server.url ... server.chat_requests()`

    `model`: a GGUF file (default: the packaged SmolLM2); `alias`: the model name it answers to and
    lists in GET /v1/models (default: the file's path, as llama_cpp.server does)."""

    # one thread: ggml's threads spin at a barrier after every operation, and on a machine whose cores are
    # busy (the test process, a notebook kernel) two threads ran 20-50x slower than one (0.5 vs 11-30 tokens/s)
    def __init__(self, log: Path, n_ctx: int = 4096, threads: int = 1, model: Path | str | None = None, alias: str | None = None,
                 models: list | None = None):
        self.log = Path(log)
        self.model = Path(model) if model else packaged_gguf()
        self.alias = alias
        # several GGUFs behind one server, each under its alias: [(path, alias), ...] (loaded on first request)
        self.models = models
        self.port = free_port()
        self.n_ctx = n_ctx
        self.threads = threads
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "LlamaServer":
        # llama_cpp.server reads several models only from a config file (which then holds every setting)
        models = [(Path(p), a) for p, a in self.models] if self.models else [(self.model, self.alias)]
        cmd = launch_command(models, "127.0.0.1", self.port, self.n_ctx, self.threads, self.log.with_suffix(".models.json"))
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=dict(os.environ))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"llama.cpp server did not answer within 120 s: {self.log.read_text()[-2000:]}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "_log", None):
            self._log.close()

    def chat_requests(self) -> dict:
        """HTTP status -> number of chat-completion requests the server logged (uvicorn's access log)."""
        counts: dict = {}
        for line in self.log.read_text(errors="replace").splitlines():
            if '"POST /v1/chat/completions HTTP/1.1"' in line:
                status = int(line.rsplit('HTTP/1.1"', 1)[1].split()[0])
                counts[status] = counts.get(status, 0) + 1
        return counts
