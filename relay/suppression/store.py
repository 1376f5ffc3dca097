"""The suppression store: SQLite on disk, and its in-memory twin.

Both implement `relay.suppression.SuppressionStore` and pass the same contract tests
(tests/suppression/test_store.py). Addresses are canonicalised on the way in and on
look-up with `relay.address.canonical`: the domain is lower-cased, the local part is kept
exactly as written, quotes included (RFC 5321 2.4: the local part is case-sensitive, and
only the receiving host may decide otherwise).

An entry whose `expires_at` has passed no longer suppresses (check() ignores it) but
stays listed until `purge_expired()` deletes it, so an admin can still see why mail to
the address stopped for a while.

The SQLite store is read on the event loop (check() at RCPT and at send time) and written
from worker threads (`await asyncio.to_thread(store.add, entry)`). It keeps two
connections: a writer, whose commits are fsync'd (WAL, synchronous=FULL), and a reader for
the look-ups. WAL lets the reader go on while a commit waits for its fsync, so a look-up
never stalls the event loop behind a write. Each connection has its own lock.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import sqlite_utils

from relay.address import canonical
from relay.suppression import GLOBAL, Reason, Suppression

if TYPE_CHECKING:
    from relay.config import Config

TABLE = "suppressions"
SOFT_TABLE = "soft_bounces"
_COLUMNS = "address, scope, reason, detail, created_at, expires_at"
_BUSY_TIMEOUT_MS = 5000  # another process (the CLI beside `relay serve`) may hold the lock


def suppression_path(cfg: Config) -> Path:
    """Where the suppression database lives: [suppression].path."""
    return cfg.suppression.path


# check() reads one index entry (one scope) or the few entries of one address (several
# scopes, filtered here): one B-tree descent either way. "scope IN (?, ?)" would descend
# once per scope, which measured twice as slow.
_UNEXPIRED = "(expires_at IS NULL OR expires_at > ?)"
CHECK_ONE_SQL = (f"SELECT {_COLUMNS} FROM {TABLE} "
                 f"WHERE address = ? AND scope = ? AND {_UNEXPIRED}")
CHECK_ANY_SQL = f"SELECT {_COLUMNS} FROM {TABLE} WHERE address = ? AND {_UNEXPIRED}"
_EXISTING_SQL = f"SELECT expires_at FROM {TABLE} WHERE address = ? AND scope = ?"
_UPSERT_SQL = (
    f"INSERT INTO {TABLE} ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (address, scope) DO UPDATE SET reason = excluded.reason, "
    "detail = excluded.detail, created_at = excluded.created_at, "
    "expires_at = excluded.expires_at")


# Consecutive soft bounces per address (relay.outbound.classify "soft"): the queue suppresses
# with reason soft-bounce-limit only after N of them spread over at least D days, and a
# delivery clears the count.
_SOFT_SCHEMA = (f"CREATE TABLE IF NOT EXISTS {SOFT_TABLE} (address TEXT PRIMARY KEY, "
                "count INTEGER NOT NULL, first_at REAL NOT NULL, last_at REAL NOT NULL)")
_SOFT_RECORD_SQL = (
    f"INSERT INTO {SOFT_TABLE} (address, count, first_at, last_at) VALUES (?, 1, ?, ?) "
    "ON CONFLICT (address) DO UPDATE SET count = count + 1, last_at = excluded.last_at "
    "RETURNING count, first_at")
_SOFT_GET_SQL = f"SELECT count, first_at, last_at FROM {SOFT_TABLE} WHERE address = ?"
SOFT_EMPTY_RECHECK = 2.0   # seconds an empty soft-bounce table is taken as still empty


def _row(entry: Suppression) -> tuple[str, str, str, str, float, float | None]:
    return (entry.address, entry.scope, str(entry.reason), entry.detail, entry.created_at,
            entry.expires_at)


_REASONS = {str(r): r for r in Reason}  # a dict look-up is ten times cheaper than Reason(x)


def _entry(row: tuple[str, str, str, str, float, float | None]) -> Suppression:
    address, scope, reason, detail, created_at, expires_at = row
    return Suppression(address, scope, _REASONS.get(reason) or Reason(reason), detail,
                       created_at, expires_at)


def _active(expires_at: float | None, now: float) -> bool:
    return expires_at is None or expires_at > now


def _first_in_scope_order(
        found: Iterable[Suppression], scopes: tuple[str, ...]) -> Suppression | None:
    """Of the entries found, the one whose scope comes first in `scopes`."""
    rank = {scope: i for i, scope in reversed(list(enumerate(scopes)))}
    return min(found, key=lambda e: rank[e.scope], default=None)


class SQLiteSuppressionStore:
    """Suppressions in one SQLite file, table `suppressions`, UNIQUE (address, scope).

    check() is one indexed SELECT on the reader connection (a few microseconds). Writes
    (add, add_many, remove, purge_expired) are each one transaction, fsync'd before they
    return. Safe to share between the event loop thread and worker threads.
    """

    def __init__(self, path: str | Path, *, clock: Callable[[], float] = time.time):
        self.path = Path(path) if str(path) != ":memory:" else None
        self._clock = clock
        self._soft_empty_until = 0.0       # monotonic; see soft_bounces()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = self._connect(path)
        self._write_lock = threading.Lock()
        self._create_schema()
        if self.path is None:  # one private database: both roles share the connection
            self._reader, self._read_lock = self._writer, self._write_lock
        else:
            self._reader, self._read_lock = self._connect(path), threading.Lock()

    @staticmethod
    def _connect(path: str | Path) -> sqlite3.Connection:
        # isolation_level=None: autocommit; writes open their transaction explicitly, and
        # a reader never holds a read snapshot between look-ups.
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               timeout=_BUSY_TIMEOUT_MS / 1000)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=FULL")  # a commit is on disk when add() returns
        return conn

    def _create_schema(self) -> None:
        db = sqlite_utils.Database(self._writer, execute_plugins=False)
        if self.path is not None:
            db.enable_wal()
        table = db.table(TABLE)
        table.create(
            {"address": str, "scope": str, "reason": str, "detail": str,
             "created_at": float, "expires_at": float},
            not_null={"address", "scope", "reason", "detail", "created_at"},
            defaults={"detail": ""}, if_not_exists=True)
        # check() is a look-up on this index; it is also the ON CONFLICT target of add().
        table.create_index(["address", "scope"], index_name="suppressions_address_scope",
                               unique=True, if_not_exists=True)
        # purge_expired() reads only the (few) entries that expire.
        self._writer.execute("CREATE INDEX IF NOT EXISTS suppressions_expires_at "
                             f"ON {TABLE} (expires_at) WHERE expires_at IS NOT NULL")
        self._writer.execute(_SOFT_SCHEMA)

    def check(self, address: str, scopes: tuple[str, ...] = (GLOBAL,),
              now: float | None = None) -> Suppression | None:
        """The unexpired entry for `address` in the first of `scopes` that has one."""
        if not scopes:
            return None
        when = self._clock() if now is None else now
        key = canonical(address)
        with self._read_lock:
            if len(scopes) == 1:
                rows = self._reader.execute(CHECK_ONE_SQL, (key, scopes[0], when)).fetchall()
            else:
                rows = self._reader.execute(CHECK_ANY_SQL, (key, when)).fetchall()
        found = [_entry(r) for r in rows if r[1] in scopes]
        if len(found) <= 1:
            return found[0] if found else None
        return _first_in_scope_order(found, scopes)

    def add(self, entry: Suppression) -> bool:
        """Insert or replace (address, scope). True if it did not suppress before (absent
        or expired). A `created_at` of 0 is stamped with the current time."""
        added, _ = self.add_many((entry,))
        return added == 1

    def add_many(self, entries: Iterable[Suppression]) -> tuple[int, int]:
        """add() each entry, in order, in one transaction: (added, replaced)."""
        now = self._clock()
        rows = [_row(_normalised(e, now)) for e in entries]
        added = 0
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                for row in rows:
                    old = self._writer.execute(_EXISTING_SQL, row[:2]).fetchone()
                    if old is None or not _active(old[0], now):
                        added += 1
                    self._writer.execute(_UPSERT_SQL, row)
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
        return added, len(rows) - added

    def remove(self, address: str, scope: str = GLOBAL) -> bool:
        """Delete the entry for (address, scope). True if there was one."""
        with self._write_lock:
            cur = self._writer.execute(
                f"DELETE FROM {TABLE} WHERE address = ? AND scope = ?",
                (canonical(address), scope))
        return cur.rowcount > 0

    def purge_expired(self, now: float | None = None) -> int:
        """Delete the entries that expired at or before `now`; how many were deleted."""
        when = self._clock() if now is None else now
        with self._write_lock:
            cur = self._writer.execute(
                f"DELETE FROM {TABLE} WHERE expires_at IS NOT NULL AND expires_at <= ?",
                (when,))
        return cur.rowcount

    def list(self, scope: str | None = None) -> list[Suppression]:
        """Every stored entry (expired ones too, until purged), by address then scope."""
        sql = f"SELECT {_COLUMNS} FROM {TABLE}"
        params: tuple[str, ...] = ()
        if scope is not None:
            sql += " WHERE scope = ?"
            params = (scope,)
        with self._read_lock:
            rows = self._reader.execute(sql + " ORDER BY address, scope", params).fetchall()
        return [_entry(r) for r in rows]

    def count(self) -> int:
        """How many entries are stored, expired ones included."""
        with self._read_lock:
            (n,) = self._reader.execute(f"SELECT count(*) FROM {TABLE}").fetchone()
        return int(n)

    def record_soft_bounce(self, address: str, now: float | None = None) -> tuple[int, float]:
        """Count one more consecutive soft bounce of `address` (at `now`, default the clock):
        (count so far, time of the first). One transaction, fsync'd before it returns."""
        when = self._clock() if now is None else now
        self._soft_empty_until = 0.0
        with self._write_lock:
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                # fetchall(): step the RETURNING statement to its end before COMMIT
                [(count, first_at)] = self._writer.execute(
                    _SOFT_RECORD_SQL, (canonical(address), when, when)).fetchall()
                self._writer.execute("COMMIT")
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
        return int(count), float(first_at)

    def clear_soft_bounces(self, address: str) -> bool:
        """Forget the soft bounces of `address` (it took a delivery). True if it had some."""
        with self._write_lock:
            cur = self._writer.execute(f"DELETE FROM {SOFT_TABLE} WHERE address = ?",
                                       (canonical(address),))
        return cur.rowcount > 0

    def soft_bounces(self, address: str) -> tuple[int, float, float] | None:
        """(count, first_at, last_at) of the consecutive soft bounces of `address`, if any.

        Asked after every delivery, and almost always of an empty table: while the table is
        empty the answer is None without a look-up, for up to SOFT_EMPTY_RECHECK seconds
        (a count recorded here ends that at once; one recorded by another process is seen
        within that time)."""
        now = time.monotonic()
        if now < self._soft_empty_until:
            return None
        with self._read_lock:
            if self._reader.execute(f"SELECT 1 FROM {SOFT_TABLE} LIMIT 1").fetchone() is None:
                self._soft_empty_until = now + SOFT_EMPTY_RECHECK
                return None
            row = self._reader.execute(_SOFT_GET_SQL, (canonical(address),)).fetchone()
        return None if row is None else (int(row[0]), float(row[1]), float(row[2]))

    def close(self) -> None:
        """Close both connections (the last close checkpoints the WAL into the file)."""
        with self._read_lock:
            if self._reader is not self._writer:
                self._reader.close()
        with self._write_lock:
            self._writer.close()


def _normalised(entry: Suppression, now: float) -> Suppression:
    address = canonical(entry.address)
    if address == entry.address and entry.created_at:
        return entry
    return replace(entry, address=address, created_at=entry.created_at or now)


class MemorySuppressionStore:
    """The in-memory twin of `SQLiteSuppressionStore`: a dict keyed by (address, scope).

    For tests of other stages, and for reading a store that does not exist yet.
    """

    def __init__(self, *, clock: Callable[[], float] = time.time):
        self._clock = clock
        self._entries: dict[tuple[str, str], Suppression] = {}
        self._soft: dict[str, tuple[int, float, float]] = {}  # address -> count, first, last

    def check(self, address: str, scopes: tuple[str, ...] = (GLOBAL,),
              now: float | None = None) -> Suppression | None:
        """The unexpired entry for `address` in the first of `scopes` that has one."""
        when = self._clock() if now is None else now
        key = canonical(address)
        for scope in scopes:
            entry = self._entries.get((key, scope))
            if entry is not None and _active(entry.expires_at, when):
                return entry
        return None

    def add(self, entry: Suppression) -> bool:
        """Insert or replace (address, scope). True if it did not suppress before (absent
        or expired). A `created_at` of 0 is stamped with the current time."""
        added, _ = self.add_many((entry,))
        return added == 1

    def add_many(self, entries: Iterable[Suppression]) -> tuple[int, int]:
        """add() each entry, in order: (added, replaced)."""
        now = self._clock()
        added = replaced = 0
        for e in entries:
            entry = _normalised(e, now)
            old = self._entries.get((entry.address, entry.scope))
            if old is None or not _active(old.expires_at, now):
                added += 1
            else:
                replaced += 1
            self._entries[(entry.address, entry.scope)] = entry
        return added, replaced

    def remove(self, address: str, scope: str = GLOBAL) -> bool:
        """Delete the entry for (address, scope). True if there was one."""
        return self._entries.pop((canonical(address), scope), None) is not None

    def purge_expired(self, now: float | None = None) -> int:
        """Delete the entries that expired at or before `now`; how many were deleted."""
        when = self._clock() if now is None else now
        gone = [k for k, e in self._entries.items() if not _active(e.expires_at, when)]
        for key in gone:
            del self._entries[key]
        return len(gone)

    def list(self, scope: str | None = None) -> list[Suppression]:
        """Every stored entry (expired ones too, until purged), by address then scope."""
        return [self._entries[k] for k in sorted(self._entries)
                if scope is None or k[1] == scope]

    def count(self) -> int:
        """How many entries are stored, expired ones included."""
        return len(self._entries)

    def record_soft_bounce(self, address: str, now: float | None = None) -> tuple[int, float]:
        """Count one more consecutive soft bounce of `address` (at `now`, default the clock):
        (count so far, time of the first)."""
        when = self._clock() if now is None else now
        key = canonical(address)
        count, first_at, _ = self._soft.get(key, (0, when, when))
        self._soft[key] = (count + 1, first_at, when)
        return count + 1, first_at

    def clear_soft_bounces(self, address: str) -> bool:
        """Forget the soft bounces of `address` (it took a delivery). True if it had some."""
        return self._soft.pop(canonical(address), None) is not None

    def soft_bounces(self, address: str) -> tuple[int, float, float] | None:
        """(count, first_at, last_at) of the consecutive soft bounces of `address`, if any."""
        return self._soft.get(canonical(address))

    def close(self) -> None:
        """Nothing to release."""
