"""The SQLite file under the disk tier's metadata (pipeline/metadata.py): `.meta.db`.

`MetaDB.query` runs a function on a connection of its own, taken from the idle ones (or
opened: up to POOL_SIZE, or when none comes back within POOL_WAIT) and given back after;
WAL and a busy timeout let many processes share the file. A connection opened for writing
sets the file up: WAL, the schema, and the migrations of a file an older version made.

A database that cannot be used (not a database, malformed, truncated; or `.meta.db`, its
-wal or -shm not a regular file, e.g. a symlink, which is never opened through) bricked
every command. Now a process that writes moves it aside, with its -wal and -shm, to
`.meta.db.corrupt-<UTC time>`, says so in one warning, and rebuilds it from the entries
on disk (`rebuild`: gc's adoption, which hashes each one); the retried query then runs on
the new file. One process at a time repairs, under `.locks/meta.db.lock`; one that waited
finds it repaired and only reconnects. A `read_only` MetaDB (ls, df, metrics, inspect,
usage) never moves or creates anything: it warns once and reads as empty, so those
commands list what the directory holds.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from pipeline.errors import NotAFile, PermanentError
from pipeline.nofollow import open_file, regular

log = logging.getLogger("layerwarm")
_INIT = threading.Lock()  # one thread of a process sets a database up at a time
T = TypeVar("T")
_SIDE_FILES = ("", "-wal", "-shm")  # SQLite's files for one database: they go together
_BROKEN = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB: the file itself is bad
POOL_SIZE = 2  # connections a process's threads share before one waits for another (_take)
POOL_WAIT = 0.05  # seconds it waits at most, then opens one of its own
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
    data BLOB NOT NULL,
    last_used REAL NOT NULL DEFAULT 0
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
CREATE TABLE IF NOT EXISTS resolved (
    ref TEXT NOT NULL,
    platform TEXT NOT NULL,
    manifest_digest TEXT NOT NULL,
    image TEXT NOT NULL,
    at REAL NOT NULL,
    PRIMARY KEY (ref, platform)
);
CREATE INDEX IF NOT EXISTS layers_diff_id ON layers (diff_id);
"""



class Unusable(sqlite3.DatabaseError):
    """`.meta.db` (or its -wal, -shm) is something SQLite must not open: never followed."""


def read_only_medium(path: Path) -> bool:
    """True when the directory holding `path` is on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class MetaDB:
    """One `.meta.db`, shared by the threads of a process; see the module docstring."""

    def __init__(
        self, path: Path, *, read_only: bool = False, lock: Path | None = None,
        rebuild: Callable[[], int] | None = None,
    ) -> None:
        """`read_only`: never create, move or write anything (commands that only read).
        `lock`: the file held while repairing; `rebuild`: refills a new database after an
        unusable one was moved aside, returning how many entries it recorded."""
        self.path = path
        self.read_only = read_only
        self._lock_path = lock or path.with_name(path.name + ".lock")
        self._rebuild = rebuild
        # Idle connections, for any thread to take (_db). One per thread opened and set up
        # (pragmas, WAL, schema) 17 of them in a warm of 12 cached images, slowing each
        # thread's first query. `_open` counts those open or being opened (POOL_SIZE).
        self._idle: list[sqlite3.Connection] = []
        self._open = 0
        self._pool = threading.Condition()
        # Bumped when the file is replaced: connections to the old one are not reused.
        self._generation = 0
        self._repair = threading.Lock()  # one thread of this process repairs at a time
        self._repairing = threading.local()
        self._unreadable = False  # read_only: warned once, then read as empty

    def query(self, fn: Callable[[sqlite3.Connection], T], empty: T, *,
               create: bool = False) -> T:
        """`fn` on a connection of its own (`empty` when there is no database yet). An
        unusable database is repaired once and `fn` run again; a read-only one reads as
        empty; `create`: make the file if there is none."""
        for attempt in (1, 2):
            generation = self._generation
            try:
                with self._db(create=create) as db:
                    return empty if db is None else fn(db)
            except sqlite3.DatabaseError as e:
                if self.read_only:
                    # A table an older version did not make holds nothing (a writer adds it).
                    if "no such table" not in str(e):
                        self._give_up_reading(e)
                    return empty
                if attempt == 2 or not _broken(e):
                    raise
                self._heal(e, generation)
        raise AssertionError("unreachable")

    @contextmanager
    def _db(self, *, create: bool) -> Iterator[sqlite3.Connection | None]:
        conn = self._take()
        if conn is None:  # none idle: this thread may open one
            try:
                conn = self._open_new(create)
            finally:
                if conn is None:
                    self._give_back(None)
        if conn is None:
            yield None  # nothing recorded yet; reading must not create the file
            return
        generation = self._generation
        try:
            yield conn
        finally:
            # A transaction its ROLLBACK could not end, or a file replaced since: not reusable.
            if conn.in_transaction or generation != self._generation:
                conn.close()
                conn = None
            self._give_back(conn)

    def _take(self) -> sqlite3.Connection | None:
        """An idle connection; or None, counted as open: the caller opens one (`_open_new`)
        and gives it back (`_give_back`). With POOL_SIZE already open, wait up to POOL_WAIT
        for one to come back first: a warm's threads querying at once opened ~14, and the
        opening (and the threads' GIL handoffs around it) slowed a warm of cached images
        by ~10 ms, while a query holds its connection well under a millisecond. The wait is
        short because a connection may be held longer: a write waiting out another
        process's transaction (busy_timeout) must not hold up this process's reads."""
        with self._pool:
            self._pool.wait_for(lambda: self._idle or self._open < POOL_SIZE, POOL_WAIT)
            if self._idle:
                return self._idle.pop()
            self._open += 1
            return None

    def _give_back(self, conn: sqlite3.Connection | None) -> None:
        """`conn` back to the idle ones; None: one opened by `_take`'s caller is gone."""
        with self._pool:
            if conn is None:
                self._open -= 1
            else:
                self._idle.append(conn)
            self._pool.notify()

    def _open_new(self, create: bool) -> sqlite3.Connection | None:
        """A new connection, or None when there is no database to read (and none to make)."""
        if self._unreadable or (not create and not os.path.lexists(self.path)):
            return None
        _check_files(self.path)
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)  # a first warm's first write
        return self._connect()

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:  # no WAL switch, no schema: it reads what is there or fails
            uri = Path(os.path.abspath(self.path)).as_uri() + "?mode=ro"  # %-escaped: ? # %
            if read_only_medium(self.path):
                # A WAL database needs its -shm file even to be read, and a read-only
                # mount cannot hold a new one; nothing there can change the file either,
                # so it is read as immutable (only a crashed writer's -wal goes unread).
                uri += "&immutable=1"
            conn = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=30000")
            return conn
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
                    _migrate(conn)
                return conn
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    conn.close()
                    raise
                time.sleep(0.05)
            except sqlite3.DatabaseError:
                conn.close()
                raise

    def _give_up_reading(self, e: sqlite3.Error) -> None:
        if not self._unreadable:
            self._unreadable = True
            log.warning("cannot read %s (%s): listing what the cache directory holds "
                        "without what it records", self.path, e)

    def _heal(self, e: sqlite3.DatabaseError, generation: int) -> None:
        """Replace the unusable database `e` was about, unless another thread or process
        already has (since `generation`)."""
        if getattr(self._repairing, "active", False):
            raise e  # the rebuilt file failed too: no loop
        with self._repair:
            if generation != self._generation:
                return  # another thread of this process has just replaced it
            self._repairing.active = True
            try:
                with _exclusive(self._lock_path, self.path):
                    self._replace(str(e))
            finally:
                self._repairing.active = False

    def _replace(self, reason: str) -> None:
        """Under the repair lock: drop our connections; if the file is still unusable
        (another process may have repaired it while we waited), move it aside and rebuild."""
        self._generation += 1
        with self._pool:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for conn in idle:
            conn.close()
        if _usable(self.path):
            return
        try:
            aside = _move_aside(self.path)
        except OSError as e:
            raise PermanentError(f"{self.path} cannot be used ({reason}) nor moved aside: "
                                 f"{e.strerror}") from None
        log.warning("%s cannot be used (%s): moved aside to %s; rebuilding it from the "
                    "entries on disk", self.path, reason, aside.name)
        if self._rebuild is not None:
            count = self._rebuild()
            log.info("rebuilt %s: %d entries recorded again", self.path, count)

    def bytes_on_disk(self) -> int:
        """The database with its -wal and -shm, as regular files on disk."""
        size = 0
        for suffix in _SIDE_FILES:
            try:
                st = os.lstat(f"{self.path}{suffix}")
            except FileNotFoundError:
                continue
            size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        return size


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction (the connection is in autocommit): all of it or none."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a `.meta.db` made by an older version up to this schema."""
    _add_origin_column(conn)
    _add_config_last_used(conn)


def _add_origin_column(conn: sqlite3.Connection) -> None:
    """A `.meta.db` made before origins were kept gets the column; its rows stay "unknown"
    (never published: whether their blob was verified cannot be told now)."""
    columns = {r[1] for r in conn.execute("PRAGMA table_info(layers)")}
    if "origin" not in columns:
        conn.execute("ALTER TABLE layers ADD COLUMN origin TEXT NOT NULL DEFAULT 'unknown'")


def _add_config_last_used(conn: sqlite3.Connection) -> None:
    """Configs stored before their use was kept count as used now: gc keeps them for a
    whole TTL from the upgrade, not dropping them all at its first run."""
    def missing() -> bool:
        return "last_used" not in {r[1] for r in conn.execute("PRAGMA table_info(configs)")}

    if missing():
        with transaction(conn):
            if missing():  # again, alone: another process may have just added it
                conn.execute("ALTER TABLE configs ADD COLUMN last_used REAL NOT NULL DEFAULT 0")
                conn.execute("UPDATE configs SET last_used=?", (time.time(),))


def _broken(e: sqlite3.DatabaseError) -> bool:
    """Whether `e` says the database itself is unusable (not busy, not read-only)."""
    code = getattr(e, "sqlite_errorcode", None)
    return isinstance(e, Unusable) or (code is not None and code & 0xFF in _BROKEN)


def _check_files(path: Path) -> None:
    """Unusable unless the database and its -wal and -shm are regular files or absent:
    SQLite follows a symlink, and would write its rows or WAL frames through it."""
    for suffix in _SIDE_FILES:
        try:
            regular(Path(f"{path}{suffix}"), "database file")
        except NotAFile as e:
            raise Unusable(str(e)) from None


def _usable(path: Path) -> bool:
    """Whether the database at `path` can be used now (absent: it will be created)."""
    try:
        _check_files(path)
        if not os.path.lexists(path):
            return True
        conn = sqlite3.connect(path, timeout=30, isolation_level=None)
        try:
            return conn.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok"
        finally:
            conn.close()
    except sqlite3.DatabaseError as e:
        if _broken(e):
            return False
        raise


def _move_aside(path: Path) -> Path:
    """Rename the database and its -wal and -shm (links themselves, never their targets)
    to `<name>.corrupt-<UTC time>[-n]`, kept for whoever wants to look at them."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside, n = path.with_name(f"{path.name}.corrupt-{stamp}"), 0
    while any(os.path.lexists(f"{aside}{s}") for s in _SIDE_FILES):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in _SIDE_FILES:
        if os.path.lexists(f"{path}{suffix}"):
            os.rename(f"{path}{suffix}", f"{aside}{suffix}")
    return aside


@contextmanager
def _exclusive(lock: Path, what: Path) -> Iterator[None]:
    """flock(2) on `lock` (never through a symlink) while repairing `what`; a process
    that finds it held says so and waits for the repair to end."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = open_file(lock, os.O_RDWR | os.O_CREAT, 0o644, what="lock file")
    except OSError as e:
        raise PermanentError(f"cannot open the lock {lock}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process repairing %s", what)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
