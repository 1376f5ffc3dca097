"""Delivery: routing, connection pools, the SMTP transaction, classification of outcomes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from relay.outbound.classify import SmtpReply
from relay.queue import Job, Recipient


@dataclass
class RcptResult:
    """What one delivery attempt did for one recipient."""

    recipient: Recipient
    reply: SmtpReply
    relay: str = "none"         # "host[ip]:port" of the next hop, as Postfix logs it
    counts: bool = True         # False when the attempt was not the recipient's fault
    tls: str = ""               # "TLSv1.3:TLS_AES_256_GCM_SHA384" when the session used TLS


class Deliverer(Protocol):
    """Carries a job to the next hop; one result per recipient of the job, never raises
    for a delivery problem (an exception is treated as a transient failure by the caller)."""

    async def deliver(self, job: Job) -> list[RcptResult]: ...

    async def close(self) -> None: ...
