"""The event log: one row per thing that happened to one recipient, and statistics over it.

Every delivery, deferral, bounce, expiry, suppression, admin deletion, complaint and
unsubscribe is one `Event` in the queue database's `events` table (invariant 2 of DESIGN.md:
one event saying why). Delivery outcomes are written by the queue store in the same
transaction as the recipient's new state (`QueueStore.settle`); events that do not come from
a delivery attempt (complaints, unsubscribes, reports arriving later) go through
`record_events` / `record` below.

`relay stats` reads the table through a plain read-only sqlite3 connection (`read_stats`), so
it works while the relay is running; relay/webhook.py forwards new rows to each app's URL.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, Protocol


class EventKind(StrEnum):
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"
    EXPIRED = "expired"
    SUPPRESSED = "suppressed"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    DELETED = "deleted"


# The events the queue store writes itself, from the message (settle, delete).
DELIVERY_EVENTS = (EventKind.DELIVERED, EventKind.DEFERRED, EventKind.BOUNCED,
                   EventKind.EXPIRED, EventKind.SUPPRESSED, EventKind.DELETED)


@dataclass(frozen=True, kw_only=True)
class Event:
    """One row of the event log.

    `category` is the classifier's category of the reply (hard, soft, rate-limited, block,
    content, relay-side, unknown, delivered), or "" where none applies (suppressed, deleted,
    and usually complaint and unsubscribe). `app` is "" for mail from `mynetworks` clients;
    `campaign` is the X-Relay-Campaign the app gave, or "". `id` is assigned by the store
    (0 in a row not stored yet); it only grows, so it orders events and is a cursor."""

    id: int = 0
    ts: float
    queue_id: str
    recipient: str
    event: str
    category: str = ""
    reply: str = ""
    campaign: str = ""
    app: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Outcome(NamedTuple):
    """One event row as the scheduler hands it to `QueueStore.settle`: the store adds the
    time, the queue ID, the app and the campaign. A plain (recipient, event, reply) 3-tuple
    is accepted too (category "")."""

    recipient: str
    event: str
    reply: str
    category: str = ""


class EventStore(Protocol):
    """The event log of a queue store (both `SQLiteQueueStore` and `MemoryQueueStore`)."""

    async def record_events(self, rows: Sequence[Event]) -> list[int]:
        """Append rows that do not come from a delivery attempt (complaints, unsubscribes,
        reports); durable when it returns. A row's `id` is ignored; the new ids are returned,
        in order. A row with a queue ID and an empty app or campaign gets it from that
        message: still queued, or from the events its delivery wrote (once every recipient
        is done, the message itself is gone)."""

    async def event_rows(self, since_id: int = 0, limit: int = 1000,
                         app: str | None = None) -> list[Event]:
        """Full rows with id > `since_id`, oldest first, at most `limit`; only those of
        `app` when it is given ("" is the app of mynetworks clients)."""

    async def webhook_cursor(self, app: str) -> int:
        """The id of the last event delivered to `app`'s webhook (0 if none)."""

    async def set_webhook_cursor(self, app: str, last_id: int) -> None:
        """Remember (durably) that events up to `last_id` reached `app`'s webhook."""


async def record(store: EventStore, event: EventKind | str, recipient: str, *,
                 queue_id: str = "", category: str = "", reply: str = "", campaign: str = "",
                 app: str = "", ts: float | None = None) -> int:
    """Record one event that does not come from a delivery attempt; return its id.

    For the edge and the HTTP listener: a verified complaint or unsubscribe, a report."""
    row = Event(ts=time.time() if ts is None else ts, queue_id=queue_id, recipient=recipient,
                event=str(event), category=category, reply=reply, campaign=campaign, app=app)
    (new_id,) = await store.record_events([row])
    return new_id


# --- statistics ----------------------------------------------------------------------------

BOUNCE_WARN = 0.02        # bounced / sent above 2 %: the list needs cleaning
COMPLAINT_WARN = 0.003    # complaints / delivered above 0.3 %: the large mailbox providers'
                          # published limit for bulk senders

DEFINITIONS = (
    "sent = delivered + bounced + expired: recipients whose attempts reached a final outcome",
    "deferred = deferral events (one per failed attempt that will be retried)",
    "bounce% = bounced / sent; hard% and soft% = bounces classified hard or soft / sent",
    "complaint% = complaints / delivered; unsub% = unsubscribes / delivered",
    "app - = mynetworks clients; campaign - = none given, * = all campaigns of the app",
)


@dataclass
class Stats:
    """Counts of one app and campaign (campaign "*": every campaign of the app)."""

    app: str
    campaign: str
    delivered: int = 0
    bounced: int = 0
    hard: int = 0
    soft: int = 0
    expired: int = 0
    deferred: int = 0
    suppressed: int = 0
    complaints: int = 0
    unsubscribes: int = 0

    @property
    def sent(self) -> int:
        return self.delivered + self.bounced + self.expired

    @property
    def bounce_rate(self) -> float | None:
        return self.bounced / self.sent if self.sent else None

    @property
    def hard_rate(self) -> float | None:
        return self.hard / self.sent if self.sent else None

    @property
    def soft_rate(self) -> float | None:
        return self.soft / self.sent if self.sent else None

    @property
    def complaint_rate(self) -> float | None:
        return self.complaints / self.delivered if self.delivered else None

    @property
    def unsubscribe_rate(self) -> float | None:
        return self.unsubscribes / self.delivered if self.delivered else None

    def add(self, event: str, category: str, n: int) -> None:
        if event == EventKind.DELIVERED:
            self.delivered += n
        elif event == EventKind.BOUNCED:
            self.bounced += n
            if category == "hard":
                self.hard += n
            elif category == "soft":
                self.soft += n
        elif event == EventKind.EXPIRED:
            self.expired += n
        elif event == EventKind.DEFERRED:
            self.deferred += n
        elif event == EventKind.SUPPRESSED:
            self.suppressed += n
        elif event == EventKind.COMPLAINT:
            self.complaints += n
        elif event == EventKind.UNSUBSCRIBE:
            self.unsubscribes += n

    def merge(self, other: Stats) -> None:
        for name in ("delivered", "bounced", "hard", "soft", "expired", "deferred",
                     "suppressed", "complaints", "unsubscribes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def warnings(self) -> list[str]:
        who = f"app {_shown(self.app)}, campaign {_shown(self.campaign)}"
        out = []
        if self.bounce_rate is not None and self.bounce_rate > BOUNCE_WARN:
            out.append(f"WARNING: {who}: bounce rate {_pct(self.bounce_rate)} is over "
                       f"{_pct(BOUNCE_WARN)} ({self.bounced} of {self.sent} sent)")
        if self.complaint_rate is not None and self.complaint_rate > COMPLAINT_WARN:
            out.append(f"WARNING: {who}: complaint rate {_pct(self.complaint_rate)} is over "
                       f"{_pct(COMPLAINT_WARN)} ({self.complaints} of {self.delivered} "
                       "delivered)")
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app, "campaign": self.campaign, "sent": self.sent,
            "delivered": self.delivered, "bounced": self.bounced, "hard_bounces": self.hard,
            "soft_bounces": self.soft, "expired": self.expired, "deferred": self.deferred,
            "suppressed": self.suppressed, "complaints": self.complaints,
            "unsubscribes": self.unsubscribes, "bounce_rate": self.bounce_rate,
            "hard_bounce_rate": self.hard_rate, "soft_bounce_rate": self.soft_rate,
            "complaint_rate": self.complaint_rate, "unsubscribe_rate": self.unsubscribe_rate,
            "warnings": self.warnings(),
        }


def read_stats(path: Path, *, since: float | None = None, app: str | None = None,
               ) -> list[Stats]:
    """Per (app, campaign) counts of the events at or after `since`, read-only.

    A plain sqlite3 connection in read-only mode: the relay may be running and writing; WAL
    lets this reader see the last commit without blocking it. A database of the older schema
    (no category, campaign or app columns yet) reads as "" in those."""
    uri = path.resolve().as_uri() + "?mode=ro"
    conn = sqlite3.connect(uri, uri=True, timeout=5.0)
    try:
        columns = {row[1] for row in conn.execute("PRAGMA table_info(events)")}
        if not columns:
            return []

        def col(name: str) -> str:
            # Bare column names (NOT NULL) let the events_stats index serve the query.
            return name if name in columns else "''"

        where, params = [], []
        if since is not None:
            where.append("ts >= ?")
            params.append(since)
        if app is not None:
            where.append(f"{col('app')} = ?")
            params.append(app)
        sql = (f"SELECT {col('app')}, {col('campaign')}, event, {col('category')}, COUNT(*)"
               " FROM events" + (" WHERE " + " AND ".join(where) if where else "")
               + " GROUP BY 1, 2, 3, 4")
        rows: dict[tuple[str, str], Stats] = {}
        for app_, campaign, event, category, n in conn.execute(sql, params):
            key = (app_, campaign)
            if key not in rows:
                rows[key] = Stats(app_, campaign)
            rows[key].add(event, category, n)
    finally:
        conn.close()
    return [rows[k] for k in sorted(rows)]


def with_app_totals(rows: list[Stats]) -> list[Stats]:
    """The rows, and after the rows of each app that has several campaigns, their sum
    (campaign "*")."""
    out: list[Stats] = []
    for i, row in enumerate(rows):
        out.append(row)
        last_of_app = i + 1 == len(rows) or rows[i + 1].app != row.app
        group = [r for r in rows if r.app == row.app]
        if last_of_app and len(group) > 1:
            total = Stats(row.app, "*")
            for r in group:
                total.merge(r)
            out.append(total)
    return out


def format_table(rows: list[Stats]) -> str:
    """A fixed-width table, one line per row; "-" for a rate with nothing to divide by."""
    head = ("app", "campaign", "sent", "delivered", "deferred", "bounce%", "hard%", "soft%",
            "complaint%", "unsub%")
    body = [(_shown(r.app), _shown(r.campaign), str(r.sent), str(r.delivered),
             str(r.deferred), _pct(r.bounce_rate), _pct(r.hard_rate), _pct(r.soft_rate),
             _pct(r.complaint_rate), _pct(r.unsubscribe_rate)) for r in rows]
    widths = [max(len(line[i]) for line in [head, *body]) for i in range(len(head))]

    def fmt(line: Sequence[str]) -> str:
        cells = [cell.ljust(w) if i < 2 else cell.rjust(w)
                 for i, (cell, w) in enumerate(zip(line, widths, strict=True))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(head), *(fmt(line) for line in body)])


def since_text(since: float | None) -> str:
    if since is None:
        return "all events"
    with contextlib.suppress(OverflowError, OSError, ValueError):
        when = dt.datetime.fromtimestamp(since, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"events since {when} UTC"
    return "all events"


def _shown(name: str) -> str:
    return name or "-"


def _pct(rate: float | None) -> str:
    if rate is None:
        return "-"
    return f"{rate * 100:.2f}%"
