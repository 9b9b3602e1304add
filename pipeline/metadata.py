"""What the disk tier knows about its entries, in SQLite (WAL) beside them: `.meta.db`.

    layers   digest, diff_id, media type, sizes, created, last used, and origin: how the
             entry's bytes are tied to its digest ("blob": decompressed from the verified
             blob; "remote": copied from the remote tier; "shared:<digest>": content of
             another entry; "adopted" by gc; "unknown" from before origins were kept).
             Only "blob" and "remote" entries are published (pipeline/layer.py: paired)
    images   which image (manifest digest, ref, platform) uses which layer
    counters running totals since the cache was made (hits, bytes, evictions, ...)
    configs  image config blobs by digest: content-addressed, so a warm of images already
             seen asks the registry only for their manifests (tags can move; configs cannot)
    pins     layers protected from gc until a time, and the image ref that pinned them

The files stay the source of truth: a row says what an entry should be (so `verify` can
re-hash it and a warm can notice a truncated one), never that it exists. Each query or
transaction has a connection to itself, taken from the idle ones (or opened, when all are
busy) and given back after; WAL and a busy timeout let many processes share the file.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.digest import Digest

log = logging.getLogger("layerwarm")
_INIT = threading.Lock()  # one thread of a process sets a database up at a time
_SCHEMA = """
CREATE TABLE IF NOT EXISTS layers (
    digest TEXT PRIMARY KEY,
    diff_id TEXT NOT NULL,
    media_type TEXT NOT NULL,
    compressed_size INTEGER NOT NULL,
    uncompressed_size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    publish_pending INTEGER NOT NULL DEFAULT 0,
    origin TEXT NOT NULL DEFAULT 'unknown'
);
CREATE TABLE IF NOT EXISTS images (
    manifest_digest TEXT NOT NULL,
    ref TEXT NOT NULL,
    platform TEXT,
    layer_digest TEXT NOT NULL,
    position INTEGER NOT NULL,
    PRIMARY KEY (manifest_digest, ref, layer_digest)
);
CREATE TABLE IF NOT EXISTS configs (
    digest TEXT PRIMARY KEY,
    data BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pins (
    layer_digest TEXT NOT NULL,
    ref TEXT NOT NULL,
    until REAL NOT NULL,
    PRIMARY KEY (layer_digest, ref)
);
CREATE INDEX IF NOT EXISTS layers_diff_id ON layers (diff_id);
"""


@dataclass(frozen=True)
class LayerRecord:
    digest: Digest
    diff_id: Digest
    media_type: str
    compressed_size: int
    uncompressed_size: int
    created: float
    last_used: float
    publish_pending: bool
    origin: str


@dataclass(frozen=True)
class ImageRow:
    manifest_digest: str
    ref: str
    platform: str | None
    layer_digest: str


class Metadata:
    def __init__(self, path: Path) -> None:
        self.path = path
        # Idle connections, for any thread to take (_db). One per thread opened and set up
        # (pragmas, WAL, schema) 17 of them in a warm of 12 cached images, slowing each
        # thread's first query; the pool holds as many as ever ran at once: 2 there.
        self._idle: list[sqlite3.Connection] = []
        self._idle_lock = threading.Lock()

    @contextmanager
    def _db(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        with self._idle_lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            if not create and not self.path.exists():
                yield None  # nothing recorded yet; reading must not create the file
                return
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a first warm's first write
            conn = self._connect()
        try:
            yield conn
        finally:
            if conn.in_transaction:  # a transaction its ROLLBACK could not end: not reusable
                conn.close()
            else:
                with self._idle_lock:
                    self._idle.append(conn)

    def _connect(self) -> sqlite3.Connection:
        # Not tied to a thread: one thread at a time uses it, handed over by _db.
        conn = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                               check_same_thread=False)
        conn.execute("PRAGMA busy_timeout=30000")
        # No fsync per commit: a power cut may lose the last rows, never corrupt the file,
        # and the files stay the source of truth (gc adopts an entry without a row). With
        # FULL, each layer's bookkeeping cost a few fsyncs, more than a tiny layer's work.
        conn.execute("PRAGMA synchronous=NORMAL")
        # Switching to WAL needs a moment alone with the file, and SQLite answers "locked"
        # at once (no busy wait) when another process is doing the same: try again.
        deadline = time.monotonic() + 30
        while True:
            try:
                with _INIT:
                    if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                        conn.execute("PRAGMA journal_mode=WAL")
                    conn.executescript(_SCHEMA)
                    _add_origin_column(conn)
                return conn
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.05)

    def record_layer(
        self, digest: Digest, diff_id: Digest, media_type: str, compressed_size: int,
        uncompressed_size: int, origin: str,
    ) -> None:
        """What a committed entry is (pipeline/tiers/disk.py `Ingest.commit` calls this)."""
        now = time.time()
        with self._db(create=True) as db:
            assert db is not None
            db.execute(
                "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT(digest) "
                "DO UPDATE SET diff_id=excluded.diff_id, media_type=excluded.media_type, "
                "compressed_size=excluded.compressed_size, "
                "uncompressed_size=excluded.uncompressed_size, last_used=excluded.last_used, "
                "origin=excluded.origin, publish_pending=0",
                (str(digest), str(diff_id), media_type, compressed_size, uncompressed_size,
                 now, now, origin),
            )

    def set_publish_pending(self, digest: Digest, pending: bool) -> None:
        """A layer on disk that the remote tier still lacks (it was down): publish later."""
        self._update("UPDATE layers SET publish_pending=? WHERE digest=?",
                     (int(pending), str(digest)))

    def touch(self, *digests: Digest) -> None:
        """Mark layers used now (for gc's LRU), all in one statement."""
        if digests:
            now = time.time()
            self._update_many("UPDATE layers SET last_used=? WHERE digest=?",
                              [(now, str(d)) for d in digests])

    def _update_many(self, sql: str, rows: list[tuple]) -> None:
        try:
            with self._db(create=False) as db:
                if db is not None:
                    with _transaction(db):  # one transaction, not one per row
                        db.executemany(sql, rows)
        except sqlite3.Error as e:
            log.warning("metadata update in %s failed: %s", self.path, e)

    def _update(self, sql: str, args: tuple) -> None:
        # Bookkeeping on an existing row: losing one update is better than failing a warm.
        try:
            with self._db(create=False) as db:
                if db is not None:
                    db.execute(sql, args)
        except sqlite3.Error as e:
            log.warning("metadata update in %s failed: %s", self.path, e)

    def record_images(
        self, images: Sequence[tuple[Digest, str, str | None, Sequence[Digest]]]
    ) -> None:
        """Which layers each image (manifest digest, ref, platform) uses; one transaction."""
        with self._db(create=True) as db:
            assert db is not None
            with _transaction(db):
                for manifest_digest, ref, platform, layers in images:
                    # A tag that moved: the ref's old manifest no longer says what it uses.
                    db.execute(
                        "DELETE FROM images WHERE ref=? AND platform IS ? AND manifest_digest<>?",
                        (ref, platform, str(manifest_digest)),
                    )
                    db.executemany(
                        "INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?)",
                        [(str(manifest_digest), ref, platform, str(d), i)
                         for i, d in enumerate(layers)],
                    )

    def layer(self, digest: Digest) -> LayerRecord | None:
        with self._db(create=False) as db:
            if db is None:
                return None
            row = db.execute("SELECT * FROM layers WHERE digest=?", (str(digest),)).fetchone()
        return _record(row) if row else None

    def layers(self) -> list[LayerRecord]:
        with self._db(create=False) as db:
            rows = [] if db is None else db.execute("SELECT * FROM layers").fetchall()
        return [_record(r) for r in rows]

    def with_diff_id(self, diff_id: Digest) -> list[LayerRecord]:
        """Rows of every entry holding this content (sharing by diff_id), oldest first."""
        with self._db(create=False) as db:
            rows = [] if db is None else db.execute(
                "SELECT * FROM layers WHERE diff_id=? ORDER BY created", (str(diff_id),)
            ).fetchall()
        return [_record(r) for r in rows]

    # Queries for the cache commands (pipeline/cacheops.py); reads never create the file.

    def image_rows(self, layer: Digest | None = None) -> list[ImageRow]:
        """Which image (manifest digest, ref, platform) uses which layer; one layer's or all."""
        sql = "SELECT manifest_digest, ref, platform, layer_digest FROM images"
        args: tuple = ()
        if layer is not None:
            sql, args = sql + " WHERE layer_digest=?", (str(layer),)
        with self._db(create=False) as db:
            rows = [] if db is None else db.execute(sql + " ORDER BY ref, manifest_digest",
                                                    args).fetchall()
        return [ImageRow(*r) for r in rows]

    def config(self, digest: Digest) -> bytes | None:
        """An image config stored earlier (the caller verifies it), or None."""
        try:
            with self._db(create=False) as db:
                row = None if db is None else db.execute(
                    "SELECT data FROM configs WHERE digest=?", (str(digest),)).fetchone()
        except sqlite3.Error as e:  # a cache of documents: a miss, not a failure
            log.warning("metadata config read in %s failed: %s", self.path, e)
            return None
        return bytes(row[0]) if row else None

    def record_config(self, digest: Digest, data: bytes) -> None:
        try:
            with self._db(create=True) as db:
                assert db is not None
                db.execute("INSERT OR REPLACE INTO configs VALUES (?, ?)", (str(digest), data))
        except sqlite3.Error as e:
            log.warning("metadata config write in %s failed: %s", self.path, e)

    def bump(self, name: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the running total ``name`` (created at 0)."""
        self.bump_many({name: amount})

    def bump_many(self, amounts: Mapping[str, float]) -> None:
        """Add to several running totals in one transaction: all of them or none."""
        try:
            with self._db(create=True) as db:
                assert db is not None
                with _transaction(db):
                    db.executemany(
                        "INSERT INTO counters VALUES (?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                        list(amounts.items()),
                    )
        except sqlite3.Error as e:  # a lost count must not fail the work it counts
            log.warning("metadata counters %s in %s failed: %s", ", ".join(amounts), self.path, e)

    def counters(self) -> dict[str, float]:
        with self._db(create=False) as db:
            rows = [] if db is None else db.execute("SELECT name, value FROM counters").fetchall()
        return dict(rows)

    def adopt_layer(self, digest: Digest, diff_id: Digest, size: int, last_used: float) -> None:
        """Record an entry found without a row (copied in by hand, or its row was lost).

        Only what rehashing the file tells is known: media type and compressed size stay
        unknown ("" and 0), and its last use is the file's mtime, so an adopted entry keeps
        its place in the LRU order. An existing row (a warm won the race) is kept.
        """
        with self._db(create=True) as db:
            assert db is not None
            db.execute(
                "INSERT OR IGNORE INTO layers VALUES (?, ?, '', 0, ?, ?, ?, 0, 'adopted')",
                (str(digest), str(diff_id), size, last_used, last_used),
            )

    def pin(self, layers: Sequence[Digest], ref: str, until: float) -> None:
        """Protect `layers` from gc until `until` (epoch seconds); a new pin of a ref wins."""
        with self._db(create=True) as db:
            assert db is not None
            db.executemany(
                "INSERT INTO pins VALUES (?, ?, ?) ON CONFLICT(layer_digest, ref) "
                "DO UPDATE SET until=excluded.until",
                [(str(d), ref, until) for d in layers],
            )

    def unpin(self, ref: str) -> int:
        """Drop every pin `ref` made; returns how many layers it had pinned."""
        with self._db(create=False) as db:
            if db is None:
                return 0
            return db.execute("DELETE FROM pins WHERE ref=?", (ref,)).rowcount

    def pins(self, now: float | None = None) -> list[tuple[str, str, float]]:
        """(layer digest, ref, until) of every pin still in force at `now`."""
        now = time.time() if now is None else now
        with self._db(create=False) as db:
            if db is None:
                return []
            return db.execute(
                "SELECT layer_digest, ref, until FROM pins WHERE until > ? "
                "ORDER BY ref, layer_digest", (now,),
            ).fetchall()

    def pinned_until(self, now: float | None = None) -> dict[str, float]:
        """Each pinned layer's digest and the end of its longest pin still in force."""
        out: dict[str, float] = {}
        for digest, _, until in self.pins(now):
            out[digest] = max(until, out.get(digest, 0.0))
        return out

    def drop_expired_pins(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        with self._db(create=False) as db:
            if db is None:
                return 0
            return db.execute("DELETE FROM pins WHERE until <= ?", (now,)).rowcount

    def forget(self, digest: Digest) -> None:
        with self._db(create=False) as db:
            if db is not None:
                db.execute("DELETE FROM layers WHERE digest=?", (str(digest),))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit): all of it or none."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _add_origin_column(conn: sqlite3.Connection) -> None:
    """A `.meta.db` made before origins were kept gets the column; its rows stay "unknown"
    (never published: whether their blob was verified cannot be told now)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(layers)")}
    if "origin" not in columns:
        conn.execute("ALTER TABLE layers ADD COLUMN origin TEXT NOT NULL DEFAULT 'unknown'")


def _record(row: tuple) -> LayerRecord:
    return LayerRecord(Digest.parse(row[0]), Digest.parse(row[1]), *row[2:7], bool(row[7]),
                       row[8])
