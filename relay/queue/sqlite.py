"""The SQLite queue store: WAL, synchronous=FULL, one writer thread with group commit.

Every statement runs on one dedicated thread with one connection, so the event loop never
waits on disk. Work that arrives while a commit is being fsync'd is gathered and committed
together: one fsync for many messages under load (group commit), and each caller's future is
resolved only after the COMMIT that holds its work has returned. One failing piece of work
does not undo the others of its batch: the batch is then run again with each piece in its
own SAVEPOINT.
"""

from __future__ import annotations

import asyncio
import collections
import json
import queue as stdqueue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from relay.events import DELIVERY_EVENTS, Event, Outcome
from relay.queue import (
    Job,
    NewMessage,
    QueueEntry,
    Recipient,
    Settlement,
    State,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    queue_id    TEXT PRIMARY KEY,
    sender      TEXT NOT NULL,
    body        BLOB NOT NULL,
    size        INTEGER NOT NULL,
    smtputf8    INTEGER NOT NULL,
    eightbit    INTEGER NOT NULL,
    client      TEXT NOT NULL,
    app         TEXT,
    stream      TEXT NOT NULL,
    meta        TEXT NOT NULL,
    received_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS recipients (
    id           INTEGER PRIMARY KEY,
    queue_id     TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    address      TEXT NOT NULL,
    state        TEXT NOT NULL,
    attempts     INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL,
    last_reply   TEXT,
    updated_at   REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS recipients_due ON recipients(next_attempt) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS recipients_message ON recipients(queue_id);
CREATE INDEX IF NOT EXISTS recipients_active ON recipients(state) WHERE state = 'active';
CREATE INDEX IF NOT EXISTS recipients_held ON recipients(state) WHERE state = 'held';
CREATE TABLE IF NOT EXISTS events (
    id        INTEGER PRIMARY KEY,
    ts        REAL NOT NULL,
    queue_id  TEXT NOT NULL,
    recipient TEXT NOT NULL,
    event     TEXT NOT NULL,
    reply     TEXT,
    category  TEXT NOT NULL DEFAULT '',
    campaign  TEXT NOT NULL DEFAULT '',
    app       TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE TABLE IF NOT EXISTS webhook_cursor (
    app     TEXT PRIMARY KEY,
    last_id INTEGER NOT NULL
);
"""

# Columns added to `events` after its first release: a database made by an older relay gets
# them (ALTER TABLE ADD COLUMN) before the indexes that use them are made.
EVENT_COLUMNS = ("category", "campaign", "app")

INDEXES = """
CREATE INDEX IF NOT EXISTS events_stats ON events(app, campaign, event, category, ts);
CREATE INDEX IF NOT EXISTS events_app ON events(app, id);
"""

_STOP = object()


class _Writer(threading.Thread):
    """The one thread that owns the connection. Batches work into transactions.

    Two kinds of work: urgent (a new message, whose 250 waits for the commit) and the rest
    (claims, outcomes, admin commands). Urgent work goes first and joins the batch being
    run even when it arrives in the middle of it; the rest runs for `lazy_budget` seconds a
    batch, or as long as that batch's urgent work took if longer (at least `min_lazy`
    pieces), and what is left waits for the next batch. So a burst of outcomes (150 settles
    of 50 KB messages took 50 ms in one batch) does not hold a client's 250 for longer than
    the budget and one fsync, and a flood of new mail does not starve delivery.
    """

    def __init__(self, path: Path, max_batch: int = 512, window: float = 0.0,
                 lazy_budget: float = 0.004, min_lazy: int = 4):
        super().__init__(name=f"relay-db:{path.name}", daemon=True)
        self.path = path
        self.max_batch = max_batch
        self.window = window
        self.lazy_budget = lazy_budget
        self.min_lazy = min_lazy
        self.inbox: stdqueue.SimpleQueue[Any] = stdqueue.SimpleQueue()
        self.ready = threading.Event()
        self.open_error: BaseException | None = None
        self.clock: Callable[[], float] = time.monotonic
        self._urgent: collections.deque[Any] = collections.deque()
        self._lazy: collections.deque[Any] = collections.deque()
        self._stopping = False

    def run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=5000")
            conn.executescript(SCHEMA)
            _migrate(conn)
            conn.executescript(INDEXES)
        except BaseException as exc:  # noqa: BLE001 - reported to open()
            self.open_error = exc
            self.ready.set()
            return
        self.ready.set()
        try:
            self._loop(conn)
        finally:
            conn.close()

    def _take(self, item: Any) -> None:
        if item is _STOP:
            self._stopping = True
        elif item[3]:
            self._urgent.append(item)
        else:
            self._lazy.append(item)

    def _poll(self) -> None:
        """Take in everything already handed in, without waiting."""
        while True:
            try:
                item = self.inbox.get_nowait()
            except stdqueue.Empty:
                return
            self._take(item)

    def _loop(self, conn: sqlite3.Connection) -> None:
        while True:
            if not (self._urgent or self._lazy):
                if self._stopping:
                    return
                self._take(self.inbox.get())
                # With a window, what arrives within it shares this commit too (fewer
                # fsyncs, each reply later by up to the window).
                until = time.monotonic() + self.window
                while not self._stopping and len(self._urgent) + len(self._lazy) < self.max_batch:
                    wait = until - time.monotonic()
                    if wait <= 0:
                        break
                    try:
                        self._take(self.inbox.get(timeout=wait))
                    except stdqueue.Empty:
                        break
            self._poll()
            if self._urgent or self._lazy:
                self._run_batch(conn)

    def _run_batch(self, conn: sqlite3.Connection) -> None:
        """One transaction: the urgent work, then lazy work within the budget.

        Each piece runs without a SAVEPOINT of its own first: every statement hands the
        GIL back and forth with the event loop, and two more per piece made a new
        message's commit wait for the loop up to twice as often. If a piece fails, the
        transaction is rolled back and the same pieces run again each in its own
        SAVEPOINT, so that only the failing one fails (as it would have alone)."""
        taken: list[Any] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            self._take_for_batch(taken)
            _resolve([(item, None, exc) for item in taken])
            return
        results = self._take_for_batch(taken, conn)
        if results is None:   # a piece failed: again, each piece in its own SAVEPOINT
            try:
                conn.execute("ROLLBACK")
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                _resolve([(item, None, exc) for item in taken])
                return
            results = [_run_one(conn, item) for item in taken]
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            _resolve([(item, None, exc) for item in taken])
            return
        _resolve(results)

    def _take_for_batch(self, taken: list[Any], conn: sqlite3.Connection | None = None,
                        ) -> list[tuple[Any, Any, BaseException | None]] | None:
        """Take the batch's pieces into `taken` and, with `conn`, run each as it is taken:
        their results, or None as soon as one has raised (nothing more is taken then).

        Urgent pieces first: all of them, or half of `max_batch` when lazy ones wait. Lazy
        pieces: at least `min_lazy`, then as long as the lazy ones have run for less than
        `lazy_budget` or than the urgent ones of this batch took. Under a flood of new mail
        outcomes and claims still get half of the writer's time, so delivery keeps pace.
        Without `conn` (the transaction could not begin) the pieces are only taken."""
        urgent, lazy = self._urgent, self._lazy
        results: list[tuple[Any, Any, BaseException | None]] = []
        # With outcomes waiting, new mail may fill half of the batch, not all of it.
        urgent_cap = self.max_batch // 2 if lazy else self.max_batch
        n_urgent = n_lazy = 0
        urgent_s = lazy_s = 0.0
        while True:
            if urgent and n_urgent < urgent_cap:
                item, is_urgent = urgent.popleft(), True
            elif lazy and n_urgent + n_lazy < self.max_batch and (
                    conn is None or self._stopping or n_lazy < self.min_lazy
                    or lazy_s < max(self.lazy_budget, urgent_s)):
                item, is_urgent = lazy.popleft(), False
            else:
                break
            taken.append(item)
            if conn is None:
                n_urgent += is_urgent
                n_lazy += not is_urgent
                continue
            started = self.clock()
            try:
                results.append((item, item[0](conn), None))
            except BaseException:  # noqa: BLE001 - the batch is run again, piece by piece
                return None
            spent = self.clock() - started
            if is_urgent:
                n_urgent += 1
                urgent_s += spent
            else:
                n_lazy += 1
                lazy_s += spent
            if not urgent:
                self._poll()   # a new message that came meanwhile joins this commit
        return results


def _run_one(conn: sqlite3.Connection, item: Any) -> tuple[Any, Any, BaseException | None]:
    """One piece of work in its own SAVEPOINT: a failing piece undoes only itself."""
    try:
        conn.execute("SAVEPOINT work")
        value = item[0](conn)
        conn.execute("RELEASE work")
        return item, value, None
    except BaseException as exc:  # noqa: BLE001 - handed to the caller
        try:
            conn.execute("ROLLBACK TO work")
            conn.execute("RELEASE work")
        except sqlite3.Error:
            pass
        return item, None, exc


def _resolve(results: list[tuple[Any, Any, BaseException | None]]) -> None:
    """Hand each piece's result to its future: one wake-up of each event loop per batch
    (each call_soon_threadsafe writes to the loop's self-pipe, and waits for the GIL)."""
    by_loop: dict[Any, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
    for (_fn, fut, loop, _urgent), value, err in results:
        by_loop.setdefault(loop, []).append((fut, value, err))
    for loop, items in by_loop.items():
        try:
            loop.call_soon_threadsafe(_set_results, items)
        except RuntimeError:
            pass   # the loop is closed: nobody waits for these any more


def _set_results(items: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for fut, value, err in items:
        if fut.done():
            continue
        if err is None:
            fut.set_result(value)
            continue
        try:
            fut.set_exception(err)
        except (TypeError, ValueError):
            # An exception a future cannot carry (StopIteration): the caller still gets an
            # answer, and the other futures of the batch theirs.
            fut.set_exception(RuntimeError(f"queue store work raised {err!r}"))


class SQLiteQueueStore:
    """A `QueueStore` in one SQLite file (see module docstring)."""

    def __init__(self, path: str | Path, *, group_commit_window: float = 0.0):
        self.path = Path(path)
        self.group_commit_window = group_commit_window
        self._writer: _Writer | None = None
        # Reads that may take long on a big queue (the gauges' counts) use their own
        # connection on a worker thread: WAL readers never hold up the writer's commits.
        self._reader: sqlite3.Connection | None = None
        self._reader_lock = threading.Lock()

    # -- plumbing --

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        writer = _Writer(self.path, window=self.group_commit_window)
        writer.start()
        await asyncio.to_thread(writer.ready.wait)
        if writer.open_error is not None:
            raise writer.open_error
        self._writer = writer

    async def close(self) -> None:
        writer, self._writer = self._writer, None
        if writer is None:
            return
        writer.inbox.put(_STOP)
        await asyncio.to_thread(writer.join)
        with self._reader_lock:
            reader, self._reader = self._reader, None
            if reader is not None:
                reader.close()

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read-only `fn` on the reader connection, off the loop and off the writer."""
        if self._writer is None:
            raise RuntimeError("queue store is not open")

        def work() -> T:
            with self._reader_lock:
                if self._reader is None:
                    conn = sqlite3.connect(self.path, isolation_level=None,
                                           check_same_thread=False)
                    conn.execute("PRAGMA query_only=ON")
                    conn.execute("PRAGMA busy_timeout=5000")
                    self._reader = conn
                return fn(self._reader)

        return await asyncio.to_thread(work)

    def _submit(self, fn: Callable[[sqlite3.Connection], T], *,
                urgent: bool = False) -> asyncio.Future[T]:
        if self._writer is None:
            raise RuntimeError("queue store is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._writer.inbox.put((fn, fut, loop, urgent))
        return fut

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return await self._submit(fn)

    # -- the QueueStore interface --

    async def enqueue(self, msg: NewMessage) -> None:
        # Urgent: a client is waiting for the 250 that this commit allows (invariant 1).
        await self._submit(lambda conn: _insert(conn, msg), urgent=True)

    async def recover(self) -> int:
        def work(conn: sqlite3.Connection) -> int:
            cur = conn.execute("UPDATE recipients SET state='queued' WHERE state='active'")
            return cur.rowcount

        return await self._run(work)

    async def claim(self, now: float, max_jobs: int, max_rcpts: int = 100) -> list[Job]:
        def work(conn: sqlite3.Connection) -> list[Job]:
            # Walk the due index in order and take the first max_jobs distinct messages.
            # No LIMIT on rows: one message's many due recipients must not hide the others.
            qids: list[str] = []
            cur = conn.execute(
                "SELECT queue_id FROM recipients WHERE state='queued' AND next_attempt <= ?"
                " ORDER BY next_attempt, id", (now,))
            try:
                for (qid,) in cur:
                    if qid not in qids:
                        qids.append(qid)
                        if len(qids) == max_jobs:
                            break
            finally:
                cur.close()
            jobs = []
            for qid in qids:
                rcpts = [Recipient(rid, addr, attempts, State.ACTIVE, nxt, last)
                         for rid, addr, attempts, nxt, last in conn.execute(
                             "SELECT id, address, attempts, next_attempt, last_reply"
                             " FROM recipients WHERE queue_id=? AND state='queued'"
                             " AND next_attempt <= ? ORDER BY id LIMIT ?",
                             (qid, now, max_rcpts))]
                conn.executemany("UPDATE recipients SET state='active', updated_at=? WHERE id=?",
                                 [(now, r.id) for r in rcpts])
                sender, body, received_at, smtputf8, eightbit, app, stream, meta = conn.execute(
                    "SELECT sender, body, received_at, smtputf8, eightbit, app, stream, meta"
                    " FROM messages WHERE queue_id=?", (qid,)).fetchone()
                jobs.append(Job(qid, sender, body, received_at, bool(smtputf8), bool(eightbit),
                                rcpts, app, stream, json.loads(meta)))
            return jobs

        return await self._run(work)

    async def next_due(self) -> float | None:
        def work(conn: sqlite3.Connection) -> float | None:
            row = conn.execute(
                "SELECT MIN(next_attempt) FROM recipients WHERE state='queued'").fetchone()
            return row[0]

        return await self._run(work)

    async def settle(self, queue_id: str, settlements: list[Settlement],
                     events: Sequence[Outcome | tuple[str, str, str]] | None = None,
                     notify: NewMessage | None = None, *, app: str | None = None,
                     campaign: str | None = None) -> bool:
        now = time.time()
        rows = [Outcome(*e) for e in events or ()]

        def work(conn: sqlite3.Connection) -> bool:
            conn.executemany(
                "UPDATE recipients SET state=?, next_attempt=?, last_reply=COALESCE(?, last_reply),"
                " attempts=attempts+?, updated_at=? WHERE id=?",
                [(s.state.value, s.next_attempt, s.reply, 1 if s.counts else 0, now,
                  s.recipient_id) for s in settlements])
            if rows:
                conn.executemany(
                    "INSERT INTO events (ts, queue_id, recipient, event, reply, category,"
                    " campaign, app) VALUES (?,?,?,?,?,?,?,?)",
                    [(now, queue_id, o.recipient, o.event, o.reply, str(o.category),
                      campaign or "", app or "") for o in rows])
            if notify is not None:   # the bounce notice commits with the bounce, or neither
                _insert(conn, notify)
            return _drop_if_done(conn, queue_id)

        return await self._run(work)

    async def list(self) -> list[QueueEntry]:
        def work(conn: sqlite3.Connection) -> list[QueueEntry]:
            out: list[QueueEntry] = []
            for qid, sender, size, received_at, client in conn.execute(
                    "SELECT queue_id, sender, size, received_at, client FROM messages"
                    " ORDER BY received_at").fetchall():
                out.append(QueueEntry(qid, sender, size, received_at,
                                      _recipients(conn, qid), client))
            return out

        return await self._run(work)

    async def get(self, queue_id: str) -> QueueEntry | None:
        def work(conn: sqlite3.Connection) -> QueueEntry | None:
            row = conn.execute(
                "SELECT sender, size, received_at, client, body FROM messages WHERE queue_id=?",
                (queue_id,)).fetchone()
            if row is None:
                return None
            sender, size, received_at, client, body = row
            headers = body.split(b"\r\n\r\n", 1)[0]
            return QueueEntry(queue_id, sender, size, received_at, _recipients(conn, queue_id),
                              client, headers)

        return await self._run(work)

    async def delete(self, queue_id: str) -> bool:
        now = time.time()

        def work(conn: sqlite3.Connection) -> bool:
            rows = conn.execute(
                "SELECT address FROM recipients WHERE queue_id=? AND state IN"
                " ('queued','active')", (queue_id,)).fetchall()
            exists = conn.execute("SELECT app, meta FROM messages WHERE queue_id=?",
                                  (queue_id,)).fetchone()
            if not exists:
                return False
            app, campaign = exists[0] or "", json.loads(exists[1]).get("campaign") or ""
            conn.execute("UPDATE recipients SET state='deleted', updated_at=? WHERE queue_id=?"
                         " AND state IN ('queued','active','held')", (now, queue_id))
            conn.executemany(
                "INSERT INTO events (ts, queue_id, recipient, event, reply, campaign, app)"
                " VALUES (?,?,?,?,?,?,?)",
                [(now, queue_id, r[0], "deleted", "deleted by admin", campaign, app)
                 for r in rows])
            _drop_if_done(conn, queue_id)
            return True

        return await self._run(work)

    async def flush(self, now: float) -> int:
        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("UPDATE recipients SET next_attempt=? WHERE state='queued'",
                                (now,)).rowcount

        return await self._run(work)

    async def hold(self, queue_id: str, held: bool) -> int:
        old, new = ("queued", "held") if held else ("held", "queued")

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("UPDATE recipients SET state=?, next_attempt=MIN(next_attempt,?)"
                                " WHERE queue_id=? AND state=?",
                                (new, time.time(), queue_id, old)).rowcount

        return await self._run(work)

    async def counts(self) -> dict[str, int]:
        """Recipients by state. Each count walks its own partial index (a scan of the whole
        table took 270 ms at a million queued, every 5 s, and held up every commit while the
        writer thread ran it); on the reader connection, so commits go on meanwhile."""
        def work(conn: sqlite3.Connection) -> dict[str, int]:
            counts = {}
            for state in ("queued", "active", "held"):
                # A literal, not a parameter: only then may the planner use the partial index.
                n = conn.execute(f"SELECT COUNT(*) FROM recipients WHERE state = '{state}'"
                                 ).fetchone()[0]
                if n:
                    counts[state] = n
            return counts

        return await self._read(work)

    async def events(self, queue_id: str | None = None) -> list[tuple[str, str, str, str]]:
        """(queue_id, recipient, event, reply) rows, oldest first."""

        def work(conn: sqlite3.Connection) -> list[tuple[str, str, str, str]]:
            if queue_id is None:
                return conn.execute("SELECT queue_id, recipient, event, reply FROM events"
                                    " ORDER BY id").fetchall()
            return conn.execute("SELECT queue_id, recipient, event, reply FROM events"
                                " WHERE queue_id=? ORDER BY id", (queue_id,)).fetchall()

        return await self._run(work)

    # -- the event log (relay.events.EventStore) --

    async def record_events(self, rows: Sequence[Event]) -> list[int]:
        rows = list(rows)

        def work(conn: sqlite3.Connection) -> list[int]:
            ids = []
            for row in rows:
                app, campaign = row.app, row.campaign
                if row.queue_id and not (app and campaign):
                    app, campaign = _context(conn, row, app, campaign)
                cur = conn.execute(
                    "INSERT INTO events (ts, queue_id, recipient, event, reply, category,"
                    " campaign, app) VALUES (?,?,?,?,?,?,?,?)",
                    (row.ts, row.queue_id, row.recipient, str(row.event), row.reply,
                     str(row.category), campaign, app))
                ids.append(int(cur.lastrowid or 0))
            return ids

        return await self._run(work)

    async def event_rows(self, since_id: int = 0, limit: int = 1000,
                         app: str | None = None) -> list[Event]:
        def work(conn: sqlite3.Connection) -> list[Event]:
            cols = ("SELECT id, ts, queue_id, recipient, event, category, COALESCE(reply, ''),"
                    " campaign, app FROM events WHERE id > ?")
            if app is None:
                cur = conn.execute(cols + " ORDER BY id LIMIT ?", (since_id, limit))
            else:
                cur = conn.execute(cols + " AND app = ? ORDER BY id LIMIT ?",
                                   (since_id, app, limit))
            return [Event(id=i, ts=ts, queue_id=q, recipient=r, event=e, category=c, reply=rp,
                          campaign=cp, app=a) for i, ts, q, r, e, c, rp, cp, a in cur]

        return await self._run(work)

    async def webhook_cursor(self, app: str) -> int:
        def work(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT last_id FROM webhook_cursor WHERE app=?",
                               (app,)).fetchone()
            return int(row[0]) if row else 0

        return await self._run(work)

    async def set_webhook_cursor(self, app: str, last_id: int) -> None:
        def work(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO webhook_cursor (app, last_id) VALUES (?, ?)"
                         " ON CONFLICT(app) DO UPDATE SET last_id=excluded.last_id",
                         (app, last_id))

        await self._run(work)


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a database of an older schema up to this one. In one write transaction, so
    that two processes opening the same old file (the relay and a `relay queue` command)
    do not both add a column."""

    def missing() -> list[str]:
        have = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        return [name for name in EVENT_COLUMNS if name not in have]

    if not missing():            # the usual case: no write lock taken at every open
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        for name in missing():
            conn.execute(f"ALTER TABLE events ADD COLUMN {name} TEXT NOT NULL DEFAULT ''")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def _context(conn: sqlite3.Connection, row: Event, app: str, campaign: str,
             ) -> tuple[str, str]:
    """App and campaign of a report's message: from the message if it is still queued, else
    from the events its delivery wrote (the store wrote those from the message itself, unlike
    recorded ones). Only empty fields are filled."""
    found = conn.execute("SELECT app, meta FROM messages WHERE queue_id=?",
                         (row.queue_id,)).fetchone()
    if found is not None:
        found = (found[0] or "", json.loads(found[1]).get("campaign") or "")
    else:
        found = conn.execute(
            "SELECT app, campaign FROM events WHERE queue_id=? AND event IN"
            f" ({','.join('?' * len(DELIVERY_EVENTS))}) ORDER BY id LIMIT 1",
            (row.queue_id, *DELIVERY_EVENTS)).fetchone()
    if found is None:
        return app, campaign
    return app or found[0], campaign or found[1]


def _insert(conn: sqlite3.Connection, msg: NewMessage) -> None:
    conn.execute(
        "INSERT INTO messages (queue_id, sender, body, size, smtputf8, eightbit, client,"
        " app, stream, meta, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
        (msg.queue_id, msg.sender, msg.body, len(msg.body), int(msg.smtputf8),
         int(msg.eightbit), msg.client, msg.app, msg.stream, json.dumps(msg.meta),
         msg.received_at),
    )
    conn.executemany(
        "INSERT INTO recipients (queue_id, address, state, next_attempt, updated_at)"
        " VALUES (?,?,'queued',?,?)",
        [(msg.queue_id, r, msg.received_at, msg.received_at) for r in msg.recipients],
    )


def _recipients(conn: sqlite3.Connection, queue_id: str) -> list[Recipient]:
    return [Recipient(rid, addr, attempts, State(state), next_attempt, last_reply)
            for rid, addr, attempts, state, next_attempt, last_reply in conn.execute(
                "SELECT id, address, attempts, state, next_attempt, last_reply FROM recipients"
                " WHERE queue_id=? ORDER BY id", (queue_id,))]


def _drop_if_done(conn: sqlite3.Connection, queue_id: str) -> bool:
    """Remove a message whose every recipient is terminal (Postfix's "removed")."""
    left = conn.execute("SELECT 1 FROM recipients WHERE queue_id=? AND state IN"
                        " ('queued','active') LIMIT 1", (queue_id,)).fetchone()
    if left:
        return False
    conn.execute("DELETE FROM messages WHERE queue_id=?", (queue_id,))
    return True
