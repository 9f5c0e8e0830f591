"""Requests/min achieved against a rate-limited API: ServiceLLM vs a fixed-sleep batch scheduler.

    .venv/bin/python benchmarks/service_throughput.py                      # 600 req/min, 90 s of work
    .venv/bin/python benchmarks/service_throughput.py --rpm 600 --seconds 30
    .venv/bin/python benchmarks/service_throughput.py --enforce minute     # provider lets a minute's budget burst

Both schedulers send the same N = rpm * seconds / 60 chat requests to the local
OpenAI emulator (tests/emulators), one after the other, each against a fresh
emulator (in its own process) that answers after a uniform random 1-2 s (`--latency`) and enforces the
limit the way providers do (`--enforce`):

  second  a token bucket holding one second's worth of requests (rpm/60), refilled
          continuously: the per-second quantisation providers apply to per-minute
          limits; requests over it get 429 + Retry-After          (default)
  minute  the bucket holds a whole minute's worth (bursts up to rpm pass)
  none    no enforcement (the emulator answers everything)

ours       ServiceLLM (backend openai, requests_per_minute=rpm): a pacer on a fixed
           schedule of 60/rpm s slots (a request up to a quarter slot late keeps its
           slot, so late wake-ups of the event loop lose no allowance), bounded
           concurrency, retries that honour Retry-After. Clock: start to last answer.
reference  the original LlamaDuo pattern: launch a batch of rpm * window/60 requests
           with asyncio.gather, sleep out the rest of the window, repeat (the OpenAI
           SDK with its default retries). Clock: start to the end of its last window
           (a longer job would wait that window out before its next batch); the
           time to its last answer is printed too.

achieved = successful requests per minute of that clock / rpm. Goal for ours:
>= 0.95 with 0 failed items.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402

from llamaduo_nb.llm.base import ChatRequest  # noqa: E402
from llamaduo_nb.llm.cache import ResponseCache  # noqa: E402
from llamaduo_nb.llm.client import ServiceLLM  # noqa: E402
from llamaduo_nb.core.params import ServiceParams  # noqa: E402

MODEL = "gpt-emulated"


def prompts_for(n: int, tag: str) -> list[str]:
    return [f"[{tag}] Write one sentence about topic number {i}." for i in range(n)]


class RemoteEmulator:
    """The OpenAI emulator in its own process, so that its threads do not share a GIL with
    the scheduler under test (which would distort both the latency and the arrival times)."""

    def __init__(self, args):
        burst = {"second": 1.0, "minute": 60.0}.get(args.enforce)
        options = dict(latency=list(args.latency), enforce_rpm=args.rpm if burst else None,
                       burst_s=burst or 1.0, seed=args.seed)
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-emulator", json.dumps(options)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url.startswith("http"):
            raise RuntimeError("the emulator process did not start")

    def finish(self) -> dict:
        """Stop the emulator; its request statistics."""
        out, _ = self.proc.communicate("", timeout=60)
        return json.loads(out.strip().splitlines()[-1])


def serve_emulator(options: dict) -> None:
    from tests.emulators import OpenAIEmulator

    options["latency"] = tuple(options["latency"])
    emu = OpenAIEmulator(**options).start()
    print(emu.url, flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    st = emu.stats
    print(json.dumps(dict(calls=st.total, refused=st.count("limited"), max_1s=st.max_in_window(1.0),
                          arrival_rpm=st.rate_per_minute())), flush=True)
    emu.stop()


class _AioLimiterPacer:
    """The limiter ServiceLLM had before its pacer (aiolimiter, a leaky bucket of one request refilled every
    60/rpm s), for a side-by-side run (`--pacer aiolimiter`)."""

    def __init__(self, rpm: float):
        self.rpm, self.limiter = rpm, None

    async def wait(self) -> None:
        from aiolimiter import AsyncLimiter

        if self.limiter is None:
            self.limiter = AsyncLimiter(1, 60.0 / self.rpm)
        await self.limiter.acquire()

    def adapt(self, *args) -> None:
        return None

    def pause(self, seconds: float) -> None:
        return None


def run_ours(args, n: int) -> dict:
    emu = RemoteEmulator(args)
    try:
        cfg = ServiceParams(
            backend="openai", model=MODEL, base_url=emu.url, api_key_env=None,
            requests_per_minute=args.rpm, max_concurrency=args.concurrency,
            timeout_s=args.timeout, max_retries=6,
        )
        with tempfile.TemporaryDirectory() as tmp:
            llm = ServiceLLM(cfg, ResponseCache(Path(tmp) / "cache.sqlite"))
            if args.pacer == "aiolimiter":
                llm._pacer = _AioLimiterPacer(args.rpm)
            requests = [ChatRequest(messages=({"role": "user", "content": p},), max_tokens=64)
                        for p in prompts_for(n, "ours")]
            t0 = time.monotonic()
            results = llm.run(requests, progress=False)
            wall = time.monotonic() - t0
    finally:
        stats = emu.finish()
    ok = sum(r.ok for r in results)
    return dict(ok=ok, failed=n - ok, wall=wall, last_answer=wall, retries=llm.accounting.retries, **stats)


async def _reference(url: str, prompts: list[str], rpm: float, window: float, timeout: float) -> dict:
    client = openai.AsyncOpenAI(base_url=url, api_key="not-needed", timeout=timeout)  # SDK default retries
    batch = max(1, int(rpm * window / 60.0))

    async def one(prompt: str):
        resp = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=64)
        return resp.choices[0].message.content

    ok = failed = 0
    clock = 0.0  # sum over batches of max(window, batch time)
    t0 = time.monotonic()
    try:
        for i in range(0, len(prompts), batch):
            start = time.monotonic()
            outs = await asyncio.gather(*(one(p) for p in prompts[i:i + batch]), return_exceptions=True)
            ok += sum(not isinstance(o, BaseException) for o in outs)
            failed += sum(isinstance(o, BaseException) for o in outs)
            elapsed = time.monotonic() - start
            clock += max(window, elapsed)
            if i + batch < len(prompts) and elapsed < window:
                await asyncio.sleep(window - elapsed)
        last_answer = time.monotonic() - t0
    finally:
        await client.close()
    return dict(ok=ok, failed=failed, wall=clock, last_answer=last_answer, batch=batch)


def run_reference(args, n: int, window: float) -> dict:
    emu = RemoteEmulator(args)
    try:
        out = asyncio.run(_reference(emu.url, prompts_for(n, "reference"), args.rpm, window, args.timeout))
    finally:
        stats = emu.finish()
    out.update(stats)
    return out


def achieved(res: dict, rpm: float, key: str = "wall") -> float:
    return res["ok"] / res[key] * 60.0 / rpm if res[key] > 0 else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rpm", type=float, default=600.0, help="the requests/min limit (default 600)")
    ap.add_argument("--seconds", type=float, default=90.0, help="work for this long at the limit (default 90)")
    ap.add_argument("--window", type=float, default=None,
                    help="reference batch window in s (default 60, or seconds/2 when seconds < 120)")
    ap.add_argument("--latency", type=lambda s: tuple(float(x) for x in s.split(",")), default=(1.0, 2.0),
                    help="answer latency range in s, 'low,high' (default 1,2)")
    ap.add_argument("--enforce", choices=["second", "minute", "none"], default="second")
    ap.add_argument("--concurrency", type=int, default=64, help="ServiceLLM max_concurrency (default 64)")
    ap.add_argument("--timeout", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["ours", "reference"], default=None)
    ap.add_argument("--pacer", choices=["schedule", "aiolimiter"], default="schedule",
                    help="ours with its pacer (default) or with the aiolimiter bucket it had before")
    ap.add_argument("--serve-emulator", default=None, help=argparse.SUPPRESS)  # internal: the emulator process
    args = ap.parse_args(argv)
    if args.serve_emulator:
        serve_emulator(json.loads(args.serve_emulator))
        return 0

    n = max(2, int(round(args.rpm * args.seconds / 60.0)))
    window = args.window or (60.0 if args.seconds >= 120 else args.seconds / 2.0)
    print(f"pacer of ours: {args.pacer}; "
          f"limit {args.rpm:g} req/min, {n} requests ({args.seconds:g} s at the limit), latency "
          f"{args.latency[0]:g}-{args.latency[-1]:g} s, enforcement: {args.enforce}, reference window {window:g} s")

    rows = {}
    if args.only in (None, "ours"):
        rows["ours"] = run_ours(args, n)
    if args.only in (None, "reference"):
        rows["reference"] = run_reference(args, n, window)

    print(f"{'scheduler':<10} {'ok':>5} {'failed':>6} {'clock s':>8} {'achieved':>8} {'to last answer':>14} "
          f"{'calls':>6} {'429 by API':>10} {'max/1s':>6} {'API saw/limit':>13}")
    for name, r in rows.items():
        print(f"{name:<10} {r['ok']:>5} {r['failed']:>6} {r['wall']:>8.1f} {achieved(r, args.rpm):>8.3f} "
              f"{achieved(r, args.rpm, 'last_answer'):>14.3f} {r['calls']:>6} {r['refused']:>10} {r['max_1s']:>6} "
              f"{r['arrival_rpm'] / args.rpm:>13.3f}")
    if len(rows) == 2:
        ours, ref = achieved(rows["ours"], args.rpm), achieved(rows["reference"], args.rpm)
        print(f"ours/reference = {ours / ref:.2f}" if ref > 0 else "ours/reference = inf (reference: 0 ok)")
    if "ours" in rows:
        good = achieved(rows["ours"], args.rpm) >= 0.95 and rows["ours"]["failed"] == 0
        print(f"goal (ours >= 0.95 of the limit, 0 failed): {'met' if good else 'NOT met'}")
        return 0 if good else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
