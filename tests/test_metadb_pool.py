"""The threads of a process share a few `.meta.db` connections (pipeline/metadb.py `_take`)."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import metadb
from pipeline.metadb import MetaDB


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[sqlite3.Connection]:
    """Every connection a MetaDB opens, in order."""
    made: list[sqlite3.Connection] = []
    connect = MetaDB._connect

    def counted(self: MetaDB) -> sqlite3.Connection:
        made.append(connect(self))
        return made[-1]

    monkeypatch.setattr(MetaDB, "_connect", counted)
    return made


def _count(db: sqlite3.Connection) -> int:
    return db.execute("SELECT count(*) FROM layers").fetchone()[0]


def test_many_threads_querying_at_once_share_the_pool(
        tmp_path: Path, opened: list[sqlite3.Connection],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metadb, "POOL_WAIT", 60.0)  # no query here holds one that long
    db = MetaDB(tmp_path / ".meta.db")
    with ThreadPoolExecutor(16) as pool:
        counts = list(pool.map(lambda _: db.query(_count, -1, create=True), range(400)))
    assert counts == [0] * 400
    assert 1 <= len(opened) <= metadb.POOL_SIZE


def test_a_held_connection_does_not_hold_up_another_query(
        tmp_path: Path, opened: list[sqlite3.Connection]) -> None:
    # Each pooled connection is held, as by a write waiting out another process's lock:
    # another thread's query still runs, on a connection of its own, after a short wait.
    db = MetaDB(tmp_path / ".meta.db")
    db.query(_count, -1, create=True)
    release = threading.Event()
    holding = threading.Barrier(metadb.POOL_SIZE + 1)

    def hold(conn: sqlite3.Connection) -> int:
        holding.wait()
        release.wait()
        return _count(conn)

    with ThreadPoolExecutor(metadb.POOL_SIZE) as pool:
        held = [pool.submit(db.query, hold, -1) for _ in range(metadb.POOL_SIZE)]
        holding.wait(timeout=30)
        try:
            assert db.query(_count, -1) == 0  # while both are still held
            assert len(opened) == metadb.POOL_SIZE + 1
        finally:
            release.set()
        assert [f.result(timeout=30) for f in held] == [0] * metadb.POOL_SIZE
    # given back, the pool holds them all: the next queries open nothing more
    for _ in range(10):
        db.query(_count, -1)
    assert len(opened) == metadb.POOL_SIZE + 1
