"""A persistent response cache: a re-run or a resumed run never pays twice.

SQLite in the run folder, one row per API call, written as soon as the answer
arrives (WAL mode, one transaction per row), so a run killed mid-way keeps every
answer it had already paid for.

Beside each paid answer, in the same transaction, the `spend` table records what it cost (as the
call path priced it): `spent_usd` is the run's spend so far over all its stages, cycles and
re-runs, which the run-wide cap (`cycle.max_cost_usd`) is checked against while calls are in flight.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path
from typing import Optional

from llamaduo_nb.llm.base import Completion


_SPENT = "SELECT COALESCE(SUM(cost_usd), 0) FROM spend"


def recorded_spend(path: str | Path) -> float:
    """The spend ledger's total of the cache at `path` (0 when there is none), read afresh from disk."""
    path = Path(path)
    if not path.exists():
        return 0.0
    # read-only: closing a read-write connection would checkpoint the WAL into the file and delete it, changing
    # a finished run's cache bytes just by asking what it spent
    db = sqlite3.connect(path.resolve().as_uri() + "?mode=ro", uri=True, timeout=30)
    try:
        has_ledger = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='spend'").fetchone()
        return float(db.execute(_SPENT).fetchone()[0]) if has_ledger else 0.0
    finally:
        db.close()


class ResponseCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS responses (key TEXT PRIMARY KEY, backend TEXT, model TEXT,"
            " text TEXT, input_tokens INTEGER, output_tokens INTEGER, finish_reason TEXT, created REAL)"
        )
        # what the run learned about a server (its JSON mode): asked once per run, not once per process
        self._db.execute("CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS spend (cost_usd REAL, created REAL)")
        self._db.commit()
        self.spent_usd = float(self._db.execute(_SPENT).fetchone()[0])

    def setting(self, key: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_setting(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO settings VALUES (?,?)", (key, value))
            self._db.commit()

    def get(self, key: str) -> Optional[Completion]:
        with self._lock:
            row = self._db.execute(
                "SELECT text, input_tokens, output_tokens, finish_reason FROM responses WHERE key=?", (key,)
            ).fetchone()
        if row is None:
            return None
        return Completion(text=row[0], input_tokens=row[1], output_tokens=row[2], finish_reason=row[3] or "")

    def put(self, key: str, backend: str, model: str, completion: Completion, cost_usd: float = 0.0) -> None:
        """Store a paid answer and what it cost, together."""
        with self._lock:
            now = time.time()
            self._db.execute(
                "INSERT OR REPLACE INTO responses VALUES (?,?,?,?,?,?,?,?)",
                (key, backend, model, completion.text, completion.input_tokens, completion.output_tokens,
                 completion.finish_reason, now),
            )
            if cost_usd:
                self._db.execute("INSERT INTO spend VALUES (?,?)", (float(cost_usd), now))
            self._db.commit()
            self.spent_usd += float(cost_usd)

    def __len__(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def close(self) -> None:
        with self._lock:
            self._db.close()
