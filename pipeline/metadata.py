"""What the disk tier knows about its entries, in SQLite (WAL) beside them: `.meta.db`.

    layers   digest, diff_id, media type, sizes, created, last used, and origin: how the
             entry's bytes are tied to its digest ("blob": decompressed from the verified
             blob; "remote": copied from the remote tier; "shared:<digest>": content of
             another entry; "adopted" by gc; "unknown" from before origins were kept).
             Only "blob" and "remote" entries are published (pipeline/layer.py: paired)
    images   which image (manifest digest, ref, platform) uses which layer
    counters running totals since the cache was made (hits, bytes, evictions, ...)
    configs  image config blobs by digest: content-addressed, so a warm of images already
             seen asks the registry only for their manifests (tags can move; configs cannot).
             Bounded: the Resolver stores none above LAYERWARM_MAX_STORED_CONFIG, and gc
             drops those unused (last_used) for LAYERWARM_STORED_CONFIG_TTL
    pins     layers protected from gc until a time, and the image ref that pinned them

The files stay the source of truth: a row says what an entry should be (so `verify` can
re-hash it and a warm can notice a truncated one), never that it exists. The SQLite file
itself (connections shared by threads, WAL, schema, repair of an unusable one) is
pipeline/metadb.py's.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pipeline.digest import Digest
from pipeline.metadb import MetaDB, transaction

log = logging.getLogger("layerwarm")
T = TypeVar("T")


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
class MetadataUsage:
    bytes: int  # .meta.db with its -wal and -shm, on disk
    configs: int  # image configs stored
    config_bytes: int  # their size


@dataclass(frozen=True)
class ImageRow:
    manifest_digest: str
    ref: str
    platform: str | None
    layer_digest: str


class Metadata:
    """The rows of one `.meta.db` (see the module docstring); each method one query or
    transaction."""

    def __init__(
        self, path: Path, *, read_only: bool = False, lock: Path | None = None,
        rebuild: Callable[[], int] | None = None,
    ) -> None:
        """The arguments are the file's (pipeline/metadb.py `MetaDB`)."""
        self.path = path
        self._file = MetaDB(path, read_only=read_only, lock=lock, rebuild=rebuild)

    def _query(self, fn: Callable[[sqlite3.Connection], T], empty: T, *,
               create: bool = False) -> T:
        return self._file.query(fn, empty, create=create)

    def record_layer(
        self, digest: Digest, diff_id: Digest, media_type: str, compressed_size: int,
        uncompressed_size: int, origin: str,
    ) -> None:
        """What a committed entry is (pipeline/tiers/disk.py `Ingest.commit` calls this)."""
        now = time.time()
        self._query(lambda db: db.execute(
            "INSERT INTO layers VALUES (?, ?, ?, ?, ?, ?, ?, 0, ?) ON CONFLICT(digest) "
            "DO UPDATE SET diff_id=excluded.diff_id, media_type=excluded.media_type, "
            "compressed_size=excluded.compressed_size, "
            "uncompressed_size=excluded.uncompressed_size, last_used=excluded.last_used, "
            "origin=excluded.origin, publish_pending=0",
            (str(digest), str(diff_id), media_type, compressed_size, uncompressed_size,
             now, now, origin),
        ), None, create=True)

    def set_publish_pending(self, digest: Digest, pending: bool) -> None:
        """A layer on disk that the remote tier still lacks (it was down): publish later."""
        self._update("UPDATE layers SET publish_pending=? WHERE digest=?",
                     [(int(pending), str(digest))])

    def touch(self, *digests: Digest) -> None:
        """Mark layers used now (for gc's LRU), all in one statement."""
        if digests:
            now = time.time()
            self._update("UPDATE layers SET last_used=? WHERE digest=?",
                         [(now, str(d)) for d in digests])

    def _update(self, sql: str, rows: list[tuple]) -> None:
        # Bookkeeping on existing rows: losing an update is better than failing a warm.
        def run(db: sqlite3.Connection) -> None:
            with transaction(db):  # one transaction, not one per row
                db.executemany(sql, rows)

        try:
            self._query(run, None)
        except sqlite3.Error as e:
            log.warning("metadata update in %s failed: %s", self.path, e)

    def record_images(
        self, images: Sequence[tuple[Digest, str, str | None, Sequence[Digest]]]
    ) -> None:
        """Which layers each image (manifest digest, ref, platform) uses; one transaction."""
        def run(db: sqlite3.Connection) -> None:
            with transaction(db):
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

        self._query(run, None, create=True)

    def record_resolved(self, rows: Sequence[tuple[str, str, Digest, str]]) -> None:
        """What (ref, platform) resolved to last: its manifest digest and the image (JSON,
        pipeline/imageopen.py's), so that it can be read again without a registry."""
        now = time.time()

        def run(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.executemany("INSERT OR REPLACE INTO resolved VALUES (?, ?, ?, ?, ?)",
                               [(ref, platform, str(m), image, now)
                                for ref, platform, m, image in rows])

        try:
            self._query(run, None, create=True)
        except sqlite3.Error as e:  # the next reader asks the registry again
            log.warning("metadata update in %s failed: %s", self.path, e)

    def resolved(self, ref: str, platform: str) -> tuple[Digest, str] | None:
        """What `record_resolved` kept for (ref, platform), or None."""
        try:
            rows = self._rows("SELECT manifest_digest, image FROM resolved "
                              "WHERE ref=? AND platform=?", (ref, platform))
        except sqlite3.Error as e:  # a table an older version did not make: not known
            log.debug("resolved read in %s failed: %s", self.path, e)
            return None
        return (Digest.parse(rows[0][0]), rows[0][1]) if rows else None

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        """Every row of a read; none when there is no database (reads never create it)."""
        return self._query(lambda db: db.execute(sql, args).fetchall(), [])

    def layer(self, digest: Digest) -> LayerRecord | None:
        rows = self._rows("SELECT * FROM layers WHERE digest=?", (str(digest),))
        return _record(rows[0]) if rows else None

    def layers(self) -> list[LayerRecord]:
        return [_record(r) for r in self._rows("SELECT * FROM layers")]

    def with_diff_id(self, diff_id: Digest) -> list[LayerRecord]:
        """Rows of every entry holding this content (sharing by diff_id), oldest first."""
        rows = self._rows("SELECT * FROM layers WHERE diff_id=? ORDER BY created",
                          (str(diff_id),))
        return [_record(r) for r in rows]

    # Queries for the cache commands (pipeline/cacheops.py); reads never create the file.

    def image_rows(self, layer: Digest | None = None) -> list[ImageRow]:
        """Which image (manifest digest, ref, platform) uses which layer; one layer's or all."""
        sql = "SELECT manifest_digest, ref, platform, layer_digest FROM images"
        args: tuple = ()
        if layer is not None:
            sql, args = sql + " WHERE layer_digest=?", (str(layer),)
        return [ImageRow(*r) for r in self._rows(sql + " ORDER BY ref, manifest_digest", args)]

    def config(self, digest: Digest) -> bytes | None:
        """An image config stored earlier (the caller verifies it), or None; marked used."""
        try:
            rows = self._rows("SELECT data FROM configs WHERE digest=?", (str(digest),))
        except sqlite3.Error as e:  # a cache of documents: a miss, not a failure
            log.warning("metadata config read in %s failed: %s", self.path, e)
            return None
        if not rows:
            return None
        self._update("UPDATE configs SET last_used=? WHERE digest=?",
                     [(time.time(), str(digest))])
        return bytes(rows[0][0])

    def record_config(self, digest: Digest, data: bytes) -> None:
        try:
            self._query(lambda db: db.execute(
                "INSERT OR REPLACE INTO configs (digest, data, last_used) VALUES (?, ?, ?)",
                (str(digest), data, time.time())), None, create=True)
        except sqlite3.Error as e:
            log.warning("metadata config write in %s failed: %s", self.path, e)

    def usage(self) -> MetadataUsage:
        """What the database takes on disk, and how much of it is stored image configs."""
        rows = self._rows("SELECT count(*), coalesce(sum(length(data)), 0) FROM configs")
        configs, config_bytes = rows[0] if rows else (0, 0)
        return MetadataUsage(self._file.bytes_on_disk(), configs, config_bytes)

    def drop_configs(self, unused_since: float, *, dry_run: bool = False) -> tuple[int, int]:
        """Drop the stored configs not used since `unused_since` (epoch seconds): how many,
        and their bytes. When that leaves a quarter of the file free, give it back."""
        where = "FROM configs WHERE last_used < ?"
        rows = self._rows(f"SELECT count(*), coalesce(sum(length(data)), 0) {where}",
                          (unused_since,))
        count, size = rows[0] if rows else (0, 0)
        if count and not dry_run:
            self._query(lambda db: db.execute(f"DELETE {where}", (unused_since,)), None)
            self._vacuum_if_sparse()
        return count, size

    def _vacuum_if_sparse(self) -> None:
        # Deleted rows leave free pages that SQLite reuses but never returns to the disk.
        def run(db: sqlite3.Connection) -> None:
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            if free and free * 4 >= pages:
                db.execute("VACUUM")
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

        try:
            self._query(run, None)
        except sqlite3.OperationalError as e:  # busy: the next gc will try again
            log.warning("could not compact %s: %s", self.path, e)

    def bump(self, name: str, amount: float = 1.0) -> None:
        """Add ``amount`` to the running total ``name`` (created at 0)."""
        self.bump_many({name: amount})

    def bump_many(self, amounts: Mapping[str, float]) -> None:
        """Add to several running totals in one transaction: all of them or none."""
        def run(db: sqlite3.Connection) -> None:
            with transaction(db):
                db.executemany(
                    "INSERT INTO counters VALUES (?, ?) "
                    "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                    list(amounts.items()),
                )

        try:
            self._query(run, None, create=True)
        except sqlite3.Error as e:  # a lost count must not fail the work it counts
            log.warning("metadata counters %s in %s failed: %s", ", ".join(amounts), self.path, e)

    def counters(self) -> dict[str, float]:
        return dict(self._rows("SELECT name, value FROM counters"))

    def adopt_layer(self, digest: Digest, diff_id: Digest, size: int, last_used: float) -> None:
        """Record an entry found without a row (copied in by hand, or its row was lost).

        Only what rehashing the file tells is known: media type and compressed size stay
        unknown ("" and 0), and its last use is the file's mtime, so an adopted entry keeps
        its place in the LRU order. An existing row (a warm won the race) is kept.
        """
        self._query(lambda db: db.execute(
            "INSERT OR IGNORE INTO layers VALUES (?, ?, '', 0, ?, ?, ?, 0, 'adopted')",
            (str(digest), str(diff_id), size, last_used, last_used),
        ), None, create=True)

    def pin(self, layers: Sequence[Digest], ref: str, until: float) -> None:
        """Protect `layers` from gc until `until` (epoch seconds); a new pin of a ref wins."""
        self._query(lambda db: db.executemany(
            "INSERT INTO pins VALUES (?, ?, ?) ON CONFLICT(layer_digest, ref) "
            "DO UPDATE SET until=excluded.until",
            [(str(d), ref, until) for d in layers],
        ), None, create=True)

    def _delete(self, sql: str, args: tuple) -> int:
        """How many rows a DELETE removed (0 when there is no database)."""
        return self._query(lambda db: db.execute(sql, args).rowcount, 0)

    def unpin(self, ref: str) -> int:
        """Drop every pin `ref` made; returns how many layers it had pinned."""
        return self._delete("DELETE FROM pins WHERE ref=?", (ref,))

    def pins(self, now: float | None = None) -> list[tuple[str, str, float]]:
        """(layer digest, ref, until) of every pin still in force at `now`."""
        now = time.time() if now is None else now
        return self._rows("SELECT layer_digest, ref, until FROM pins WHERE until > ? "
                          "ORDER BY ref, layer_digest", (now,))

    def pinned_until(self, now: float | None = None) -> dict[str, float]:
        """Each pinned layer's digest and the end of its longest pin still in force."""
        out: dict[str, float] = {}
        for digest, _, until in self.pins(now):
            out[digest] = max(until, out.get(digest, 0.0))
        return out

    def drop_expired_pins(self, now: float | None = None) -> int:
        now = time.time() if now is None else now
        return self._delete("DELETE FROM pins WHERE until <= ?", (now,))

    def forget(self, digest: Digest) -> None:
        self._delete("DELETE FROM layers WHERE digest=?", (str(digest),))


def _record(row: tuple) -> LayerRecord:
    origin = row[8] if len(row) > 8 else "unknown"  # read-only, from before origins
    return LayerRecord(Digest.parse(row[0]), Digest.parse(row[1]), *row[2:7], bool(row[7]),
                       origin)
