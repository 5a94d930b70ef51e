"""The durable outbox: every result and event is written to SQLite before it is published
and removed only after the broker acknowledged it (QoS 1).

`Outbox` is the store: one SQLite file in WAL mode, bounded by bytes, rows and age (the
oldest entries are dropped first, counted and logged). A full disk stops it from growing
but never raises into the pipeline: the new entry is dropped and counted. A file that is
not a usable outbox (corrupt, or another schema) is moved aside to
`<name>.corrupt-<time>` and an empty outbox is started. `OutboxPublisher`
(`edgeagent.outbox.publisher`) drains it into the MQTT link.

Durability: `synchronous=NORMAL` in WAL mode means a commit is written to the WAL file
without an fsync. Every `put()` is its own commit, so an entry survives a crash of the
process (kill -9) as soon as `put()` returned. The publisher thread checkpoints every
`CHECKPOINT_INTERVAL_S`, which fsyncs the WAL, so a power cut loses at most the entries of
roughly the last half second (those the kernel had not yet written back). Full
synchronous commits would make that zero at the price of an fsync per result, which an
SD card cannot sustain at hundreds of results per second.

Entries are MQTT messages that are events (results, alarms): each carries its own `ts` and
`seq`, and a backlog may be re-sent after a reconnect or restart, so consumers de-duplicate
by them. Retained status messages do not go through the outbox: they are state, and the
agent republishes the current state after every reconnect; replaying an old one would
overwrite newer state.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edgeagent.config import OutboxConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
"""`PRAGMA user_version` of an outbox file; any other version is moved aside."""

CHECKPOINT_INTERVAL_S: Final = 0.5
"""How often the publisher checkpoints (and so fsyncs) the WAL while entries are stored."""

_MIB: Final = 1024 * 1024
_COLUMNS: Final = ("id", "created", "topic", "payload", "qos", "retain", "size")
_SCHEMA: Final = """
CREATE TABLE outbox (
    id      INTEGER PRIMARY KEY,  -- assigned by Outbox; increases for as long as it runs
    created REAL    NOT NULL,     -- wall-clock time of put(), for the age bound
    topic   TEXT    NOT NULL,
    payload BLOB    NOT NULL,
    qos     INTEGER NOT NULL,
    retain  INTEGER NOT NULL,
    size    INTEGER NOT NULL      -- UTF-8 bytes of the topic + payload bytes (max_bytes)
)
"""
_INSERT: Final = (
    "INSERT INTO outbox (id, created, topic, payload, qos, retain, size) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_PENDING: Final = (
    "SELECT id, created, topic, payload, qos, retain FROM outbox WHERE id > ? ORDER BY id LIMIT ?"
)
# Without an fsync per commit the WAL would otherwise only be synced by auto-checkpoints
# in put(); the publisher checkpoints instead, and this is a safety net without it.
_AUTOCHECKPOINT_PAGES: Final = 4000
_WAL_SIZE_LIMIT: Final = 8 * _MIB
_BUSY_TIMEOUT_S: Final = 5.0
_EXPIRE_INTERVAL_S: Final = 1.0
_REPORT_INTERVAL_S: Final = 60.0  # at most one log line per kind of trouble this often
_SCAN_CHUNK: Final = 256
# SQLite primary result codes (the low byte of an extended code).
_SQLITE_CORRUPT: Final = 11
_SQLITE_FULL: Final = 13
_SQLITE_NOTADB: Final = 26


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored message; `created` is the wall-clock time of `put()`."""

    id: int
    created: float
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """`depth` entries of `bytes` bytes wait; `dropped` were discarded by a bound (oldest
    first), `dropped_full` because the disk was full and `dropped_error` because storage
    failed otherwise (both of those are the new entry)."""

    depth: int
    bytes: int
    oldest_age_s: float | None
    dropped: int
    dropped_full: int
    dropped_error: int


class _UnusableFileError(Exception):
    """The file is not an outbox this version can use (corrupt, or another schema)."""


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _is_corruption(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


class Reporter:
    """Logs each kind of trouble once, then at most once every `_REPORT_INTERVAL_S`."""

    def __init__(self) -> None:
        self._last: dict[str, float] = {}

    def due(self, kind: str) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < _REPORT_INTERVAL_S:
            return False
        self._last[kind] = now
        return True


class Outbox:
    """The on-disk queue of messages waiting for the broker's acknowledgement.

    Safe to use from any thread: writes go through one connection under a lock, reads
    (`pending`) through a second one, which WAL lets run beside the writer."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int,
        max_rows: int | None = None,
        max_age_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """Opens or creates the outbox at `path`. Never raises because of the file: a
        corrupt one is moved aside, and an unusable location (no permission, no space)
        falls back to an in-memory outbox, with an error logged (`durable` is then False)."""
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, not {max_bytes!r}")
        if max_rows is not None and max_rows <= 0:
            raise ValueError(f"max_rows must be positive or None, not {max_rows!r}")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be positive or None, not {max_age_s!r}")
        self.path = path
        self._max_bytes = max_bytes
        self._max_rows = max_rows
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()  # the writer connection and every counter below
        self._read_lock = threading.Lock()  # the reader connection
        self._reporter = Reporter()
        self._rows = 0
        self._bytes = 0
        self._oldest: float | None = None  # `created` of the oldest entry
        self._next_id = 1
        self._next_expiry = 0.0
        self._writes = 0  # commits, so checkpoint() knows whether there is work
        self._checkpointed = 0
        self.dropped = 0
        self.dropped_full = 0
        self.dropped_error = 0
        self.durable = True
        self._closed = False
        self._writer, self._reader = self._open()
        if self._reader is self._writer:
            self._read_lock = self._lock
        with self._lock:
            self._load_counters()
            if self._rows:
                log.info(
                    "outbox %s holds %d entries (%d bytes) from before this start",
                    self.path,
                    self._rows,
                    self._bytes,
                )

    @classmethod
    def from_config(cls, config: OutboxConfig, default_path: Path) -> Outbox:
        """The outbox at `config.path`, or at `default_path` when the config names none."""
        return cls(
            config.path or default_path,
            max_bytes=config.max_bytes,
            max_rows=config.max_rows,
            max_age_s=config.max_age_s,
        )

    def __repr__(self) -> str:
        return f"Outbox({str(self.path)!r}, depth={self._rows}, durable={self.durable})"

    # --- opening -------------------------------------------------------------------------

    def _open(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                return self._open_file()
            except _UnusableFileError as exc:
                self._move_aside(str(exc))
            except sqlite3.DatabaseError as exc:
                if not _is_corruption(exc):
                    raise
                self._move_aside(f"it is corrupt ({exc})")
            return self._open_file()
        except (OSError, sqlite3.Error, _UnusableFileError) as exc:
            log.error(
                "cannot use the outbox file %s: %s; keeping results in memory instead, so "
                "a restart loses any backlog (check the directory's permissions and free "
                "space, or set outbox.path)",
                self.path,
                exc,
            )
            self.durable = False
            memory = self._connect(":memory:")
            memory.execute(_SCHEMA)
            return memory, memory

    def _open_file(self) -> tuple[sqlite3.Connection, sqlite3.Connection]:
        writer = self._connect(str(self.path))
        try:
            mode = writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                log.warning(
                    "the file system of %s does not support SQLite's WAL mode (journal "
                    "mode is %s): the outbox works but puts are slower",
                    self.path,
                    mode,
                )
            writer.execute(f"PRAGMA wal_autocheckpoint={_AUTOCHECKPOINT_PAGES}")
            writer.execute(f"PRAGMA journal_size_limit={_WAL_SIZE_LIMIT}")
            self._check_schema(writer)
            # A full scan of the table: pages too damaged to read fail here, at start.
            writer.execute("SELECT count(*), sum(size) FROM outbox").fetchone()
            reader = self._connect(str(self.path))
        except BaseException:
            writer.close()
            raise
        return writer, reader

    @staticmethod
    def _connect(target: str) -> sqlite3.Connection:
        # isolation_level=None: every statement commits by itself unless we BEGIN.
        conn = sqlite3.connect(
            target, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_S
        )
        # NORMAL in WAL mode: commits are not fsynced, checkpoints are. A process crash
        # loses nothing committed; a power cut loses what came after the last checkpoint.
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    def _check_schema(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = [row[0] for row in conn.execute("SELECT name FROM sqlite_master")]
        if version == 0 and not tables:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(_SCHEMA)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
            return
        if version != SCHEMA_VERSION:
            raise _UnusableFileError(
                f"its schema version is {version}, this edgeagent reads {SCHEMA_VERSION}"
            )
        columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(outbox)"))
        if columns != _COLUMNS:
            raise _UnusableFileError(f"its outbox table has the columns {columns}, not {_COLUMNS}")

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        self.path.rename(target)
        # The WAL belongs to the old file: next to a new one SQLite would try to apply it.
        for suffix in ("-wal", "-shm"):
            companion = self.path.with_name(self.path.name + suffix)
            if companion.exists():
                companion.rename(target.with_name(target.name + suffix))
        log.error(
            "the outbox file %s cannot be used: %s. It was moved to %s and an empty outbox "
            "started; any results in it are not published",
            self.path,
            why,
            target,
        )

    def _load_counters(self) -> None:
        rows, size, last = self._writer.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(max(id), 0) FROM outbox"
        ).fetchone()
        self._rows, self._bytes = int(rows), int(size)
        self._next_id = max(self._next_id, int(last) + 1)
        self._refresh_oldest()

    def _refresh_oldest(self) -> None:
        row = self._writer.execute("SELECT created FROM outbox ORDER BY id LIMIT 1").fetchone()
        self._oldest = float(row[0]) if row is not None else None

    # --- the pipeline's side -------------------------------------------------------------

    def put(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> int | None:
        """Stores a message; returns its id, or None when it could not be stored (disk
        full, storage error; counted and logged). Makes room by dropping the oldest entries
        when a bound is reached. Raises ValueError only for a QoS other than 0 or 1."""
        if qos not in (0, 1):
            raise ValueError(f"qos must be 0 or 1, not {qos!r}")
        size = len(topic.encode()) + len(payload)
        now = self._clock()
        with self._lock:
            if self._closed:
                self.dropped_error += 1
                if self._reporter.due("closed"):
                    log.error("outbox %s: put() after close(); the result is dropped", self.path)
                return None
            if size > self._max_bytes:
                self._note_dropped(1, f"an entry of {size} bytes exceeds max_bytes")
                return None
            entry_id = self._next_id
            self._next_id += 1
            row = (entry_id, now, topic, payload, qos, int(retain), size)
            try:
                if self._needs_room(size, now):
                    self._put_making_room(row, size, now)
                else:
                    self._writer.execute(_INSERT, row)
            except sqlite3.Error as exc:
                self._failed_put(exc, topic)
                return None
            self._rows += 1
            self._bytes += size
            self._writes += 1
            if self._oldest is None:
                self._oldest = now
        return entry_id

    def _needs_room(self, size: int, now: float) -> bool:
        return (
            (self._max_rows is not None and self._rows >= self._max_rows)
            or self._bytes + size > self._max_bytes
            or (self._max_age_s is not None and now >= self._next_expiry and self._expired(now))
        )

    def _expired(self, now: float) -> bool:
        assert self._max_age_s is not None
        return self._oldest is not None and self._oldest < now - self._max_age_s

    def _put_making_room(self, row: tuple[object, ...], size: int, now: float) -> None:
        self._writer.execute("BEGIN IMMEDIATE")
        try:
            self._expire_locked(now)
            if self._max_rows is not None and self._rows >= self._max_rows:
                excess = self._rows - self._max_rows + 1
                last = self._writer.execute(
                    "SELECT id FROM outbox ORDER BY id LIMIT 1 OFFSET ?", (excess - 1,)
                ).fetchone()
                self._drop_through(last[0], f"max_rows ({self._max_rows}) reached")
            if self._bytes + size > self._max_bytes:
                need = self._bytes + size - self._max_bytes
                self._drop_through(
                    self._last_id_freeing(need), f"max_bytes ({self._max_bytes}) reached"
                )
            self._writer.execute(_INSERT, row)
            self._writer.execute("COMMIT")
        except BaseException:
            self._rollback()
            raise

    def _last_id_freeing(self, need: int) -> int:
        freed = 0
        last = 0
        for entry_id, size in self._scan("SELECT id, size FROM outbox ORDER BY id"):
            freed += int(size)
            last = entry_id
            if freed >= need:
                break
        return last

    def _scan(self, sql: str) -> Iterator[tuple[int, float]]:
        cursor = self._writer.execute(sql)
        try:
            while chunk := cursor.fetchmany(_SCAN_CHUNK):
                yield from chunk
        finally:
            cursor.close()

    def _drop_through(self, last_id: int, why: str) -> None:
        """Deletes every entry up to `last_id` (inside the caller's transaction)."""
        sizes = self._writer.execute(
            "DELETE FROM outbox WHERE id <= ? RETURNING size", (last_id,)
        ).fetchall()
        self._rows -= len(sizes)
        self._bytes -= sum(s for (s,) in sizes)
        self._refresh_oldest()
        self._note_dropped(len(sizes), why)

    def _expire_locked(self, now: float) -> None:
        if self._max_age_s is None or now < self._next_expiry:
            return
        self._next_expiry = now + _EXPIRE_INTERVAL_S
        if not self._expired(now):
            return
        cutoff = now - self._max_age_s
        last = None
        # Entries are in time order by id (give or take a clock step): stop at the first
        # young one rather than scanning the whole table.
        for entry_id, created in self._scan("SELECT id, created FROM outbox ORDER BY id"):
            if created >= cutoff:
                break
            last = entry_id
        if last is not None:
            self._drop_through(last, f"older than max_age_s ({self._max_age_s:g} s)")

    def _rollback(self) -> None:
        with contextlib.suppress(sqlite3.Error):
            if self._writer.in_transaction:
                self._writer.execute("ROLLBACK")
        with contextlib.suppress(sqlite3.Error):
            self._load_counters()  # the deletes of the failed transaction did not happen

    def _note_dropped(self, count: int, why: str) -> None:
        if not count:
            return
        self.dropped += count
        if self._reporter.due("dropped"):
            log.warning(
                "outbox %s: dropped %d of the oldest entries: %s (%d dropped since start; "
                "next report in %.0f s at most)",
                self.path,
                count,
                why,
                self.dropped,
                _REPORT_INTERVAL_S,
            )

    def _failed_put(self, exc: sqlite3.Error, topic: str) -> None:
        if _primary_code(exc) == _SQLITE_FULL:
            self.dropped_full += 1
            if self._reporter.due("full"):
                log.error(
                    "outbox %s: the disk is full; new results are dropped (%d so far, "
                    "this one to %s) until acknowledged entries free space",
                    self.path,
                    self.dropped_full,
                    topic,
                )
            return
        self.dropped_error += 1
        if self._reporter.due("error"):
            log.error(
                "outbox %s: cannot store a result for %s: %s (%d dropped so far)",
                self.path,
                topic,
                exc,
                self.dropped_error,
            )
        if _is_corruption(exc):
            self._recover_locked(exc)

    def _recover_locked(self, exc: sqlite3.Error) -> None:
        """Replaces a file found corrupt while running by an empty one; ids go on rising."""
        with self._reader_locked():
            self._close_connections()
            if self.durable:
                with contextlib.suppress(OSError):
                    self._move_aside(f"it became corrupt while in use ({exc})")
            self._writer, self._reader = self._open()
            if self._reader is self._writer:  # fell back to memory: one connection, one lock
                self._read_lock = self._lock
            self._load_counters()

    def _reader_locked(self) -> contextlib.AbstractContextManager[object]:
        """The reader's lock, for a caller that holds the writer's (they may be one)."""
        if self._read_lock is self._lock:
            return contextlib.nullcontext()
        return self._read_lock

    def _close_connections(self) -> None:
        for conn in {self._writer, self._reader}:
            with contextlib.suppress(sqlite3.Error):
                conn.close()

    # --- the publisher's side ------------------------------------------------------------

    @property
    def last_id(self) -> int:
        """The id given to the most recent `put()` (0 if none yet). Ids are given and
        committed under one lock, so every id up to this one is stored (or was dropped)."""
        with self._lock:
            return self._next_id - 1

    def pending(self, after_id: int, limit: int) -> list[Entry]:
        """Up to `limit` entries with an id above `after_id`, in id order. Raises
        sqlite3.Error when the file cannot be read."""
        try:
            with self._read_lock:
                rows = self._reader.execute(_PENDING, (after_id, limit)).fetchall()
        except sqlite3.Error as exc:
            self._recover_if_corrupt(exc)
            raise
        return [Entry(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows]

    def remove(self, ids: Iterable[int]) -> int:
        """Deletes the entries with these ids (acknowledged ones); returns how many
        existed. Raises sqlite3.Error when the file cannot be written."""
        batch = json.dumps(list(ids))
        try:
            with self._lock:
                sizes = self._writer.execute(
                    "DELETE FROM outbox WHERE id IN (SELECT value FROM json_each(?)) "
                    "RETURNING size",
                    (batch,),
                ).fetchall()
                self._rows -= len(sizes)
                self._bytes -= sum(s for (s,) in sizes)
                self._writes += 1
                self._refresh_oldest()
        except sqlite3.Error as exc:
            self._recover_if_corrupt(exc)
            raise
        return len(sizes)

    def expire(self) -> None:
        """Drops entries older than `max_age_s` (put() does it too, when entries arrive)."""
        with self._lock:
            now = self._clock()
            if self._max_age_s is None or now < self._next_expiry or not self._expired(now):
                return
            try:
                self._writer.execute("BEGIN IMMEDIATE")
                self._expire_locked(now)
                self._writer.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback()
                if self._reporter.due("expire"):
                    log.error("outbox %s: cannot drop expired entries: %s", self.path, exc)

    def checkpoint(self) -> None:
        """Copies the WAL into the database file and fsyncs both, if anything changed."""
        if not self.durable or self._writes == self._checkpointed:
            return
        self._checkpointed = self._writes
        try:
            with self._read_lock:
                self._reader.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.debug("outbox checkpoint failed: %s", exc)

    def _recover_if_corrupt(self, exc: sqlite3.Error) -> None:
        if _is_corruption(exc):
            with self._lock:
                self._recover_locked(exc)

    def stats(self) -> OutboxStats:
        with self._lock:
            oldest = self._oldest
            return OutboxStats(
                depth=self._rows,
                bytes=self._bytes,
                oldest_age_s=max(0.0, self._clock() - oldest) if oldest is not None else None,
                dropped=self.dropped,
                dropped_full=self.dropped_full,
                dropped_error=self.dropped_error,
            )

    def close(self) -> None:
        """Closes the file (entries stay in it for the next start); put() then drops."""
        with self._lock, self._reader_locked():
            self._closed = True
            self._close_connections()
