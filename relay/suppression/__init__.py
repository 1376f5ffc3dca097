"""The suppression store, bounce and complaint ingestion, events.

One store of suppressed addresses feeds every check: at RCPT (the edge), at send time
(the scheduler, invariant 3 of DESIGN.md), and it is fed by hard bounces, complaints,
unsubscribes (one-click HTTP and mail) and the admin's CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

GLOBAL = "global"


class Reason(StrEnum):
    UNSUBSCRIBE = "unsubscribe"
    HARD_BOUNCE = "hard-bounce"
    COMPLAINT = "complaint"
    MANUAL = "manual"
    SOFT_BOUNCE_LIMIT = "soft-bounce-limit"


@dataclass(frozen=True)
class Suppression:
    address: str            # canonical: domain lower-cased, local part as is
    scope: str              # "global", or a sending domain or list name
    reason: Reason
    detail: str = ""        # the SMTP reply, the report, or the admin's note
    created_at: float = 0.0
    expires_at: float | None = None


class SuppressionStore(Protocol):
    """Suppressed addresses. Look-ups are indexed and synchronous (microseconds): they run
    on the event loop at RCPT and at send time. Writes are durable when they return."""

    def check(self, address: str, scopes: tuple[str, ...] = (GLOBAL,),
              now: float | None = None) -> Suppression | None:
        """The entry that suppresses `address` in any of `scopes` (unexpired), or None."""

    def add(self, entry: Suppression) -> bool:
        """Insert or replace (address, scope). True if it was not suppressed before."""

    def remove(self, address: str, scope: str = GLOBAL) -> bool:
        """True if an entry was removed."""

    def list(self, scope: str | None = None) -> list[Suppression]: ...

    def count(self) -> int: ...

    def record_soft_bounce(self, address: str, now: float | None = None) -> tuple[int, float]:
        """Count one more soft bounce in a row: (count, time of the first)."""

    def clear_soft_bounces(self, address: str) -> bool:
        """A delivery ends the run of soft bounces. True if there was one."""

    def soft_bounces(self, address: str) -> tuple[int, float, float] | None:
        """(count, first, last) of the current run of soft bounces, if any."""

    def close(self) -> None: ...
