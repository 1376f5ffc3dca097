"""The durable queue: messages, per-recipient delivery state, and the interface to store them.

A `QueueStore` keeps each accepted message once and one row per recipient. The edge calls
`enqueue` and answers 250 only after it returns (invariant 1 of DESIGN.md); the scheduler
`claim`s due recipients (a lease), hands them to delivery and writes the outcome with
`settle`. Two stores pass the same contract tests: `SQLiteQueueStore` (the real one) and
`MemoryQueueStore` (for tests of other stages).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from relay.events import Event, Outcome


class State(StrEnum):
    QUEUED = "queued"          # waiting for its next attempt (new or deferred)
    ACTIVE = "active"          # leased by a delivery in flight
    HELD = "held"              # put on hold by the admin (postsuper -h): not delivered
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    DELETED = "deleted"

    @property
    def terminal(self) -> bool:
        return self not in (State.QUEUED, State.ACTIVE, State.HELD)


def new_queue_id() -> str:
    """A Postfix-like queue ID: microsecond clock (sortable) and 16 random bits, in hex."""
    return f"{time.time_ns() // 1000:X}"[-10:] + secrets.token_hex(2).upper()


@dataclass
class NewMessage:
    """What the edge commits: the message bytes as they will be sent, and its envelope."""

    queue_id: str
    sender: str                # "" is the null reverse-path
    recipients: list[str]
    body: bytes                # CRLF line endings, not dot-stuffed, with our Received header
    received_at: float
    smtputf8: bool = False
    eightbit: bool = False
    client: str = ""
    app: str | None = None
    stream: str = "transactional"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipient:
    id: int
    address: str
    attempts: int = 0
    state: State = State.QUEUED
    next_attempt: float = 0.0
    last_reply: str | None = None


@dataclass
class Job:
    """One message and the recipients of it claimed for one delivery attempt."""

    queue_id: str
    sender: str
    body: bytes
    received_at: float
    smtputf8: bool
    eightbit: bool
    recipients: list[Recipient]
    app: str | None = None
    stream: str = "transactional"
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Settlement:
    """The new state of one claimed recipient after an attempt."""

    recipient_id: int
    state: State
    next_attempt: float = 0.0
    reply: str | None = None
    counts: bool = True        # False: the attempt does not count (our connection was stale)


@dataclass
class QueueEntry:
    """A queued message as the admin sees it (`relay queue list/show`)."""

    queue_id: str
    sender: str
    size: int
    received_at: float
    recipients: list[Recipient]
    client: str = ""
    headers: bytes = b""


class QueueStore(Protocol):
    """Durable storage of messages and per-recipient state.

    Every method is a coroutine; a store must not block the event loop. `enqueue` returns
    only after the message is durable (fsync'd). `claim` leases due recipients so that no
    other claim returns them until they are settled or `recover` runs.
    """

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def enqueue(self, msg: NewMessage) -> None:
        """Store a message and its recipients durably; raise on any failure."""

    async def recover(self) -> int:
        """Return every leased (active) recipient to the queue; run once at start. Count."""

    async def claim(self, now: float, max_jobs: int, max_rcpts: int = 100) -> list[Job]:
        """Lease recipients due at `now`: at most `max_jobs` messages, earliest due first,
        and at most `max_rcpts` recipients of each (one SMTP transaction)."""

    async def next_due(self) -> float | None:
        """When the earliest queued recipient becomes due, or None if there is none."""

    async def settle(self, queue_id: str, settlements: list[Settlement],
                     events: Sequence[Outcome | tuple[str, str, str]] | None = None,
                     notify: NewMessage | None = None, *, app: str | None = None,
                     campaign: str | None = None) -> bool:
        """Write outcomes of an attempt; drop the message once every recipient is terminal.

        `events` are `Outcome` rows (recipient, event, reply, category; a 3-tuple has
        category "") for the event log, stored with the job's `app` and `campaign`; `notify`
        a new message (a bounce notice) committed in the same transaction. Return True when
        the message was removed."""

    async def list(self) -> list[QueueEntry]:
        """Every message that still has a non-terminal recipient."""

    async def get(self, queue_id: str) -> QueueEntry | None: ...

    async def delete(self, queue_id: str) -> bool:
        """Admin deletion: every non-terminal recipient becomes deleted. False if unknown."""

    async def flush(self, now: float) -> int:
        """Make every queued recipient due now. Return the count."""

    async def hold(self, queue_id: str, held: bool) -> int:
        """Hold (or release) a message's queued recipients. Return how many changed."""

    async def counts(self) -> dict[str, int]:
        """Recipients per non-terminal state."""

    async def events(self, queue_id: str | None = None,
                     ) -> list[tuple[str, str, str, str | None]]:
        """(queue_id, recipient, event, reply) of every event (of one message), oldest
        first: the short form tests and the CLI read. `event_rows` gives whole rows."""

    # The event log (relay.events.EventStore): see there for the meaning of each.

    async def record_events(self, rows: Sequence[Event]) -> list[int]:
        """Append events that do not come from a delivery attempt; return their ids."""

    async def event_rows(self, since_id: int = 0, limit: int = 1000,
                         app: str | None = None) -> list[Event]:
        """Whole event rows with id > `since_id`, oldest first (of `app` if given)."""

    async def webhook_cursor(self, app: str) -> int:
        """The id of the last event delivered to `app`'s webhook (0 if none)."""

    async def set_webhook_cursor(self, app: str, last_id: int) -> None:
        """Durably remember that events up to `last_id` reached `app`'s webhook."""
