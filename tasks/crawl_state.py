"""What a crawl has done so far, saved as it goes, so a crawl that is killed resumes.

``<stage>/crawl-state.sqlite`` holds the frontier (URLs found, not yet fetched, with
their depth and seed), the visited set, the counters, where each WARC file ends, and the
pages fetched since the last shard. Each URL's outcome is committed in one transaction
with the links it yielded, so after a kill (even ``kill -9``) a rerun into the same
directory starts from the saved frontier and fetches no finished URL again; only the
requests that were in flight are made again. Pages go to the parquet shards
``data/shard-NNNNN.parquet`` each time ``shard_size`` of them are committed (a shard is
written before the pages leave the state file, so a kill between the two just writes
the same shard again).

URLs are saved with ``save_url`` and loaded with ``load_url``, so a crawl of the
embedded docs, whose server gets a new port each time, resumes on the new server.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tasks.shards import write_shard

STATE_FILE = "crawl-state.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS urls (url TEXT PRIMARY KEY, depth INTEGER, seed TEXT,
                                 state TEXT NOT NULL);  -- queued, done, skipped
CREATE TABLE IF NOT EXISTS failures (n INTEGER PRIMARY KEY, failure TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pending (n INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
Frontier = list[tuple[str, int, str]]  # (url, depth, seed)


def _same(url: str) -> str:
    return url


class CrawlState:
    """The saved progress of the crawl writing into ``out_dir``."""

    def __init__(self, out_dir: str | Path, fingerprint: str, shard_size: int,
                 save_url: Callable[[str], str] = _same, load_url: Callable[[str], str] = _same):
        self.path = Path(out_dir) / STATE_FILE
        self.data_dir = Path(out_dir) / "data"
        self.shard_size, self.save_url, self.load_url = shard_size, save_url, load_url
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = self._connect()
            saved = self.get("fingerprint")
        except sqlite3.DatabaseError:  # not a state file this code can read
            saved = ""
        self.resumed = saved == fingerprint
        if saved is not None and not self.resumed:  # another crawl's state: start afresh
            self.reset()
            self.db = self._connect()
        self.set({"fingerprint": fingerprint})

    def _connect(self) -> sqlite3.Connection:
        # The crawl runs in one thread, maybe not the one that opened the file; transactions
        # are begun by hand (isolation_level=None).
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")  # WAL stays consistent across a kill
        db.executescript(_SCHEMA)
        return db

    def get(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else default

    def set(self, values: dict[str, Any]) -> None:
        self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)",
                            [(k, json.dumps(v)) for k, v in values.items()])

    def add_seeds(self, seeds: list[str]) -> None:
        self.db.executemany("INSERT OR IGNORE INTO urls VALUES (?, 0, ?, 'queued')",
                            [(self.save_url(s), self.save_url(s)) for s in seeds])

    def frontier(self) -> Frontier:
        """The URLs still to fetch, in the order they were found (breadth first)."""
        rows = self.db.execute("SELECT url, depth, seed FROM urls WHERE state = 'queued' "
                               "ORDER BY rowid")
        return [(self.load_url(url), depth, self.load_url(seed)) for url, depth, seed in rows]

    def seen(self) -> set[str]:
        return {self.load_url(url) for (url,) in self.db.execute("SELECT url FROM urls")}

    def commit(self, url: str, *, record: dict | None = None, failure: dict | None = None,
               queued: Frontier = (), skipped: list[str] = (), fetched: list[str] = (),
               meta: dict[str, Any] | None = None) -> None:
        """Save, in one transaction, that ``url`` is finished: the page it gave (``record``)
        or why not (``failure``), the links it queued, the links it did not follow
        (``skipped``), the redirect targets fetched on its way (``fetched``) and ``meta``
        (the counters). A shard is written when ``shard_size`` pages wait."""
        save = self.save_url
        with self._transaction():
            self.db.executemany("INSERT OR REPLACE INTO urls VALUES (?, ?, ?, 'done')",
                                [(save(u), None, None) for u in (url, *fetched)])
            self.db.executemany("INSERT OR IGNORE INTO urls VALUES (?, ?, ?, 'queued')",
                                [(save(u), depth, save(seed)) for u, depth, seed in queued])
            self.db.executemany("INSERT OR IGNORE INTO urls VALUES (?, NULL, NULL, 'skipped')",
                                [(save(u),) for u in skipped])
            if record is not None:
                self.db.execute("INSERT INTO pending (record) VALUES (?)", (json.dumps(record),))
            if failure is not None:
                self.db.execute("INSERT INTO failures (failure) VALUES (?)", (json.dumps(failure),))
            self.set(meta or {})
        if self.pending() >= self.shard_size:
            self.write_shard()

    def pending(self) -> int:
        return self.db.execute("SELECT count(*) FROM pending").fetchone()[0]

    def write_shard(self) -> None:
        """Move up to ``shard_size`` waiting pages into the next parquet shard."""
        rows = self.db.execute("SELECT n, record FROM pending ORDER BY n LIMIT ?",
                               (self.shard_size,)).fetchall()
        if not rows:
            return
        shards = self.get("shards", 0)
        write_shard([json.loads(record) for _, record in rows],
                    self.data_dir / f"shard-{shards:05d}.parquet")
        with self._transaction():
            self.db.execute("DELETE FROM pending WHERE n <= ?", (rows[-1][0],))
            self.set({"shards": shards + 1})

    def failures(self) -> Iterator[dict]:
        for (failure,) in self.db.execute("SELECT failure FROM failures ORDER BY n"):
            yield json.loads(failure)

    def finish(self, result: dict[str, Any]) -> None:
        """Mark the crawl finished with ``result`` (a rerun returns it) and give back the
        space its pages took while they waited for a shard."""
        self.set({"result": result})
        self.db.execute("VACUUM")

    def reset(self) -> None:
        """Forget everything (the next run starts over)."""
        if getattr(self, "db", None) is not None:
            self.db.close()
        for path in (self.path, *(self.path.with_name(self.path.name + s)
                                  for s in ("-wal", "-shm"))):
            path.unlink(missing_ok=True)

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
