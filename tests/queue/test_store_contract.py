"""The QueueStore contract: one set of tests that both stores pass (STYLE rule 1).

`SQLiteQueueStore` runs on a real SQLite file in the test's temporary folder; the
`MemoryQueueStore` twin must behave the same, except for durability, which the SQLite-only
tests at the end check (reopen, WAL + synchronous=FULL, group commit, integrity).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from relay.events import Event, Outcome, record
from relay.queue import NewMessage, QueueStore, Settlement, State
from relay.queue.memory import MemoryQueueStore
from relay.queue.sqlite import SQLiteQueueStore

T0 = 1_700_000_000.0
BODY = (b"Received: from app1 by relay.test\r\nFrom: a@example.com\r\nSubject: t\r\n\r\n"
        b"caf\xc3\xa9\r\n.leading dot stays as is\r\n")
DUPLICATE_ERRORS = (ValueError, sqlite3.IntegrityError)


def message(queue_id: str, recipients: list[str] | None = None, *, at: float = T0,
            **kw: object) -> NewMessage:
    return NewMessage(queue_id=queue_id, sender=str(kw.pop("sender", "app@example.com")),
                      recipients=recipients or ["r@example.net"], body=BODY, received_at=at,
                      **kw)  # type: ignore[arg-type]


@pytest_asyncio.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[QueueStore]:
    s: QueueStore = (SQLiteQueueStore(tmp_path / "q.db") if request.param == "sqlite"
                     else MemoryQueueStore())
    await s.open()
    yield s
    await s.close()


async def events_of(store: QueueStore, queue_id: str) -> list[tuple[str, str, str, str]]:
    assert isinstance(store, (SQLiteQueueStore, MemoryQueueStore))
    return [tuple(e) for e in await store.events(queue_id)]  # type: ignore[misc]


# --- enqueue and claim ---------------------------------------------------------------------

async def test_enqueue_then_claim_returns_the_job_intact(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"], sender="",
                                smtputf8=True, eightbit=True, app="shop", stream="marketing",
                                meta={"feedback_id": "x:y"}, client="app1[10.0.0.5]"))
    jobs = await store.claim(T0, max_jobs=10)
    assert len(jobs) == 1
    job = jobs[0]
    assert (job.queue_id, job.sender, job.body, job.received_at) == ("Q1", "", BODY, T0)
    assert (job.smtputf8, job.eightbit, job.app, job.stream) == (True, True, "shop", "marketing")
    assert job.meta == {"feedback_id": "x:y"}
    assert [r.address for r in job.recipients] == ["a@example.net", "b@example.net"]
    assert all(r.state is State.ACTIVE and r.attempts == 0 for r in job.recipients)
    assert len({r.id for r in job.recipients}) == 2


async def test_defaults_survive_the_round_trip(store: QueueStore) -> None:
    await store.enqueue(message("Q1"))
    (job,) = await store.claim(T0, 1)
    assert (job.smtputf8, job.eightbit, job.app, job.stream, job.meta) == (
        False, False, None, "transactional", {})


async def test_duplicate_queue_id_is_refused(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net"]))
    with pytest.raises(DUPLICATE_ERRORS):
        await store.enqueue(message("Q1", ["b@example.net"]))
    (entry,) = await store.list()
    assert [r.address for r in entry.recipients] == ["a@example.net"]


async def test_claim_leases(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"]))
    assert len(await store.claim(T0, 10)) == 1
    assert await store.claim(T0, 10) == []
    assert await store.claim(T0 + 86400, 10) == []
    assert await store.counts() == {"active": 2}


async def test_claim_respects_next_attempt(store: QueueStore) -> None:
    await store.enqueue(message("LATER", at=T0 + 60))
    assert await store.claim(T0, 10) == []
    assert await store.claim(T0 + 59.9, 10) == []
    (job,) = await store.claim(T0 + 60, 10)
    assert job.queue_id == "LATER"


async def test_claim_takes_earliest_due_first_and_at_most_max_jobs(store: QueueStore) -> None:
    for i in (3, 1, 4, 2, 0):
        await store.enqueue(message(f"Q{i}", at=T0 + i))
    first = await store.claim(T0 + 10, max_jobs=2)
    assert [j.queue_id for j in first] == ["Q0", "Q1"]
    rest = await store.claim(T0 + 10, max_jobs=10)
    assert [j.queue_id for j in rest] == ["Q2", "Q3", "Q4"]


async def test_large_message_is_split_into_jobs_of_max_rcpts(store: QueueStore) -> None:
    rcpts = [f"r{i:03}@example.net" for i in range(250)]
    await store.enqueue(message("BIG", rcpts))
    sizes, seen = [], []
    for _ in range(3):
        (job,) = await store.claim(T0, max_jobs=1, max_rcpts=100)
        assert job.queue_id == "BIG"
        sizes.append(len(job.recipients))
        seen += [r.address for r in job.recipients]
    assert sizes == [100, 100, 50]
    assert seen == rcpts
    assert await store.claim(T0, 10, 100) == []


async def test_a_big_message_does_not_hide_other_due_messages(store: QueueStore) -> None:
    """max_jobs counts messages: 250 due recipients of one message must not use it up."""
    await store.enqueue(message("BIG", [f"r{i}@example.net" for i in range(250)], at=T0))
    await store.enqueue(message("SMALL", at=T0 + 1))
    jobs = await store.claim(T0 + 5, max_jobs=2, max_rcpts=100)
    assert [(j.queue_id, len(j.recipients)) for j in jobs] == [("BIG", 100), ("SMALL", 1)]


# --- settle ---------------------------------------------------------------------------------

@pytest.mark.parametrize("state", [State.DELIVERED, State.BOUNCED, State.EXPIRED])
async def test_terminal_settlement_removes_the_message(store: QueueStore, state: State) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"]))
    (job,) = await store.claim(T0, 1)
    a, b = job.recipients
    removed = await store.settle("Q1", [Settlement(a.id, state, T0, "250 2.0.0 ok")],
                                 [(a.address, state.value, "250 2.0.0 ok")])
    assert removed is False
    entry = await store.get("Q1")
    assert entry is not None
    assert {r.address: r.state for r in entry.recipients} == {
        "a@example.net": state, "b@example.net": State.ACTIVE}
    removed = await store.settle("Q1", [Settlement(b.id, state, T0, "550 5.1.1 no")],
                                 [(b.address, state.value, "550 5.1.1 no")])
    assert removed is True
    assert await store.get("Q1") is None
    assert await store.list() == []
    assert await store.counts() == {}
    assert await events_of(store, "Q1") == [
        ("Q1", "a@example.net", state.value, "250 2.0.0 ok"),
        ("Q1", "b@example.net", state.value, "550 5.1.1 no")]


@pytest.mark.parametrize(("counts", "attempts"), [(True, 1), (False, 0)])
async def test_deferral_requeues_for_later(store: QueueStore, counts: bool,
                                           attempts: int) -> None:
    await store.enqueue(message("Q1"))
    (job,) = await store.claim(T0, 1)
    rid = job.recipients[0].id
    removed = await store.settle(
        "Q1", [Settlement(rid, State.QUEUED, T0 + 300, "451 4.3.0 later", counts=counts)],
        [("r@example.net", "deferred", "451 4.3.0 later")])
    assert removed is False
    entry = await store.get("Q1")
    assert entry is not None
    (r,) = entry.recipients
    assert (r.state, r.attempts, r.next_attempt, r.last_reply) == (
        State.QUEUED, attempts, T0 + 300, "451 4.3.0 later")
    assert await store.next_due() == T0 + 300
    assert await store.claim(T0 + 299, 1) == []
    (again,) = await store.claim(T0 + 300, 1)
    assert again.recipients[0].attempts == attempts
    assert again.recipients[0].last_reply == "451 4.3.0 later"
    assert await events_of(store, "Q1") == [("Q1", "r@example.net", "deferred",
                                             "451 4.3.0 later")]


async def test_settle_without_reply_keeps_the_last_one(store: QueueStore) -> None:
    await store.enqueue(message("Q1"))
    (job,) = await store.claim(T0, 1)
    rid = job.recipients[0].id
    await store.settle("Q1", [Settlement(rid, State.QUEUED, T0, "451 4.4.1 refused")])
    await store.claim(T0, 1)
    await store.settle("Q1", [Settlement(rid, State.QUEUED, T0, None, counts=False)])
    entry = await store.get("Q1")
    assert entry is not None
    assert (entry.recipients[0].last_reply, entry.recipients[0].attempts) == (
        "451 4.4.1 refused", 1)


async def test_settle_after_admin_delete_is_harmless(store: QueueStore) -> None:
    """A delivery in flight may finish after `relay queue delete` removed its message."""
    await store.enqueue(message("Q1"))
    (job,) = await store.claim(T0, 1)
    assert await store.delete("Q1") is True
    removed = await store.settle("Q1", [Settlement(job.recipients[0].id, State.DELIVERED, T0,
                                                   "250 ok")])
    assert removed is True
    assert await store.get("Q1") is None


# --- recover, next_due, flush, counts ---------------------------------------------------------

async def test_recover_returns_leases_to_the_queue(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"]))
    await store.enqueue(message("Q2", at=T0 + 1000))
    await store.claim(T0, 10)
    assert await store.counts() == {"active": 2, "queued": 1}
    assert await store.recover() == 2
    assert await store.counts() == {"queued": 3}
    assert await store.recover() == 0
    (job,) = await store.claim(T0, 10)
    assert job.queue_id == "Q1"
    assert len(job.recipients) == 2


async def test_next_due(store: QueueStore) -> None:
    assert await store.next_due() is None
    await store.enqueue(message("Q1", at=T0 + 50))
    await store.enqueue(message("Q2", at=T0 + 20))
    assert await store.next_due() == T0 + 20
    await store.claim(T0 + 20, 10)
    assert await store.next_due() == T0 + 50   # active recipients are not due
    await store.claim(T0 + 50, 10)
    assert await store.next_due() is None


async def test_flush_makes_queued_recipients_due(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"], at=T0 + 3600))
    await store.enqueue(message("Q2", at=T0))
    (active,) = await store.claim(T0, 10)
    assert active.queue_id == "Q2"
    assert await store.flush(T0 + 1) == 2   # the active one is not touched
    assert await store.next_due() == T0 + 1
    (job,) = await store.claim(T0 + 1, 10)
    assert job.queue_id == "Q1"


async def test_counts_are_per_non_terminal_state(store: QueueStore) -> None:
    assert await store.counts() == {}
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net", "c@example.net"]))
    await store.enqueue(message("Q2", at=T0 + 100))
    (job,) = await store.claim(T0, 1, max_rcpts=2)
    assert await store.counts() == {"active": 2, "queued": 2}
    await store.settle("Q1", [Settlement(job.recipients[0].id, State.DELIVERED, T0, "250 ok")])
    assert await store.counts() == {"active": 1, "queued": 2}


# --- list, get, delete -----------------------------------------------------------------------

async def test_list_and_get(store: QueueStore) -> None:
    await store.enqueue(message("Q2", ["b@example.net"], at=T0 + 1, client="app2[10.0.0.6]"))
    await store.enqueue(message("Q1", ["a@example.net", "c@example.net"], at=T0,
                                client="app1[10.0.0.5]"))
    entries = await store.list()
    assert [e.queue_id for e in entries] == ["Q1", "Q2"]
    q1 = entries[0]
    assert (q1.sender, q1.size, q1.received_at, q1.client) == (
        "app@example.com", len(BODY), T0, "app1[10.0.0.5]")
    assert [(r.address, r.state, r.attempts) for r in q1.recipients] == [
        ("a@example.net", State.QUEUED, 0), ("c@example.net", State.QUEUED, 0)]
    got = await store.get("Q1")
    assert got is not None
    assert got.headers == BODY.split(b"\r\n\r\n", 1)[0]
    assert [r.address for r in got.recipients] == ["a@example.net", "c@example.net"]
    assert await store.get("NOPE") is None


async def test_delete(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net", "c@example.net"]))
    await store.enqueue(message("Q2"))
    (job,) = await store.claim(T0, 1, max_rcpts=2)      # a, b active; c queued
    a = job.recipients[0]
    await store.settle("Q1", [Settlement(a.id, State.DELIVERED, T0, "250 ok")],
                       [(a.address, "delivered", "250 ok")])
    assert await store.delete("Q1") is True
    assert await store.get("Q1") is None
    assert [e.queue_id for e in await store.list()] == ["Q2"]
    assert await events_of(store, "Q1") == [
        ("Q1", "a@example.net", "delivered", "250 ok"),
        ("Q1", "b@example.net", "deleted", "deleted by admin"),
        ("Q1", "c@example.net", "deleted", "deleted by admin")]
    assert await store.delete("Q1") is False
    assert await store.delete("NOPE") is False
    assert await store.claim(T0, 10) != []   # Q2 is untouched
    assert await store.counts() == {"active": 1}


# --- the event log ---------------------------------------------------------------------------

async def test_settle_events_carry_category_app_and_campaign(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"], app="shop",
                                meta={"campaign": "spring"}))
    (job,) = await store.claim(T0, 1)
    a, b = job.recipients
    await store.settle("Q1", [Settlement(a.id, State.DELIVERED, T0, "250 2.0.0 ok"),
                              Settlement(b.id, State.BOUNCED, T0, "550 5.1.1 unknown")],
                       [Outcome(a.address, "delivered", "250 2.0.0 ok", "delivered"),
                        Outcome(b.address, "bounced", "550 5.1.1 unknown", "hard")],
                       app=job.app, campaign=job.meta.get("campaign"))
    rows = await store.event_rows()
    assert [(e.queue_id, e.recipient, e.event, e.category, e.reply, e.campaign, e.app)
            for e in rows] == [
        ("Q1", "a@example.net", "delivered", "delivered", "250 2.0.0 ok", "spring", "shop"),
        ("Q1", "b@example.net", "bounced", "hard", "550 5.1.1 unknown", "spring", "shop")]
    assert rows[0].id < rows[1].id
    assert all(abs(e.ts - time.time()) < 60 for e in rows)
    # the short form that many tests read is unchanged
    assert await events_of(store, "Q1") == [
        ("Q1", "a@example.net", "delivered", "250 2.0.0 ok"),
        ("Q1", "b@example.net", "bounced", "550 5.1.1 unknown")]


async def test_settle_accepts_plain_three_tuples(store: QueueStore) -> None:
    await store.enqueue(message("Q1"))
    (job,) = await store.claim(T0, 1)
    await store.settle("Q1", [Settlement(job.recipients[0].id, State.QUEUED, T0 + 60,
                                         "451 4.3.0 later")],
                       [("r@example.net", "deferred", "451 4.3.0 later")])
    (row,) = await store.event_rows()
    assert (row.event, row.category, row.app, row.campaign) == ("deferred", "", "", "")


async def test_deleted_events_carry_the_message_app_and_campaign(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net"], app="shop",
                                meta={"campaign": "spring"}))
    await store.delete("Q1")
    (row,) = await store.event_rows()
    assert (row.recipient, row.event, row.reply, row.category, row.campaign, row.app) == (
        "a@example.net", "deleted", "deleted by admin", "", "spring", "shop")


async def test_record_events(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net", "b@example.net"], app="shop",
                                meta={"campaign": "spring"}))
    (job,) = await store.claim(T0, 1)
    await store.settle("Q1", [Settlement(r.id, State.DELIVERED, T0, "250 ok")
                              for r in job.recipients],
                       [Outcome(r.address, "delivered", "250 ok", "delivered")
                        for r in job.recipients], app="shop", campaign="spring")
    assert await store.get("Q1") is None      # the message is gone; its events remain
    ids = await store.record_events([
        # a complaint about a delivered message: app and campaign come from its events
        Event(ts=T0 + 10, queue_id="Q1", recipient="b@example.net", event="complaint",
              reply="abuse report"),
        # given values are kept
        Event(ts=T0 + 11, queue_id="Q1", recipient="a@example.net", event="unsubscribe",
              app="other", campaign="autumn"),
        # nothing to inherit from
        Event(ts=T0 + 12, queue_id="", recipient="c@example.net", event="unsubscribe"),
        Event(ts=T0 + 13, queue_id="NOPE", recipient="d@example.net", event="complaint",
              category="abuse"),
    ])
    assert len(ids) == 4 and ids == sorted(ids) and len(set(ids)) == 4
    rows = await store.event_rows(since_id=ids[0] - 1)
    assert [(e.id, e.ts, e.queue_id, e.recipient, e.event, e.category, e.reply, e.campaign,
             e.app) for e in rows] == [
        (ids[0], T0 + 10, "Q1", "b@example.net", "complaint", "", "abuse report", "spring",
         "shop"),
        (ids[1], T0 + 11, "Q1", "a@example.net", "unsubscribe", "", "", "autumn", "other"),
        (ids[2], T0 + 12, "", "c@example.net", "unsubscribe", "", "", "", ""),
        (ids[3], T0 + 13, "NOPE", "d@example.net", "complaint", "abuse", "", "", "")]
    new_id = await record(store, "unsubscribe", "e@example.net", queue_id="Q1", ts=T0 + 14)
    assert new_id > ids[-1]
    (last,) = await store.event_rows(since_id=ids[-1])
    assert (last.id, last.event, last.app, last.campaign) == (
        new_id, "unsubscribe", "shop", "spring")
    assert ("Q1", "b@example.net", "complaint", "abuse report") in await store.events("Q1")


async def test_record_events_of_a_message_still_queued(store: QueueStore) -> None:
    await store.enqueue(message("Q1", ["a@example.net"], app="shop",
                                meta={"campaign": "spring"}))
    await record(store, "complaint", "a@example.net", queue_id="Q1", ts=T0)
    (row,) = await store.event_rows()
    assert (row.app, row.campaign) == ("shop", "spring")


async def test_event_rows_since_limit_and_app(store: QueueStore) -> None:
    ids = await store.record_events([
        Event(ts=T0 + i, queue_id=f"Q{i}", recipient=f"r{i}@example.net", event="delivered",
              app="shop" if i % 2 else "") for i in range(10)])
    assert [e.id for e in await store.event_rows()] == ids
    assert [e.id for e in await store.event_rows(since_id=ids[2], limit=3)] == ids[3:6]
    assert [e.id for e in await store.event_rows(app="shop")] == ids[1::2]
    assert [e.id for e in await store.event_rows(since_id=ids[3], limit=2, app="shop")] == [
        ids[5], ids[7]]
    assert [e.id for e in await store.event_rows(app="")] == ids[0::2]
    assert await store.event_rows(since_id=ids[-1]) == []
    assert await store.event_rows(app="nobody") == []


async def test_webhook_cursor(store: QueueStore) -> None:
    assert await store.webhook_cursor("shop") == 0
    await store.set_webhook_cursor("shop", 41)
    await store.set_webhook_cursor("news", 7)
    await store.set_webhook_cursor("shop", 42)
    assert (await store.webhook_cursor("shop"), await store.webhook_cursor("news")) == (42, 7)


# --- SQLite only: durability and the writer ---------------------------------------------------

def _db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path)


async def test_sqlite_data_survives_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    first = SQLiteQueueStore(path)
    await first.open()
    await first.enqueue(message("Q1", ["a@example.net", "b@example.net"], smtputf8=True,
                                meta={"k": [1, 2]}))
    (job,) = await first.claim(T0, 1, max_rcpts=1)
    await first.settle("Q1", [Settlement(job.recipients[0].id, State.QUEUED, T0 + 60,
                                         "451 4.2.1 busy")])
    await first.close()

    second = SQLiteQueueStore(path)
    await second.open()
    try:
        entry = await second.get("Q1")
        assert entry is not None
        assert [(r.address, r.state, r.attempts, r.last_reply) for r in entry.recipients] == [
            ("a@example.net", State.QUEUED, 1, "451 4.2.1 busy"),
            ("b@example.net", State.QUEUED, 0, None)]
        (job,) = await second.claim(T0 + 60, 1)
        assert (job.body, job.smtputf8, job.meta) == (BODY, True, {"k": [1, 2]})
    finally:
        await second.close()


async def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = SQLiteQueueStore(path)
    await store.open()
    try:
        await store.enqueue(message("Q1"))
        # synchronous and foreign_keys are per connection: ask the writer's own connection.
        sync, fks = await store._run(
            lambda c: (c.execute("PRAGMA synchronous").fetchone()[0],
                       c.execute("PRAGMA foreign_keys").fetchone()[0]))
        assert (sync, fks) == (2, 1)   # 2 = FULL: fsync at every commit
        with _db(path) as other:       # journal_mode=WAL is a property of the file
            assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert other.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
    finally:
        await store.close()
    assert (tmp_path / "q.db").exists()


async def test_sqlite_group_commit(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    store = SQLiteQueueStore(path)
    await store.open()
    try:
        # 200 concurrent commits, 2 recipients each: all succeed and all land.
        await asyncio.gather(*(store.enqueue(message(f"G{i:03}", [f"a{i}@example.net",
                                                                  f"b{i}@example.net"]))
                               for i in range(200)))
        # Each future resolved after its COMMIT: another connection sees every row now.
        with _db(path) as db:
            assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 200
            assert db.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 400

        # One batch for sure: hold the writer until every piece of work has been handed in.
        started, gate = threading.Event(), threading.Event()

        def hold(_conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)

        def writes_then_fails(conn: sqlite3.Connection) -> None:
            conn.execute("INSERT INTO events (ts, queue_id, recipient, event, reply)"
                         " VALUES (0, 'X', 'x@example.net', 'half-done', NULL)")
            raise RuntimeError("boom")

        # _submit hands a function straight to the writer thread (private, used on purpose).
        blocker = store._submit(hold)
        await asyncio.to_thread(started.wait, 10)
        batch = [asyncio.ensure_future(store.enqueue(message(f"B{i}"))) for i in range(5)]
        batch.insert(2, asyncio.ensure_future(store.enqueue(message("G007"))))   # duplicate
        batch.insert(4, store._submit(writes_then_fails))
        await asyncio.sleep(0.05)   # let every enqueue hand its work to the writer
        gate.set()
        await blocker
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert isinstance(results[2], sqlite3.IntegrityError)
        assert isinstance(results[4], RuntimeError)
        assert [r for i, r in enumerate(results) if i not in (2, 4)] == [None] * 5
        assert len(await store.list()) == 205
    finally:
        await store.close()

    with _db(path) as db:
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 205
        assert db.execute("SELECT COUNT(*) FROM recipients").fetchone()[0] == 405
        assert db.execute("SELECT COUNT(*) FROM recipients WHERE queue_id='G007'"
                          ).fetchone()[0] == 2
        # the failing piece's own write was undone with it, and only it
        assert db.execute("SELECT COUNT(*) FROM events WHERE event='half-done'"
                          ).fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM events").fetchone()[0] == 0
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []


async def test_sqlite_refuses_work_when_closed(tmp_path: Path) -> None:
    store = SQLiteQueueStore(tmp_path / "q.db")
    with pytest.raises(RuntimeError, match="not open"):
        await store.enqueue(message("Q1"))
    await store.open()
    await store.close()
    with pytest.raises(RuntimeError, match="not open"):
        await store.list()


# --- SQLite only: the event log on disk ---------------------------------------------------------

# The schema of the first release, before events had category, campaign and app.
OLD_SCHEMA = """
CREATE TABLE messages (
    queue_id TEXT PRIMARY KEY, sender TEXT NOT NULL, body BLOB NOT NULL, size INTEGER NOT NULL,
    smtputf8 INTEGER NOT NULL, eightbit INTEGER NOT NULL, client TEXT NOT NULL, app TEXT,
    stream TEXT NOT NULL, meta TEXT NOT NULL, received_at REAL NOT NULL);
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY,
    queue_id TEXT NOT NULL REFERENCES messages(queue_id) ON DELETE CASCADE,
    address TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt REAL NOT NULL, last_reply TEXT, updated_at REAL NOT NULL);
CREATE INDEX recipients_due ON recipients(next_attempt) WHERE state = 'queued';
CREATE INDEX recipients_message ON recipients(queue_id);
CREATE INDEX recipients_active ON recipients(state) WHERE state = 'active';
CREATE TABLE events (
    id INTEGER PRIMARY KEY, ts REAL NOT NULL, queue_id TEXT NOT NULL,
    recipient TEXT NOT NULL, event TEXT NOT NULL, reply TEXT);
CREATE INDEX events_queue_id ON events(queue_id);
"""


def make_old_database(path: Path) -> None:
    with _db(path) as db:
        db.executescript(OLD_SCHEMA)
        db.execute("INSERT INTO messages VALUES ('Q0', 'app@example.com', ?, ?, 0, 0, 'c',"
                   " 'shop', 'transactional', '{\"campaign\": \"spring\"}', ?)",
                   (BODY, len(BODY), T0))
        db.execute("INSERT INTO recipients (queue_id, address, state, next_attempt, updated_at)"
                   " VALUES ('Q0', 'old@example.net', 'queued', ?, ?)", (T0, T0))
        db.execute("INSERT INTO events (ts, queue_id, recipient, event, reply)"
                   " VALUES (?, 'Q9', 'gone@example.net', 'delivered', '250 ok')", (T0,))
    db.close()


async def test_sqlite_upgrades_a_database_of_the_older_schema(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    make_old_database(path)
    for _ in range(2):                         # the upgrade is done once; reopening is fine
        store = SQLiteQueueStore(path)
        await store.open()
        try:
            assert (await store.events())[:1] == [("Q9", "gone@example.net", "delivered",
                                                  "250 ok")]
            old = (await store.event_rows())[0]
            assert (old.category, old.campaign, old.app) == ("", "", "")
            jobs = await store.claim(T0, 10)
            if jobs:                           # the queued mail of the old file goes out
                (job,) = jobs
                assert (job.app, job.meta) == ("shop", {"campaign": "spring"})
                await store.settle("Q0", [Settlement(job.recipients[0].id, State.DELIVERED,
                                                     T0, "250 ok")],
                                   [Outcome("old@example.net", "delivered", "250 ok",
                                            "delivered")],
                                   app=job.app, campaign=job.meta["campaign"])
            await store.set_webhook_cursor("shop", 1)
        finally:
            await store.close()
    store = SQLiteQueueStore(path)
    await store.open()
    try:
        last = (await store.event_rows())[-1]
        assert (last.recipient, last.category, last.campaign, last.app) == (
            "old@example.net", "delivered", "spring", "shop")
    finally:
        await store.close()
    with _db(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(events)")]
        assert columns[-3:] == ["category", "campaign", "app"]
        indexes = {r[1] for r in db.execute("PRAGMA index_list(events)")}
        assert {"events_stats", "events_app", "events_queue_id"} <= indexes
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    db.close()


async def test_sqlite_two_stores_upgrade_the_same_old_file(tmp_path: Path) -> None:
    """The relay and a `relay queue` command may open an old file at the same moment."""
    path = tmp_path / "q.db"
    make_old_database(path)
    stores = [SQLiteQueueStore(path) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    for s in stores:
        await s.close()
    with _db(path) as db:
        columns = [r[1] for r in db.execute("PRAGMA table_info(events)")]
        assert columns.count("app") == 1
    db.close()


async def test_sqlite_event_log_and_cursor_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "q.db"
    first = SQLiteQueueStore(path)
    await first.open()
    ids = await first.record_events([Event(ts=T0, queue_id="Q1", recipient="a@example.net",
                                           event="complaint", app="shop", campaign="c1")])
    await first.set_webhook_cursor("shop", ids[0])
    await first.close()
    second = SQLiteQueueStore(path)
    await second.open()
    try:
        assert await second.webhook_cursor("shop") == ids[0]
        (row,) = await second.event_rows()
        assert (row.id, row.event, row.app, row.campaign) == (ids[0], "complaint", "shop", "c1")
    finally:
        await second.close()


# --- the gauges' counts on a big queue (issue 9) ---------------------------------------------

async def test_counts_do_not_wait_for_the_write_lock(tmp_path: Path) -> None:
    """counts() (the /metrics gauges, every 5 s) reads on its own connection: a writer that
    holds the database (here another connection, in the relay the writer thread's batch)
    does not hold it up, and it never holds up a commit."""
    store = SQLiteQueueStore(tmp_path / "q.db")
    await store.open()
    try:
        await store.enqueue(message("Q1", ["a@example.net", "b@example.net"]))
        await store.hold("Q1", True)
        await store.enqueue(message("Q2"))
        other = sqlite3.connect(tmp_path / "q.db", isolation_level=None, timeout=0.1)
        other.execute("BEGIN IMMEDIATE")   # the write lock, held
        try:
            assert await asyncio.wait_for(store.counts(), 2.0) == {"held": 2, "queued": 1}
        finally:
            other.execute("ROLLBACK")
            other.close()
    finally:
        await store.close()


def test_counts_walk_partial_indexes_not_the_table(tmp_path: Path) -> None:
    """A full scan of recipients took 270 ms at a million queued rows; each count must be
    answered from its partial index."""
    async def create() -> None:
        store = SQLiteQueueStore(tmp_path / "q.db")
        await store.open()
        await store.close()

    asyncio.run(create())
    conn = sqlite3.connect(tmp_path / "q.db")
    try:
        for state, index in (("queued", "recipients_due"), ("active", "recipients_active"),
                             ("held", "recipients_held")):
            plan = " ".join(row[3] for row in conn.execute(
                f"EXPLAIN QUERY PLAN SELECT COUNT(*) FROM recipients WHERE state = '{state}'"))
            assert index in plan, (state, plan)
    finally:
        conn.close()


async def test_sqlite_group_commit_window(tmp_path: Path) -> None:
    """[queue] group_commit_window: work that arrives within the window after the first
    piece shares its commit, and no reply comes before that commit."""
    store = SQLiteQueueStore(tmp_path / "q.db", group_commit_window=1.0)
    await store.open()
    try:
        first = asyncio.ensure_future(store.enqueue(message("W1")))
        await asyncio.sleep(0.1)
        assert not first.done()          # waiting for company, not committed alone
        second = asyncio.ensure_future(store.enqueue(message("W2")))
        await asyncio.wait_for(asyncio.gather(first, second), 5.0)
        assert len(await store.list()) == 2
    finally:
        await store.close()


async def test_sqlite_new_messages_go_before_outcomes_already_waiting(tmp_path: Path) -> None:
    """A new message's commit (a client waits for its 250) is urgent work: it runs before
    the outcomes, claims and admin work already waiting for the writer, and the rest runs
    in later batches instead of all ahead of it."""
    store = SQLiteQueueStore(tmp_path / "q.db")
    await store.open()
    try:
        started, gate = threading.Event(), threading.Event()
        order: list[str] = []

        def hold(_conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)

        def lazy(i: int) -> Callable[[sqlite3.Connection], None]:
            def work(conn: sqlite3.Connection) -> None:
                time.sleep(0.005)   # a burst of settles of large messages
                order.append(f"lazy{i}")
            return work

        def insert(conn: sqlite3.Connection) -> None:
            order.append("enqueue")

        blocker = store._submit(hold)
        await asyncio.to_thread(started.wait, 10)
        waiting = [store._submit(lazy(i)) for i in range(40)]
        urgent = store._submit(insert, urgent=True)
        real = asyncio.ensure_future(store.enqueue(message("U1")))
        await asyncio.sleep(0.05)   # all of it handed to the writer
        gate.set()
        await asyncio.wait_for(asyncio.gather(blocker, urgent, real), 10)
        assert order[0] == "enqueue"   # ahead of all 40 that were waiting before it
        assert not all(f.done() for f in waiting)   # they were not all in its commit
        await asyncio.wait_for(asyncio.gather(*waiting), 10)
        assert order[1:] == [f"lazy{i}" for i in range(40)]   # the rest keep their order
        assert [e.queue_id for e in await store.list()] == ["U1"]
    finally:
        await store.close()


class _FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _batch_writer(tmp_path: Path, urgent: int, lazy: int, cost: float,
                  failing: set[int] = frozenset()) -> tuple[Any, list[str]]:
    """A writer thread object (not started) with work queued, each piece costing `cost`
    seconds on a fake clock; the order in which pieces ran is recorded."""
    from relay.queue.sqlite import _Writer

    writer = _Writer(tmp_path / "unused.db")
    clock = _FakeClock()
    writer.clock = clock
    ran: list[str] = []

    def piece(name: str, fails: bool) -> Callable[[sqlite3.Connection], None]:
        def work(_conn: sqlite3.Connection) -> None:
            clock.now += cost
            ran.append(name)
            if fails:
                raise RuntimeError(name)
        return work

    for i in range(urgent):
        writer._urgent.append((piece(f"u{i}", False), None, None, True))
    for i in range(lazy):
        writer._lazy.append((piece(f"l{i}", i in failing), None, None, False))
    return writer, ran


@pytest.mark.parametrize(("urgent", "lazy", "expect_urgent", "expect_lazy"), [
    (0, 100, 0, 4),        # outcomes alone: the 4 ms budget (1 ms each)
    (10, 100, 10, 10),     # lazy work gets as long as the new mail took
    (600, 100, 256, 100),  # a flood of new mail: half the batch, and delivery keeps pace
    (600, 0, 512, 0),      # nothing else waiting: new mail may fill the batch
    (3, 2, 3, 2),
])
def test_sqlite_writer_shares_a_batch_between_new_mail_and_outcomes(
        tmp_path: Path, urgent: int, lazy: int, expect_urgent: int, expect_lazy: int) -> None:
    writer, ran = _batch_writer(tmp_path, urgent, lazy, cost=0.001)
    taken: list[Any] = []
    results = writer._take_for_batch(taken, conn=object())   # type: ignore[arg-type]
    assert results is not None and len(results) == len(taken) == len(ran)
    assert sum(r.startswith("u") for r in ran) == expect_urgent
    assert sum(r.startswith("l") for r in ran) == expect_lazy
    assert ran == sorted(ran, key=lambda r: (r[0] != "u", int(r[1:])))   # urgent first, FIFO


def test_sqlite_writer_stops_taking_work_at_a_failing_piece(tmp_path: Path) -> None:
    """A failing piece ends the first pass at once: the batch is run again piece by piece,
    and the work not yet taken stays queued (not pulled into the slow re-run)."""
    writer, ran = _batch_writer(tmp_path, 0, 300, cost=0.0001, failing={1})
    taken: list[Any] = []
    assert writer._take_for_batch(taken, conn=object()) is None   # type: ignore[arg-type]
    assert ran == ["l0", "l1"] and len(taken) == 2
    assert len(writer._lazy) == 298


async def test_sqlite_work_raising_stopiteration_answers_every_caller(tmp_path: Path) -> None:
    """A future cannot carry StopIteration: its caller gets a RuntimeError, and the other
    pieces of the same batch still get their own answers."""
    store = SQLiteQueueStore(tmp_path / "q.db")
    await store.open()
    try:
        started, gate = threading.Event(), threading.Event()

        def hold(_conn: sqlite3.Connection) -> None:
            started.set()
            gate.wait(10)

        def stop(_conn: sqlite3.Connection) -> None:
            raise StopIteration

        blocker = store._submit(hold)
        await asyncio.to_thread(started.wait, 10)
        bad = store._submit(stop)
        good = [store._submit(lambda c, i=i: i) for i in range(5)]
        gate.set()
        await asyncio.wait_for(blocker, 10)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await asyncio.wait_for(bad, 10)
        assert await asyncio.wait_for(asyncio.gather(*good), 10) == [0, 1, 2, 3, 4]
    finally:
        await store.close()
