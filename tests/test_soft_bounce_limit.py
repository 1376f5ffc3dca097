"""Soft bounces add up to a suppression only after enough of them over enough days."""

from __future__ import annotations

import aiosmtplib

from relay.suppression import Reason
from tests.conftest import wait_events, wait_for
from tests.support.downstream import Downstream

MESSAGE = b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n"


async def test_soft_bounces_suppress_after_the_limit_and_a_delivery_resets(
        downstream: Downstream, start_relay) -> None:
    downstream.script("RCPT", "552 5.2.2 Mailbox full", match="full@", times=None)
    relay = await start_relay(downstream.port, queue={"retry": ["100ms"], "lifetime": "1h"},
                              bounces={"soft_limit": 3, "soft_days": "1s"})
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail("a@example.com", ["full@example.net"], MESSAGE)
    # 5.2.2 is soft: deferred (not bounced), retried; after 3 in a row over >= 1 s: suppressed
    await wait_for(lambda: relay.suppressions.check("full@example.net") is not None,
                   timeout=20, what="the soft-bounce limit")
    entry = relay.suppressions.check("full@example.net")
    assert entry is not None and entry.reason is Reason.SOFT_BOUNCE_LIMIT
    events = [e for e in await relay.store.events() if e[1] == "full@example.net"]
    assert events[0][2] == "deferred" and "bounced" not in {e[2] for e in events[:3]}
    # the next attempt is dropped at send time as suppressed
    await wait_events(relay, len(events) + 1)


async def test_a_delivery_clears_the_run(downstream: Downstream, start_relay) -> None:
    downstream.script("RCPT", "452 4.2.2 Mailbox full", match="x@", times=2)
    relay = await start_relay(downstream.port, queue={"retry": ["100ms"]},
                              bounces={"soft_limit": 3, "soft_days": "0s"})
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail("a@example.com", ["x@example.net"], MESSAGE)
    events = await wait_events(relay, 3)
    assert [e[2] for e in events] == ["deferred", "deferred", "delivered"]
    # The count is cleared after the outcome is settled (on a worker thread): wait for it.
    await wait_for(lambda: relay.suppressions.soft_bounces("x@example.net") is None,
                   what="the soft-bounce run cleared")
    assert relay.suppressions.check("x@example.net") is None
