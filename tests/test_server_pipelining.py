"""Replies to a pipelined group share one write; nothing waits while the client waits.

RFC 2920 3.1: the server may buffer the replies of a group, but must send them before it
waits for more input. The edge holds a reply to MAIL, RCPT, RSET, NOOP or the end of DATA
only while the next command line is already read in whole, and writes the lines of its EHLO
reply at once. These tests record the session's writes (each write is one send).
"""

from __future__ import annotations

import asyncio

from relay.app import Relay
from relay.server import RelaySMTP
from tests.support.downstream import Downstream
from tests.support.wire import Wire

BODY = b"From: a@example.com\r\nSubject: t\r\n\r\nhi\r\n.\r\n"
GROUP = b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.net>\r\nDATA\r\n"


async def _session(relay: Relay) -> tuple[Wire, list[bytes]]:
    """A connected client, and the list every server write of its session lands in."""
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    (session,) = relay.edge.sessions
    assert isinstance(session, RelaySMTP)
    writes: list[bytes] = []
    real_write = session._writer.write

    def record(data: bytes) -> None:
        writes.append(bytes(data))
        real_write(data)

    session._writer.write = record  # type: ignore[method-assign]
    return wire, writes


def _codes(write: bytes) -> list[str]:
    return [line[:4].decode() for line in write.split(b"\r\n") if line]


async def _read_replies(wire: Wire, count: int) -> list[str]:
    return [str((await wire.reply(timeout=5)).code) for _ in range(count)]


async def test_pipelined_group_gets_its_replies_in_one_write(downstream: Downstream,
                                                             start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire, writes = await _session(relay)
    ehlo = await wire.cmd("EHLO client.example.net")
    assert "250-PIPELINING" in ehlo.lines
    assert len(writes) == 1 and len(_codes(writes[0])) == len(ehlo.lines)   # EHLO: one write

    writes.clear()
    await wire.send(GROUP)
    first = await asyncio.wait_for(wire.reader.read(65536), 5)   # one read
    assert _codes(first) == ["250 ", "250 ", "354 "]
    assert writes == [first]

    # End of data with the next transaction pipelined behind it (RFC 2920 3.1).
    writes.clear()
    await wire.send(BODY + GROUP)
    assert await _read_replies(wire, 4) == ["250", "250", "250", "354"]
    assert [_codes(w) for w in writes] == [["250 ", "250 ", "250 ", "354 "]]

    # QUIT is never held: its 221 goes out with the 250 before it, then the close.
    writes.clear()
    await wire.send(BODY + b"QUIT\r\n")
    assert await _read_replies(wire, 2) == ["250", "221"]
    assert [_codes(w) for w in writes] == [["250 ", "221 "]]
    assert await wire.closed()
    await wire.close()


async def test_non_pipelining_client_gets_each_reply_at_once(downstream: Downstream,
                                                             start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire, writes = await _session(relay)
    assert (await wire.cmd("EHLO client.example.net")).code == 250
    # Each command waits for its reply (wire.cmd times out otherwise): nothing is held.
    for line, code in [("MAIL FROM:<a@example.com>", 250), ("RCPT TO:<r@example.net>", 250),
                       ("RCPT TO:<bad@>", 553), ("NOOP", 250), ("DATA", 354)]:
        writes.clear()
        assert (await asyncio.wait_for(wire.cmd(line), 2)).code == code
        assert [_codes(w) for w in writes] == [[f"{code} "]]
    writes.clear()
    await wire.send(BODY)
    assert (await wire.reply(timeout=5)).code == 250
    assert len(writes) == 1
    writes.clear()
    assert (await wire.cmd("RSET")).code == 250
    assert len(writes) == 1
    await wire.close()


async def test_replies_are_sent_before_waiting_for_a_partial_command(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire, writes = await _session(relay)
    assert (await wire.cmd("EHLO client.example.net")).code == 250
    # The third command is not complete: the two replies must not wait for it.
    writes.clear()
    await wire.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<r@example.net>\r\nDA")
    assert await _read_replies(wire, 2) == ["250", "250"]
    assert [_codes(w) for w in writes] == [["250 ", "250 "]]
    await wire.send(b"TA\r\n")
    assert (await wire.reply(timeout=5)).code == 354
    await wire.send(BODY)
    assert (await wire.reply(timeout=5)).code == 250
    await wire.close()


async def test_pipelined_refusals_keep_their_order(downstream: Downstream,
                                                   start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire, writes = await _session(relay)
    assert (await wire.cmd("EHLO client.example.net")).code == 250
    writes.clear()
    await wire.send(b"MAIL FROM:<a@example.com>\r\nRCPT TO:<bad@>\r\nRCPT TO:<r@example.net>\r\n"
                    b"RCPT TO:<a b@example.net>\r\nBOGUS\r\nRSET\r\nNOOP\r\nMAIL FROM:<>\r\n"
                    b"DATA\r\nQUIT\r\nNOOP\r\n")
    replies = await _read_replies(wire, 10)
    assert replies == ["250", "553", "250", "501", "500", "250", "250", "250", "503", "221"]
    # Two writes: the 500 to BOGUS is made outside any command and takes the held replies
    # with it; QUIT's 221 is never held. Nothing lost, reordered or repeated.
    assert [_codes(w) for w in writes[:2]] == [["250 ", "553 ", "250 ", "501 ", "500 "],
                                               ["250 ", "250 ", "250 ", "503 ", "221 "]]
    assert await wire.closed()      # nothing was sent after the 221 (the NOOP after QUIT)
    await wire.close()
