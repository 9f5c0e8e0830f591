"""Provider batch APIs: the same requests at half price, answered within hours instead of seconds.

With `batch_api: true` on a service (`service.batch_api`, or a judge's), `ServiceLLM.run`
hands its requests to `run_batch_api` instead of calling the API once per request:

- OpenAI: the requests go as one JSONL file (Files API, purpose `batch`) to a batch on
  `/v1/chat/completions`; the batch is polled, then its output and error files are read
  and mapped back by `custom_id`.
- Anthropic: one Message Batch of ``[{custom_id, params}]``; polled, then its results read.
- Gemini: one batch job of inline requests (`client.aio.batches.create`), each tagged with its
  cache key in `metadata`; polled (`batches.get`) until its state is final; the answers come
  inline with the last poll.

The semantics are those of the one call path (`client.ServiceLLM`):

- the response cache first: every request is looked up and only misses go into a batch;
  every answer is stored in the cache as soon as it is read back;
- the same JSON extraction and schema validation; an invalid answer is re-asked (up to
  `max_reasks`) in the next batch, with the bad answer and a correction, as live calls do;
- an item that errs transiently (429, 5xx, expired, or absent from an expired or cancelled
  batch's results) goes into a new batch, up to `max_retries` times, and only such items: an
  item answered is cached and never sent again; one the provider refuses (400) fails with the reason; every request
  ends ok or failed with a reason, none is lost and none raises out of `run`;
- accounting: `api_calls` (one per request sent in a batch), tokens, retries, re-asks,
  failures, and `cost_usd` with `batch_discount` (0.5: providers bill batches at half the
  price) applied; plus `batch_jobs`, `batch_jobs_resumed` and `batch_control_calls` (uploads,
  creations, polls and downloads, which are free).

A batch is recorded in the cache database (table `batch_jobs`) as soon as it is created and
marked finished once its results are read, so a run killed (or timed out) while waiting does
not pay twice: the next run picks the unfinished batch up instead of submitting its requests
again. The `custom_id` of a request is its cache key.

The spend caps hold as for live calls: a batch takes only the requests that `service.max_cost_usd`
and the run's `cycle.max_cost_usd` allow at their worst case (batch price, reserved while the batch
runs); the rest are not sent and `run` stops naming the cap.

Polling: every `LLAMADUO_BATCH_POLL_S` seconds (default 30; or the `batch_poll_s` attribute
of the `ServiceLLM`); a batch still running after `LLAMADUO_BATCH_MAX_WAIT_S` (default 26 h;
or `batch_max_wait_s`) is left to a later run and its requests end failed for now. The requests/min and tokens/min limits do not apply (a batch has its own
queue); each control call is retried like a live call (`max_retries`, honouring Retry-After).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

from llamaduo_nb.core.errors import UserError
from llamaduo_nb.core.progress import tqdm
from llamaduo_nb.llm.base import ChatRequest, ChatResult, Completion, PermanentError, TransientError
from llamaduo_nb.llm.common import Accounting, describe_error, reask_request, validate_output

#: providers bill batch requests at half the price of live ones
BATCH_DISCOUNT = 0.5
POLL_ENV = "LLAMADUO_BATCH_POLL_S"
DEFAULT_POLL_S = 30.0
MAX_WAIT_ENV = "LLAMADUO_BATCH_MAX_WAIT_S"
DEFAULT_MAX_WAIT_S = 26 * 3600.0


@dataclass
class BatchAccounting(Accounting):
    """`Accounting` plus what a batch run adds (it shows in the stage's DONE.json)."""

    batch_discount: float = BATCH_DISCOUNT  # applied to cost_usd
    batch_jobs: int = 0  # batches created by this run
    batch_jobs_resumed: int = 0  # unfinished batches of an earlier (killed) run read back by this one
    batch_control_calls: int = 0  # uploads, creations, polls, downloads (not billed)


class _Final:
    """An outcome that is not retried in another batch (the reason is the request's error)."""

    def __init__(self, reason: str):
        self.reason = reason


class JobStore:
    """Batches created and not yet read back, kept next to the response cache."""

    def __init__(self, cache):
        path = getattr(cache, "path", None)
        self._lock = threading.Lock()
        self._mem: Optional[dict] = None
        self._db = None
        if path is None:
            self._mem = {}
            return
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS batch_jobs (batch_id TEXT PRIMARY KEY, backend TEXT, model TEXT,"
            " base_url TEXT, keys TEXT, created REAL, finished REAL)"
        )
        self._db.commit()

    def add(self, batch_id: str, cfg, keys) -> None:
        row = (batch_id, cfg.backend, cfg.model, cfg.base_url or "", json.dumps(sorted(keys)), time.time(), None)
        with self._lock:
            if self._mem is not None:
                self._mem[batch_id] = row
                return
            self._db.execute("INSERT OR REPLACE INTO batch_jobs VALUES (?,?,?,?,?,?,?)", row)
            self._db.commit()

    def open_jobs(self, cfg) -> list[tuple[str, set]]:
        """Unfinished batches of this backend, model and server: [(batch_id, keys)], oldest first."""
        with self._lock:
            if self._mem is not None:
                rows = [r for r in self._mem.values() if r[6] is None]
            else:
                rows = self._db.execute("SELECT * FROM batch_jobs WHERE finished IS NULL ORDER BY created").fetchall()
        return [(r[0], set(json.loads(r[4]))) for r in rows
                if (r[1], r[2], r[3]) == (cfg.backend, cfg.model, cfg.base_url or "")]

    def finish(self, batch_id: str) -> None:
        with self._lock:
            if self._mem is not None:
                if batch_id in self._mem:
                    self._mem[batch_id] = self._mem[batch_id][:6] + (time.time(),)
                return
            self._db.execute("UPDATE batch_jobs SET finished=? WHERE batch_id=?", (time.time(), batch_id))
            self._db.commit()

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


@dataclass
class _Item:
    result: ChatResult
    current: ChatRequest
    ask: int = 0
    problem: str = ""
    done: bool = False


def poll_interval() -> float:
    return float(os.environ.get(POLL_ENV) or DEFAULT_POLL_S)


def max_wait() -> float:
    return float(os.environ.get(MAX_WAIT_ENV) or DEFAULT_MAX_WAIT_S)


async def run_batch_api(llm, requests: list[ChatRequest], desc: str = "requests", progress: bool = True,
                        poll_s: Optional[float] = None, max_wait_s: Optional[float] = None) -> list[ChatResult]:
    """Answer `requests` through the provider's batch API; the results of `ServiceLLM.run`."""
    backend = llm.backend
    if not getattr(backend, "supports_batch_api", False):
        raise UserError(f"service '{llm.cfg.label}': batch_api is available for the openai, anthropic and gemini backends only "
                        f"(backend '{llm.cfg.backend}'); set batch_api: false")
    if not isinstance(llm.accounting, BatchAccounting):
        llm.accounting = BatchAccounting(**asdict(llm.accounting))
    if poll_s is None:
        poll_s = getattr(llm, "batch_poll_s", None)
    if max_wait_s is None:
        max_wait_s = getattr(llm, "batch_max_wait_s", None)
    runner = _BatchRun(llm, poll_interval() if poll_s is None else poll_s, max_wait() if max_wait_s is None else max_wait_s)
    calls_before = getattr(backend, "batch_http_calls", 0)
    try:
        return await runner.run(requests, desc, progress)
    finally:
        llm.accounting.batch_control_calls += getattr(backend, "batch_http_calls", 0) - calls_before
        runner.store.close()
        await backend.aclose()


class _BatchRun:
    def __init__(self, llm, poll_s: float, max_wait_s: float):
        self.llm = llm
        self.cfg = llm.cfg
        self.backend = llm.backend
        self.cache = llm.cache
        self.acc: BatchAccounting = llm.accounting
        self.poll_s = float(poll_s)
        self.max_wait_s = float(max_wait_s)
        self.store = JobStore(self.cache)
        self._sleep = getattr(llm, "_sleep", asyncio.sleep)
        self._adopted: set = set()
        self.bar = None

    # -- the rounds: cache, batch the misses, validate, re-ask or retry --------------------------
    async def run(self, requests: list[ChatRequest], desc: str, progress: bool) -> list[ChatResult]:
        """Rounds of one batch each (chunked at the provider's limits): a round holds every request
        not answered yet, so the re-asks and the retries of one round go together in the next."""
        cfg = self.cfg
        items = [_Item(ChatResult(ok=False, cached=True), r) for r in requests]
        self.acc.requests += len(items)
        self.bar = tqdm(total=len(items), desc=f"{desc} [{cfg.label}, batch]", disable=not progress, leave=True)
        tries: dict = {}  # cache key -> batches it has been sent in
        try:
            pending = items
            while pending:
                misses: dict[str, list[_Item]] = {}
                for it in pending:
                    key = it.current.key(cfg.backend, cfg.model, cfg.base_url)
                    hit = self.cache.get(key)
                    if hit is not None:
                        self.acc.cache_hits += 1
                        self._take(it, hit)
                    else:
                        it.result.cached = False
                        misses.setdefault(key, []).append(it)
                if misses:
                    got = await self._one_round({k: its[0].current for k, its in misses.items()}, misses)
                    waits, retried = [], 0
                    for key, its in misses.items():
                        out = got.get(key)
                        if out is None:
                            out = TransientError("missing from the batch's results")
                        tries[key] = tries.get(key, 0) + 1
                        if isinstance(out, Completion):
                            for j, it in enumerate(its):
                                if j:  # the same request twice in one run: one call serves both
                                    self.acc.cache_hits += 1
                                self._take(it, out)
                        elif isinstance(out, _Final):
                            self._fail_all(its, out.reason)
                        elif isinstance(out, PermanentError):
                            self._fail_all(its, f"refused: {describe_error(out)}")
                        elif tries[key] <= cfg.max_retries:  # stays pending: the next round sends it again
                            self.acc.retries += 1
                            its[0].result.retries += 1
                            retried = max(retried, tries[key])
                            if getattr(out, "retry_after", None) is not None:
                                waits.append(out.retry_after)
                        else:
                            self._fail_all(its, f"gave up after {tries[key]} tries: {describe_error(out)}")
                    if retried:
                        await self._sleep(self._backoff(retried, waits))
                pending = [it for it in pending if not it.done]
        finally:
            self.bar.close()
        return [it.result for it in items]

    def _take(self, it: _Item, completion: Completion) -> None:
        """An answer for the item's current request: accept it, re-ask, or give up."""
        res = it.result
        res.input_tokens += completion.input_tokens
        res.output_tokens += completion.output_tokens
        try:
            parsed = validate_output(completion.text, it.current.json_schema)
        except ValueError as exc:
            it.problem = str(exc)
            if it.ask < self.cfg.max_reasks:
                it.ask += 1
                res.reasks += 1
                self.acc.reasks += 1
                it.current = reask_request(it.current, completion.text, it.problem)
                return  # stays pending: the re-ask goes in the next round's batch
            self._fail(it, f"invalid output after {self.cfg.max_reasks + 1} tries: {it.problem}")
            return
        res.ok, res.text, res.parsed = True, completion.text, parsed
        it.done = True
        self.bar.update(1)

    def _fail(self, it: _Item, reason: str) -> None:
        self.llm._fail(it.result, reason)
        it.done = True
        self.bar.update(1)

    def _fail_all(self, its: list, reason: str) -> None:
        for it in its:
            self._fail(it, reason)

    @staticmethod
    def _backoff(attempt: int, retry_afters: list) -> float:
        if retry_afters:
            return max(retry_afters)
        return min(0.5 * 2 ** (attempt - 1), 60.0) + random.uniform(0, 0.5)

    async def _one_round(self, remaining: dict, owners: dict) -> dict:
        keys = set(remaining)
        tasks = []
        # an earlier run's unfinished batches that hold some of these requests: read them back
        for batch_id, job_keys in self.store.open_jobs(self.cfg):
            mine = job_keys & keys
            if not mine or batch_id in self._adopted:
                continue
            self._adopted.add(batch_id)
            self.acc.batch_jobs_resumed += 1
            self._count_calls(mine, owners)
            keys -= mine
            tasks.append(self._collect(batch_id, job_keys))
        got: dict = {}
        for chunk in self._chunks([(k, remaining[k]) for k in sorted(keys)]):
            chunk, reserved, refused = self._within_caps(chunk)
            got.update({k: _Final(f"not sent: {self.llm.stopped}") for k, _ in refused})
            self.acc.not_sent += sum(len(owners.get(k, ())) for k, _ in refused)
            if chunk:
                tasks.append(self._submit_and_collect(chunk, owners, reserved))
        for part in await asyncio.gather(*tasks):
            got.update(part)
        return got

    def _chunks(self, pairs: list) -> list:
        max_items = int(getattr(self.backend, "batch_max_items", 50_000))
        max_bytes = int(getattr(self.backend, "batch_max_bytes", 100 * 2**20))
        chunks, current, size = [], [], 0
        for key, req in pairs:
            n = self.backend.batch_line_size(key, req)
            if current and (len(current) >= max_items or size + n > max_bytes):
                chunks.append(current)
                current, size = [], 0
            current.append((key, req))
            size += n
        if current:
            chunks.append(current)
        return chunks

    def _count_calls(self, keys, owners: dict) -> None:
        for key in keys:
            self.acc.api_calls += 1
            if key in owners:
                owners[key][0].result.api_calls += 1

    def _within_caps(self, chunk: list) -> tuple[list, float, list]:
        """The head of `chunk` the spend caps allow at its worst case (batch price), the cost reserved for it
        while the batch runs, and the rest: not sent, and the call path stops naming the cap."""
        llm, reserved = self.llm, 0.0
        for i, (_, req) in enumerate(chunk):
            worst = self.acc.batch_discount * llm._cost(req.estimated_tokens() - req.max_tokens, req.max_tokens)
            problem = llm.over_cap(worst) if not llm.stopped else llm.stopped
            if problem:
                llm.stopped = llm.stopped or f"service '{self.cfg.label}' stopped: {problem}"
                return chunk[:i], reserved, chunk[i:]
            llm._inflight_cost += worst
            reserved += worst
        return chunk, reserved, []

    async def _submit_and_collect(self, chunk: list, owners: dict, reserved: float = 0.0) -> dict:
        keys = {k for k, _ in chunk}
        try:
            try:
                batch_id = await self._control(lambda: self.backend.batch_submit(chunk))
            except (TransientError, PermanentError) as exc:
                reason = f"batch not created: {describe_error(exc)}"
                return {k: _Final(reason) for k in keys}
            self.store.add(batch_id, self.cfg, keys)  # before waiting: a killed run's next run reads it back
            self.acc.batch_jobs += 1
            self._count_calls(keys, owners)
            return await self._collect(batch_id, keys)
        finally:
            self.llm._inflight_cost -= reserved

    async def _collect(self, batch_id: str, keys: set) -> dict:
        """Wait for a batch to end and read it back: key -> Completion | error | _Final."""
        deadline = time.monotonic() + self.max_wait_s
        kept = "kept: the next run reads it back"
        while True:
            try:
                ended, problem = await self._control(lambda: self.backend.batch_status(batch_id))
            except PermanentError as exc:
                if str(exc).startswith("404"):  # the provider does not know it (any more): send the requests again
                    self.store.finish(batch_id)
                    return {k: TransientError(f"batch {batch_id}: {describe_error(exc)}") for k in keys}
                return {k: _Final(f"batch {batch_id}: status refused ({describe_error(exc)}); {kept}") for k in keys}
            except TransientError as exc:
                return {k: _Final(f"batch {batch_id}: status unknown ({describe_error(exc)}); {kept}") for k in keys}
            shown = self.backend.batch_progress.get(batch_id)
            if shown and self.bar is not None:
                self.bar.set_postfix_str(f"{batch_id}: {shown}", refresh=True)
            if ended:
                break
            if time.monotonic() >= deadline:
                return {k: _Final(f"batch {batch_id} still running after {self.max_wait_s:g} s; {kept}") for k in keys}
            await self._sleep(self.poll_s)
        if problem:
            self.store.finish(batch_id)
            return {k: _Final(problem) for k in keys}
        try:
            lines = await self._control(lambda: self.backend.batch_results(batch_id))
        except (TransientError, PermanentError) as exc:
            return {k: _Final(f"batch {batch_id}: results not read ({describe_error(exc)}); {kept}") for k in keys}
        got: dict = {}
        for key, out in lines:
            if key not in keys or key in got:
                continue
            if isinstance(out, Completion):
                self._store(key, out)
            got[key] = out
        self.store.finish(batch_id)
        return got

    def _store(self, key: str, completion: Completion) -> None:
        cfg, acc = self.cfg, self.acc
        cost = acc.batch_discount * self.llm._cost(completion.input_tokens, completion.output_tokens)
        self.cache.put(key, cfg.backend, cfg.model, completion, cost_usd=cost)
        acc.input_tokens += completion.input_tokens
        acc.output_tokens += completion.output_tokens
        acc.cost_usd += cost
        self.llm.ledger.cost_usd += cost

    async def _control(self, call) -> Any:
        """One control call (upload, create, poll, download), retried on transient errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call()  # the SDK's own timeout (timeout_s) bounds each HTTP request
            except TransientError as err:
                exc = err
            except PermanentError:
                raise
            except Exception as err:  # noqa: BLE001 - nothing raises out of run: the items fail with it
                scrub = getattr(self.backend, "_scrub", lambda text: str(text)[:300])
                raise PermanentError(scrub(f"unexpected {type(err).__name__}: {err}")) from None
            if attempt > self.cfg.max_retries:
                raise exc
            await self._sleep(self._backoff(attempt, [exc.retry_after] if getattr(exc, "retry_after", None) is not None else []))
