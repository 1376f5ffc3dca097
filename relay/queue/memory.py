"""An in-memory `QueueStore` twin, for tests of the stages around the queue.

It passes the same contract tests as `SQLiteQueueStore` (tests/queue/test_store_contract.py);
durability is the only thing it does not have.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

from relay.queue import Job, NewMessage, QueueEntry, Recipient, Settlement, State


@dataclass
class _Stored:
    msg: NewMessage
    recipients: list[Recipient]


class MemoryQueueStore:
    def __init__(self) -> None:
        self._messages: dict[str, _Stored] = {}
        self._ids = itertools.count(1)
        self.event_log: list[tuple[str, str, str, str]] = []

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
                     events: list[tuple[str, str, str]] | None = None,
                     notify: NewMessage | None = None) -> bool:
        if notify is not None:
            await self.enqueue(notify)
        stored = self._messages.get(queue_id)
        for rcpt, event, reply in events or []:
            self.event_log.append((queue_id, rcpt, event, reply))
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
        for r in stored.recipients:
            if not r.state.terminal:
                r.state = State.DELETED
                self.event_log.append((queue_id, r.address, "deleted", "deleted by admin"))
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

    async def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self._messages.values():
            for r in s.recipients:
                if not r.state.terminal:
                    out[r.state.value] = out.get(r.state.value, 0) + 1
        return out

    async def events(self, queue_id: str | None = None) -> list[tuple[str, str, str, str]]:
        return [e for e in self.event_log if queue_id is None or e[0] == queue_id]
