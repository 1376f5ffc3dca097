"""Outbound pacing per destination: a burst is queued and spread out, not refused."""

from __future__ import annotations

import asyncio
import time

import aiosmtplib

from relay.config import DestinationConfig
from relay.queue import Job, Recipient
from relay.queue.pacing import Pacer
from tests.conftest import wait_events
from tests.support.downstream import Downstream

MESSAGE = b"From: a@example.com\r\nSubject: paced\r\n\r\nhi\r\n"


async def arrival_times(ds: Downstream, count: int, timeout: float = 20.0) -> list[float]:
    times: list[float] = []
    end = time.monotonic() + timeout
    while len(times) < count:
        assert time.monotonic() < end, f"only {len(times)} of {count} arrived"
        while len(times) < len(ds.messages):
            times.append(time.monotonic())
        await asyncio.sleep(0.005)
    return times


async def test_burst_to_a_paced_destination_is_spread_at_its_rate(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, outbound={
        "destination": {"example.org": {"rate": "10/s", "max_connections": 2}}})
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        for i in range(20):
            await c.sendmail("a@example.com", [f"r{i}@example.org"], MESSAGE)
        for i in range(5):   # an unpaced destination is not held up behind the burst
            await c.sendmail("a@example.com", [f"u{i}@example.net"], MESSAGE)
    times = await arrival_times(downstream, 25)
    org = [t for t, m in zip(times, downstream.messages, strict=True)
           if m.rcpt_tos[0].endswith("@example.org")]
    net = [t for t, m in zip(times, downstream.messages, strict=True)
           if m.rcpt_tos[0].endswith("@example.net")]
    # 20 deliveries at 10/s need at least 1.9 s; never more than ~10 in any second
    assert org[-1] - org[0] >= 1.5
    for i in range(len(org) - 12):
        assert org[i + 12] - org[i] >= 1.0
    assert max(net) < org[-1]
    # nothing was refused or counted as an attempt
    events = await wait_events(relay, 25)
    assert {e[2] for e in events} == {"delivered"}
    assert downstream.max_concurrent <= relay.cfg.outbound.max_connections


def test_pacer_splits_a_job_by_destination() -> None:
    dests = {"gmail.com": DestinationConfig("gmail.com", rate=(20, 1))}
    pacer = Pacer(lambda d: dests.get(d))
    job = Job("Q1", "a@example.com", b"x", 0.0, False, False,
              [Recipient(1, "a@gmail.com"), Recipient(2, "b@example.net"),
               Recipient(3, "c@gmail.com"), Recipient(4, "d@example.org")])
    parts = pacer.split(job)
    assert sorted([r.id for r in p.recipients] for p in parts) == [[1, 3], [2, 4]]


def test_pacer_gives_slots_at_the_rate_and_requeues_far_ones() -> None:
    dest = DestinationConfig("gmail.com", rate=(2, 1))
    pacer = Pacer(lambda d: dest if d == "gmail.com" else None, hold=1.0)
    jobs = [Job(f"Q{i}", "", b"", 0.0, False, False, [Recipient(i, f"r{i}@gmail.com")])
            for i in range(6)]
    plans = [pacer.plan(j, now=100.0) for j in jobs]
    assert [p.start_at for p in plans] == [100.0, 100.5, 101.0, 101.5, 102.0, 102.5]
    assert [p.requeue for p in plans] == [False, False, False, True, True, True]
    other = Job("Q9", "", b"", 0.0, False, False, [Recipient(9, "x@example.net")])
    assert pacer.plan(other, now=100.0).lane is None
