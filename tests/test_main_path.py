"""The main path end to end: client -> relay -> scripted downstream, over loopback."""

from __future__ import annotations

import asyncio
import smtplib

import aiosmtplib
import pytest

from relay.app import Relay
from relay.queue import State
from tests.conftest import relay_config, wait_events, wait_for
from tests.support.downstream import Downstream
from tests.support.mail import split_received

MESSAGE = (b"From: App <app@example.com>\r\n"
           b"To: reader@example.net\r\n"
           b"Subject: hello\r\n"
           b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
           b"Message-ID: <m1@example.com>\r\n"
           b"\r\n"
           b"first line\r\n"
           b".a line that starts with a dot\r\n"
           b"..two dots\r\n"
           b"\r\n"
           b"last line\r\n")


def data_commands(ds: Downstream) -> int:
    """How many DATA commands the downstream has received."""
    return sum(1 for _, line in ds.commands if line.upper().startswith(b"DATA"))


def smtplib_send(port: int, sender: str, rcpts: list[str], data: bytes) -> dict:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail(sender, rcpts, data)


async def test_bytes_arrive_unchanged_plus_one_received_header(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    refused = await asyncio.to_thread(smtplib_send, port, "app@example.com",
                                      ["reader@example.net"], MESSAGE)
    assert refused == {}
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("app@example.com", ["other@example.net"], MESSAGE)
    await downstream.wait_messages(2)
    for got, rcpt in zip(downstream.messages, ["reader@example.net", "other@example.net"],
                         strict=True):
        received, rest = split_received(got.data)
        assert rest == MESSAGE
        assert b"by relay.test (relay) with ESMTP id " in received
        assert f"for <{rcpt}>".encode() in received
        assert got.mail_from == "app@example.com"
        assert got.rcpt_tos == [rcpt]
    # dot-stuffing on the wire: the downstream un-stuffed it back to the original bytes
    assert all(b"\r\n..two dots\r\n" in m.data for m in downstream.messages)


async def test_two_hundred_messages_over_at_most_max_connections(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, outbound={"max_connections": 3})
    port = relay.smtp_addresses[0][1]

    async def client(n: int) -> None:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            for i in range(20):
                await c.sendmail("app@example.com", [f"r{n}-{i}@example.net"], MESSAGE)

    await asyncio.gather(*(client(n) for n in range(10)))
    await downstream.wait_messages(200, timeout=30)
    assert len(downstream.messages) == 200
    assert downstream.max_concurrent <= 3
    # connections are reused: far fewer connections than messages
    assert downstream.connections_opened <= 3 * 3


async def test_max_messages_per_connection_rotates_connections(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, outbound={"max_connections": 1,
                                                         "max_messages_per_connection": 5})
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        for i in range(12):
            await c.sendmail("app@example.com", [f"r{i}@example.net"], MESSAGE)
    await downstream.wait_messages(12)
    per_conn: dict[int, int] = {}
    for m in downstream.messages:
        per_conn[m.connection_id] = per_conn.get(m.connection_id, 0) + 1
    assert max(per_conn.values()) <= 5
    assert len(per_conn) >= 3


async def test_idle_connection_closed_after_idle_timeout(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, outbound={"idle_timeout": "300ms"})
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    await downstream.wait_messages(1)
    await wait_for(lambda: downstream.open_connections == 0, timeout=5,
                   what="the idle pooled connection to be closed")
    assert any(line.upper().startswith(b"QUIT") for _, line in downstream.commands)


async def test_421_on_idle_pooled_connection_is_recovered(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, outbound={"max_connections": 1})
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["first@example.net"], MESSAGE)
        await downstream.wait_messages(1)
        assert downstream.close_idle_connections_with_421() == 1
        await c.sendmail("app@example.com", ["second@example.net"], MESSAGE)
    await downstream.wait_messages(2)
    assert downstream.messages[1].rcpt_tos == ["second@example.net"]
    assert downstream.connections_opened == 2
    # the stale connection did not count as an attempt against the recipient
    events = await wait_events(relay, 2)
    assert [e[2] for e in events if e[1] == "second@example.net"] == ["delivered"]


async def test_451_is_deferred_then_delivered_on_retry(
        downstream: Downstream, start_relay) -> None:
    downstream.script("EOD", "451 4.3.0 try again later", times=1)
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    await downstream.wait_messages(1, timeout=10)
    events = await wait_events(relay, 2)
    assert [e[2] for e in events] == ["deferred", "delivered"]
    assert "451 4.3.0 try again later" in events[0][3]


async def test_550_for_one_of_three_recipients(downstream: Downstream, start_relay) -> None:
    downstream.script("RCPT", "550 5.1.1 no such user", match="b@example.net", times=None)
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", rcpts, MESSAGE)
    original, notice = await downstream.wait_messages(2)
    assert original.rcpt_tos == ["a@example.net", "c@example.net"]
    # the sender is told about b, by a delivery status notification from the null sender
    assert (notice.mail_from, notice.rcpt_tos) == ("", ["app@example.com"])
    assert b"Content-Type: multipart/report; report-type=delivery-status" in notice.data
    assert b"Final-Recipient: rfc822; b@example.net" in notice.data
    assert b"Status: 5.1.1" in notice.data
    outcomes = {e[1]: e[2] for e in await wait_events(relay, 4)}
    assert outcomes == {"a@example.net": "delivered", "b@example.net": "bounced",
                        "c@example.net": "delivered", "app@example.com": "delivered"}
    assert await relay.store.list() == []   # all terminal: the messages are removed


async def test_restart_while_deferred_then_delivers(tmp_path, downstream: Downstream) -> None:
    downstream.script("EOD", "451 4.7.0 not now", times=1)
    cfg = relay_config(tmp_path, downstream.port, queue={"retry": ["2s"]})
    relay = Relay(cfg)
    await relay.start()
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    await wait_for(lambda: len(downstream.commands) and data_commands(downstream) >= 1,
                   what="a first attempt")
    await wait_events(relay, 1)
    await relay.stop(deadline=2)
    relay2 = Relay(cfg)
    await relay2.start()
    try:
        entries_before = await relay2.store.list()
        assert len(entries_before) == 1
        assert entries_before[0].recipients[0].state is State.QUEUED
        await downstream.wait_messages(1, timeout=10)
        assert split_received(downstream.messages[0].data)[1] == MESSAGE
    finally:
        await relay2.stop(deadline=2)


async def test_inflight_delivery_is_retried_after_a_crash(tmp_path,
                                                          downstream: Downstream) -> None:
    """A lease left by a process that died mid-delivery goes back to the queue at start."""
    downstream.script("EOD", "stall:30", times=1)
    cfg = relay_config(tmp_path, downstream.port)
    relay = Relay(cfg)
    await relay.start()
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    await wait_for(lambda: data_commands(downstream) >= 1, what="the stalled attempt")
    counts = await relay.store.counts()
    assert counts == {"active": 1}
    # simulate the crash: stop without letting the delivery finish (deadline 0)
    await relay.stop(deadline=0)
    relay2 = Relay(cfg)
    await relay2.start()
    try:
        await downstream.wait_messages(1, timeout=10)
    finally:
        await relay2.stop(deadline=2)


async def test_expired_after_lifetime(downstream: Downstream, start_relay) -> None:
    downstream.script("RCPT", "450 4.2.1 mailbox busy", times=None, match="r@example.net")
    relay = await start_relay(downstream.port, queue={"retry": ["100ms"], "lifetime": "500ms"})
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)

    [notice] = await downstream.wait_messages(1)
    assert notice.mail_from == "" and notice.rcpt_tos == ["app@example.com"]
    assert b"Action: failed" in notice.data and b"Status: 4.2.1" in notice.data
    events = [e for e in await wait_events(relay, 3) if e[1] == "r@example.net"]
    assert events[-1][2] == "expired"
    assert {e[2] for e in events[:-1]} == {"deferred"}
    await wait_events(relay, len(events) + 1)
    assert await relay.store.list() == []


async def test_null_sender_goes_out_as_empty_path(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    await asyncio.to_thread(smtplib_send, port, "", ["reader@example.net"], MESSAGE)
    await downstream.wait_messages(1)
    assert downstream.messages[0].raw_mail_line.startswith(b"MAIL FROM:<>")
    assert downstream.messages[0].mail_from == ""


@pytest.mark.parametrize("downstream_utf8", [True, False])
async def test_smtputf8_passed_on_or_refused_with_5_6_7(start_relay, downstream_utf8) -> None:
    async with Downstream(smtputf8=downstream_utf8) as ds:
        relay = await start_relay(ds.port)
        port = relay.smtp_addresses[0][1]
        body = ("From: jörg@example.com\r\nSubject: grüße\r\n"
                "Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <u@example.com>\r\n"
                "\r\nschöne grüße\r\n").encode()
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            await c.sendmail("jörg@example.com", ["reader@example.net"], body,
                             mail_options=["SMTPUTF8", "BODY=8BITMIME"])
        if downstream_utf8:
            await ds.wait_messages(1)
            m = ds.messages[0]
            assert m.raw_mail_line.startswith("MAIL FROM:<jörg@example.com>".encode())
            assert "SMTPUTF8" in m.mail_options and "BODY=8BITMIME" in m.mail_options
            assert split_received(m.data)[1] == body
        else:
            ev = await wait_events(relay, 1)
            assert ev[0][2] == "bounced" and "5.6.7" in ev[0][3]
            assert ds.messages == []


async def test_eight_bit_body_refused_when_next_hop_lacks_8bitmime(start_relay) -> None:
    async with Downstream(eightbit=False) as ds:
        relay = await start_relay(ds.port)
        port = relay.smtp_addresses[0][1]
        body = "From: app@example.com\r\nSubject: x\r\n\r\nGrüße\r\n".encode()
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            await c.sendmail("app@example.com", ["r@example.net"], body,
                             mail_options=["BODY=8BITMIME"])
        ev = await wait_events(relay, 1)
        assert ev[0][2] == "bounced" and "5.6.3" in ev[0][3]
        # only the (7-bit) notice to the sender went out, never the 8-bit message
        [notice] = await ds.wait_messages(1)
        assert notice.mail_from == "" and b"Status: 5.6.3" in notice.data
        assert notice.data.isascii()


async def test_connection_refused_is_deferred(start_relay, tmp_path) -> None:
    # a port with nothing listening: bind one and close it
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dead_port = s.getsockname()[1]
    s.close()
    relay = await start_relay(dead_port)
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    ev = await wait_events(relay, 1)
    assert ev[0][2] == "deferred" and "4.4.1" in ev[0][3]
    entries = await relay.store.list()
    assert entries[0].recipients[0].attempts >= 1


async def test_drop_mid_data_is_deferred_not_lost(downstream: Downstream, start_relay) -> None:
    downstream.script("EOD", "drop", times=1)
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
        await c.sendmail("app@example.com", ["r@example.net"], MESSAGE)
    await downstream.wait_messages(1, timeout=10)
    events = [e[2] for e in await wait_events(relay, 2)]
    assert events == ["deferred", "delivered"]


async def test_no_notice_about_a_message_from_the_null_sender(downstream: Downstream,
                                                              start_relay) -> None:
    """RFC 5321 6.1 / case 11: a bounce of a bounce is never sent (no loops)."""
    downstream.script("RCPT", "550 5.1.1 no such user", times=None)
    relay = await start_relay(downstream.port)
    port = relay.smtp_addresses[0][1]
    await asyncio.to_thread(smtplib_send, port, "", ["gone@example.net"], MESSAGE)
    [ev] = await wait_events(relay, 1)
    assert ev[2] == "bounced"
    assert await relay.store.list() == []      # nothing new was queued
    assert downstream.messages == []
