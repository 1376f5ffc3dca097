"""An in-memory `QueueStore` twin, for tests of the stages around the queue.

It passes the same contract tests as `SQLiteQueueStore` (tests/queue/test_store_contract.py);
durability is the only thing it does not have.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass

from relay.events import DELIVERY_EVENTS, Event, Outcome
from relay.queue import Job, NewMessage, QueueEntry, Recipient, Settlement, State


@dataclass
class _Stored:
    msg: NewMessage
    recipients: list[Recipient]


class MemoryQueueStore:
    def __init__(self) -> None:
        self._messages: dict[str, _Stored] = {}
        self._ids = itertools.count(1)
        self._event_ids = itertools.count(1)
        self._events: list[Event] = []
        self._cursors: dict[str, int] = {}

    @property
    def event_log(self) -> list[tuple[str, str, str, str]]:
        """(queue_id, recipient, event, reply) of every event, oldest first."""
        return [(e.queue_id, e.recipient, e.event, e.reply) for e in self._events]

    def _log(self, row: Event) -> int:
        stored = dataclasses.replace(row, id=next(self._event_ids))
        self._events.append(stored)
        return stored.id

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def enqueue(self, msg: NewMessage) -> None:
        if msg.queue_id in self._messages:
            raise ValueError(f"duplicate queue id {msg.queue_id}")
        rcpts = [Recipient(next(self._ids), r, 0, State.QUEUED, msg.received_at)
                 for r in msg.recipients]
        self._messages[msg.queue_id] = _Stored(copy.deepcopy(msg), rcpts)

    async def recover(self) -> int:
        n = 0
        for stored in self._messages.values():
            for r in stored.recipients:
                if r.state is State.ACTIVE:
                    r.state = State.QUEUED
                    n += 1
        return n

    async def claim(self, now: float, max_jobs: int, max_rcpts: int = 100) -> list[Job]:
        due = sorted((r.next_attempt, r.id, qid) for qid, s in self._messages.items()
                     for r in s.recipients if r.state is State.QUEUED and r.next_attempt <= now)
        qids: list[str] = []
        for _, _, qid in due:
            if qid not in qids:
                qids.append(qid)
        jobs = []
        for qid in qids[:max_jobs]:
            stored = self._messages[qid]
            rcpts = [r for r in stored.recipients
                     if r.state is State.QUEUED and r.next_attempt <= now][:max_rcpts]
            for r in rcpts:
                r.state = State.ACTIVE
            m = stored.msg
            jobs.append(Job(qid, m.sender, m.body, m.received_at, m.smtputf8, m.eightbit,
                            [copy.copy(r) for r in rcpts], m.app, m.stream, dict(m.meta)))
        return jobs

    async def next_due(self) -> float | None:
        times = [r.next_attempt for s in self._messages.values() for r in s.recipients
                 if r.state is State.QUEUED]
        return min(times) if times else None

    async def settle(self, queue_id: str, settlements: list[Settlement],
                     events: Sequence[Outcome | tuple[str, str, str]] | None = None,
                     notify: NewMessage | None = None, *, app: str | None = None,
                     campaign: str | None = None) -> bool:
        if notify is not None:
            await self.enqueue(notify)
        stored = self._messages.get(queue_id)
        now = time.time()
        for o in (Outcome(*e) for e in events or ()):
            self._log(Event(ts=now, queue_id=queue_id, recipient=o.recipient, event=o.event,
                            category=str(o.category), reply=o.reply, campaign=campaign or "",
                            app=app or ""))
        if stored is None:  # deleted by an admin while the delivery was in flight
            return True
        by_id = {r.id: r for r in stored.recipients}
        for s in settlements:
            r = by_id[s.recipient_id]
            r.state = s.state
            r.next_attempt = s.next_attempt
            if s.reply is not None:
                r.last_reply = s.reply
            if s.counts:
                r.attempts += 1
        return self._drop_if_done(queue_id)

    def _drop_if_done(self, queue_id: str) -> bool:
        if all(r.state.terminal for r in self._messages[queue_id].recipients):
            del self._messages[queue_id]
            return True
        return False

    def _entry(self, qid: str, stored: _Stored) -> QueueEntry:
        m = stored.msg
        return QueueEntry(qid, m.sender, len(m.body), m.received_at,
                          [copy.copy(r) for r in stored.recipients], m.client,
                          m.body.split(b"\r\n\r\n", 1)[0])

    async def list(self) -> list[QueueEntry]:
        return [self._entry(q, s) for q, s in
                sorted(self._messages.items(), key=lambda kv: kv[1].msg.received_at)]

    async def get(self, queue_id: str) -> QueueEntry | None:
        stored = self._messages.get(queue_id)
        return self._entry(queue_id, stored) if stored else None

    async def delete(self, queue_id: str) -> bool:
        stored = self._messages.get(queue_id)
        if stored is None:
            return False
        now = time.time()
        for r in stored.recipients:
            if not r.state.terminal:
                r.state = State.DELETED
                self._log(Event(ts=now, queue_id=queue_id, recipient=r.address,
                                event="deleted", reply="deleted by admin",
                                campaign=stored.msg.meta.get("campaign") or "",
                                app=stored.msg.app or ""))
        self._drop_if_done(queue_id)
        return True

    async def flush(self, now: float) -> int:
        n = 0
        for s in self._messages.values():
            for r in s.recipients:
                if r.state is State.QUEUED:
                    r.next_attempt = now
                    n += 1
        return n

    async def hold(self, queue_id: str, held: bool) -> int:
        old, new = (State.QUEUED, State.HELD) if held else (State.HELD, State.QUEUED)
        stored = self._messages.get(queue_id)
        changed = 0
        for r in stored.recipients if stored else []:
            if r.state is old:
                r.state = new
                changed += 1
        return changed

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._messages.values():
            for r in s.recipients:
                if not r.state.terminal:
                    out[r.state.value] = out.get(r.state.value, 0) + 1
        return out

    async def events(self, queue_id: str | None = None) -> list[tuple[str, str, str, str]]:
        return [e for e in self.event_log if queue_id is None or e[0] == queue_id]

    # -- the event log (relay.events.EventStore) --

    async def record_events(self, rows: Sequence[Event]) -> list[int]:
        ids = []
        for row in rows:
            app, campaign = row.app, row.campaign
            if row.queue_id and not (app and campaign):
                app, campaign = self._context(row, app, campaign)
            ids.append(self._log(dataclasses.replace(
                row, event=str(row.event), category=str(row.category), app=app,
                campaign=campaign)))
        return ids

    def _context(self, row: Event, app: str, campaign: str) -> tuple[str, str]:
        found: tuple[str, str] | None = None
        if (stored := self._messages.get(row.queue_id)) is not None:
            found = (stored.msg.app or "", stored.msg.meta.get("campaign") or "")
        else:
            found = next(((e.app, e.campaign) for e in self._events
                          if e.queue_id == row.queue_id and e.event in DELIVERY_EVENTS), None)
        if found is None:
            return app, campaign
        return app or found[0], campaign or found[1]

    async def event_rows(self, since_id: int = 0, limit: int = 1000,
                         app: str | None = None) -> list[Event]:
        return [e for e in self._events
                if e.id > since_id and (app is None or e.app == app)][:limit]

    async def webhook_cursor(self, app: str) -> int:
        return self._cursors.get(app, 0)

    async def set_webhook_cursor(self, app: str, last_id: int) -> None:
        self._cursors[app] = last_id
