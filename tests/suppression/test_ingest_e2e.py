"""Reports arriving later, over real SMTP: VERP return paths out, DSNs and complaints back
in, matched, judged (VERP, SPF on a loopback DNS server) and applied - or kept and
ignored when forged."""

from __future__ import annotations

import os
import re
import secrets
import time

import aiosmtplib
import pytest
import pytest_asyncio

from relay.outbound.dsn import FailedRecipient, build_dsn
from relay.suppression import Reason
from tests.conftest import wait_events
from tests.support.dns import LoopbackDNS
from tests.support.downstream import Downstream

os.environ.setdefault("RELAY_BOUNCE_SECRET", secrets.token_hex(32))
MESSAGE = (b"From: news@example.com\r\nTo: reader@example.net\r\nSubject: hi\r\n"
           b"Message-ID: <m1@example.com>\r\nDate: Thu, 03 Dec 2026 10:00:00 +0000\r\n\r\nhi\r\n")


@pytest_asyncio.fixture
async def dns() -> LoopbackDNS:
    records = {("example.net.", "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
               ("evil.example.", "TXT"): ["v=spf1 -all"]}
    async with LoopbackDNS(records) as server:
        yield server


@pytest.fixture
def start(downstream: Downstream, start_relay, dns: LoopbackDNS, tmp_path):
    async def go(verp: bool = True):
        return await start_relay(downstream.port, bounces={
            "domain": "bounces.example.com", "verp": verp,
            "report_dir": str(tmp_path / "reports")},
            dns={"nameservers": [f"127.0.0.1:{dns.port}"]})
    return go


async def send(relay, rcpt: str, data: bytes, sender: str) -> None:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail(sender, [rcpt], data)


def dsn_for(original: bytes, rcpt: str, status: str, reporting: str = "mx.example.net") -> bytes:
    body = build_dsn(queue_id="X", original_sender="news@example.com",
                     recipients=[FailedRecipient(rcpt, status, f"550 {status} no such user",
                                                 reporting)],
                     original_message=original, reporting_mta=reporting,
                     arrival_date=time.time(), now=time.time())
    return body


async def test_verp_return_path_and_trusted_hard_bounce(start, downstream: Downstream,
                                                        tmp_path) -> None:
    relay = await start()
    await send(relay, "reader@example.net", MESSAGE, "news@example.com")
    [m] = await downstream.wait_messages(1)
    verp = m.mail_from
    assert re.fullmatch(r"bounces\+[a-z2-7]+@bounces\.example\.com", verp), verp
    # the remote MX bounces it later, to the VERP address, from the null sender
    await send(relay, verp, dsn_for(m.data, "reader@example.net", "5.1.1"), "")
    entry = relay.suppressions.check("reader@example.net")
    assert entry is not None and entry.reason is Reason.HARD_BOUNCE
    events = await wait_events(relay, 2)
    assert events[-1][1:3] == ("reader@example.net", "bounced")
    [kept] = (tmp_path / "reports").iterdir()
    assert kept.read_bytes().startswith(b"Authentication-Results: relay.test;")
    assert b"x-verp=pass" in kept.read_bytes().split(b"\r\n", 1)[0]
    assert len(downstream.messages) == 1        # the report was taken in, not relayed


async def test_soft_status_in_a_report_does_not_suppress(start, downstream: Downstream) -> None:
    relay = await start()
    await send(relay, "full@example.net", MESSAGE, "news@example.com")
    [m] = await downstream.wait_messages(1)
    await send(relay, m.mail_from, dsn_for(m.data, "full@example.net", "5.2.2"), "")
    assert relay.suppressions.check("full@example.net") is None     # invariant 5


async def test_forged_report_is_kept_but_changes_nothing(start, downstream: Downstream,
                                                         tmp_path) -> None:
    relay = await start()
    await send(relay, "reader@example.net", MESSAGE, "news@example.com")
    [m] = await downstream.wait_messages(1)
    forged_verp = m.mail_from[:-25] + ("a" if m.mail_from[-25] != "a" else "b") \
        + m.mail_from[-24:]
    report = dsn_for(m.data, "reader@example.net", "5.1.1", reporting="mx.evil.example")
    await send(relay, forged_verp, report, "postmaster@evil.example")
    assert relay.suppressions.check("reader@example.net") is None
    [kept] = (tmp_path / "reports").iterdir()
    head = kept.read_bytes().split(b"\r\n", 1)[0]
    assert b"x-verp=fail" in head or b"x-verp=none" in head
    assert b"spf=fail" in head


async def test_report_without_verp_trusted_by_spf_and_matched_by_queue_id(
        start, downstream: Downstream) -> None:
    relay = await start(verp=False)
    await send(relay, "gone@example.net", MESSAGE, "news@example.com")
    [m] = await downstream.wait_messages(1)
    assert m.mail_from == "news@example.com"
    # example.net's SPF authorises 127.0.0.1; the report names our queue ID in the
    # returned headers (our Received line)
    await send(relay, "postmaster@bounces.example.com",
               dsn_for(m.data, "gone@example.net", "5.1.1"), "postmaster@example.net")
    entry = relay.suppressions.check("gone@example.net")
    assert entry is not None and entry.reason is Reason.HARD_BOUNCE


async def test_arf_complaint_suppresses(start, downstream: Downstream) -> None:
    relay = await start()
    await send(relay, "reader@example.net", MESSAGE, "news@example.com")
    [m] = await downstream.wait_messages(1)
    boundary = "arf-b"
    arf = (f"From: abuse@example.net\r\nTo: {m.mail_from}\r\nSubject: complaint\r\n"
           f"MIME-Version: 1.0\r\nContent-Type: multipart/report; report-type=feedback-report;"
           f" boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain\r\n\r\n"
           f"A complaint.\r\n--{boundary}\r\nContent-Type: message/feedback-report\r\n\r\n"
           f"Feedback-Type: abuse\r\nUser-Agent: test/1.0\r\nVersion: 1\r\n"
           f"Reporting-MTA: dns; fbl.example.net\r\n\r\n--{boundary}\r\n"
           f"Content-Type: message/rfc822\r\n\r\n").encode() + m.data \
        + f"\r\n--{boundary}--\r\n".encode()
    await send(relay, m.mail_from, arf, "abuse@example.net")
    entry = relay.suppressions.check("reader@example.net")
    assert entry is not None and entry.reason is Reason.COMPLAINT
    events = await wait_events(relay, 2)
    assert ("reader@example.net", "complaint") in [(e[1], e[2]) for e in events]
