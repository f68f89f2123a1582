"""Persistent judge-response cache, so a resumed or repeated run never pays for a label twice.

sqlite (stdlib) in WAL mode: every write is a transaction, so a process killed mid-write leaves
either the old or the new row, never a torn file. Keys are sha256 digests of everything that can
change the judge's answer (template text, judge backend+model, prompt, response(s), decoding
settings); values are the judge's raw reply (text, candidate probabilities, tokens). No API key,
URL or header is ever part of a key or a value.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any


def cache_key(**parts: Any) -> str:
    """Stable digest of the JSON of ``parts`` (sorted keys, no whitespace)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=list)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    """``get(key) -> dict | None`` and ``put(key, value_dict)``; ``put_many`` commits in one
    transaction. Use from one thread (the judge writes from its calling thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(self.path), timeout=30.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL+NORMAL: durable against process crashes
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.path)!r})"

    def get(self, key: str) -> dict | None:
        row = self._db.execute("SELECT value FROM replies WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        self.put_many([(key, value)])

    def put_many(self, items: list[tuple[str, dict]]) -> None:
        with self._db:  # one transaction: all rows or none
            self._db.executemany(
                "INSERT OR REPLACE INTO replies (key, value) VALUES (?, ?)",
                [(k, json.dumps(v, ensure_ascii=False)) for k, v in items],
            )

    def __len__(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
