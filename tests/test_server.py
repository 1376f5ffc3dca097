"""The edge: EHLO, relay access, limits, syntax, and the durable commit before the 250."""

from __future__ import annotations

import asyncio
import re

import pytest

from relay.app import Relay
from relay.queue.memory import MemoryQueueStore
from tests.conftest import relay_config, wait_events
from tests.support.downstream import Downstream
from tests.support.wire import Wire

BODY = b"From: a@example.com\r\nSubject: t\r\n\r\nhi\r\n.\r\n"


async def open_wire(relay: Relay) -> Wire:
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    assert (await wire.cmd("EHLO client.example.net")).code == 250
    return wire


async def test_ehlo_advertises_the_extensions(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_message_size": "10KiB"})
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    assert wire.greeting.code == 220
    reply = await wire.cmd("EHLO client.example.net")
    keywords = {line[4:].split()[0] for line in reply.lines[1:]}
    assert {"SIZE", "8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES"} <= keywords
    assert "250-SIZE 10240" in reply.lines
    await wire.close()


async def test_client_outside_mynetworks_cannot_relay(downstream: Downstream,
                                                      start_relay) -> None:
    relay = await start_relay(downstream.port, server={"mynetworks": ["192.0.2.0/24"]})
    wire = await open_wire(relay)
    reply = await wire.cmd("MAIL FROM:<a@example.com>")
    assert (reply.code, reply.enhanced) == (550, "5.7.1")
    reply = await wire.cmd("RCPT TO:<victim@example.org>")
    assert reply.code in (503, 550) and reply.enhanced is not None
    await wire.close()
    assert downstream.commands == []


@pytest.mark.parametrize("rcpt, code, enhanced", [
    ("<reader@example.net>", 250, "2.1.5"),
    ('<"odd user"@example.net>', 250, "2.1.5"),
    ("<@hop1.example.org,@hop2.example.org:reader@example.net>", 250, "2.1.5"),
    ("<@route.example.org reader2@example.net>", 553, "5.1.3"),
    ("<bad@>", 553, "5.1.3"),
    ("<no-domain>", 501, "5.1.3"),
    ("<a@example.net.>", 553, "5.1.3"),
    ('<"abc"@example.net> NOTIFY=NEVER', 555, "5.5.4"),
    ("<a@-bad-.example>", 501, "5.1.3"),
    ("<jörg@example.net>", 553, "5.6.7"),        # non-ASCII without SMTPUTF8
    ("<a b@example.net>", 501, "5.1.3"),
    ("<a@[192.0.2.1]>", 250, "2.1.5"),
    ("<a@[300.1.1.1]>", 501, "5.1.3"),
    ("<" + "x" * 65 + "@example.net>", 501, "5.1.3"),
])
async def test_rcpt_syntax(downstream: Downstream, start_relay, rcpt, code, enhanced) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    reply = await wire.cmd(f"RCPT TO:{rcpt}")
    assert (reply.code, reply.enhanced) == (code, enhanced), reply
    await wire.close()


@pytest.mark.parametrize("mail, code, enhanced", [
    ("MAIL FROM:<>", 250, "2.1.0"),
    ("MAIL FROM:<a@example.com> SIZE=20000000", 552, "5.3.4"),
    ("MAIL FROM:<a@example.com> BODY=8BITMIME", 250, "2.1.0"),
    ("MAIL FROM:<a@example.com> BODY=9BIT", 501, "5.5.4"),
    ("MAIL FROM:<a@example.com> FOO=BAR", 555, "5.5.4"),
    ("MAIL FROM:<jörg@example.com>", 553, "5.6.7"),
    ("MAIL FROM:<jörg@example.com> SMTPUTF8", 250, "2.1.0"),
    ("MAIL FROM:a@example.com>", 501, "5.5.4"),
    ("MAIL FROM:<a@example.com", 501, "5.1.7"),
    ("MAIL TO:<a@example.com>", 501, "5.5.4"),
])
async def test_mail_syntax_and_parameters(downstream: Downstream, start_relay, mail, code,
                                          enhanced) -> None:
    relay = await start_relay(downstream.port, server={"max_message_size": "10KiB"})
    wire = await open_wire(relay)
    reply = await wire.cmd(mail)
    assert (reply.code, reply.enhanced) == (code, enhanced), reply
    await wire.close()


async def test_control_character_in_quoted_local_part_is_refused(downstream: Downstream,
                                                                 start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    reply = await wire.cmd(b'RCPT TO:<"a\rb"@example.net>')
    assert reply.code == 501 and reply.enhanced == "5.5.2"
    reply = await wire.cmd(b'RCPT TO:<"a\x00b"@example.net>')
    assert reply.code == 501
    await wire.close()


async def test_max_recipients_gives_452(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_recipients": 2})
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    assert (await wire.cmd("RCPT TO:<r1@example.net>")).code == 250
    assert (await wire.cmd("RCPT TO:<r2@example.net>")).code == 250
    reply = await wire.cmd("RCPT TO:<r3@example.net>")
    assert (reply.code, reply.enhanced) == (452, "4.5.3")
    assert (await wire.cmd("DATA")).code == 354
    await wire.send(BODY)
    assert (await wire.reply()).code == 250
    await downstream.wait_messages(1)
    assert downstream.messages[0].rcpt_tos == ["r1@example.net", "r2@example.net"]
    await wire.close()


async def test_oversized_data_gets_one_552_and_nothing_is_queued(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_message_size": "10KiB"})
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    assert (await wire.cmd("DATA")).code == 354
    await wire.send(b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 68 + b"\r\n") * 200
                    + b".\r\n")
    reply = await wire.reply()
    assert (reply.code, reply.enhanced) == (552, "5.3.4")
    assert (await wire.cmd("NOOP")).code == 250   # exactly one reply for the data
    await wire.close()
    assert await relay.store.list() == []


@pytest.mark.parametrize("body", [
    b"Subject: x\r\n\r\nbare\nlf\r\n",
    b"Subject: x\r\n\r\nbare\rcr\r\n",
    b"Subject: x\n\r\nbody\r\n",
])
async def test_bare_cr_or_lf_is_refused_with_5_6_0(downstream: Downstream, start_relay,
                                                   body) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    await wire.cmd("DATA")
    await wire.send(body + b".\r\n")
    reply = await wire.reply()
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    await wire.close()
    assert await relay.store.list() == []


async def test_queued_reply_only_after_commit_and_names_the_queue_id(
        downstream: Downstream, start_relay) -> None:
    downstream.script("EOD", "451 4.3.0 hold it", times=None)
    relay = await start_relay(downstream.port, queue={"retry": ["1h"]})
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    await wire.cmd("DATA")
    await wire.send(BODY)
    reply = await wire.reply()
    m = re.fullmatch(r"250 2\.0\.0 Ok: queued as ([0-9A-F]+)", reply.lines[0])
    assert m, reply
    # the message is in the SQLite file, readable by a second connection
    import sqlite3
    conn = sqlite3.connect(relay.cfg.queue.path)
    rows = conn.execute("SELECT queue_id FROM messages").fetchall()
    conn.close()
    assert rows == [(m.group(1),)]
    await wire.close()


class FailingStore(MemoryQueueStore):
    async def enqueue(self, msg) -> None:
        raise OSError(28, "No space left on device")


async def test_failed_commit_answers_451_never_250(tmp_path, downstream: Downstream) -> None:
    relay = Relay(relay_config(tmp_path, downstream.port), store=FailingStore())
    await relay.start()
    try:
        wire = await open_wire(relay)
        await wire.cmd("MAIL FROM:<a@example.com>")
        await wire.cmd("RCPT TO:<r@example.net>")
        await wire.cmd("DATA")
        await wire.send(BODY)
        reply = await wire.reply()
        assert (reply.code, reply.enhanced) == (451, "4.3.0")
        assert (await wire.cmd("RSET")).code == 250   # the session survives
        await wire.close()
    finally:
        await relay.stop(deadline=1)


class ExplodingStore(MemoryQueueStore):
    async def enqueue(self, msg) -> None:
        raise RuntimeError("bug")


async def test_handler_exception_is_451_not_500(tmp_path, downstream: Downstream) -> None:
    relay = Relay(relay_config(tmp_path, downstream.port), store=ExplodingStore())
    relay.edge.handler.handle_RCPT = _raise  # a bug in a hook: aiosmtpd would answer 500
    await relay.start()
    try:
        wire = await open_wire(relay)
        await wire.cmd("MAIL FROM:<a@example.com>")
        reply = await wire.cmd("RCPT TO:<r@example.net>")
        assert (reply.code, reply.enhanced) == (451, "4.3.0")
        await wire.close()
    finally:
        await relay.stop(deadline=1)


async def _raise(*args: object) -> str:
    raise RuntimeError("bug in a hook")


async def test_builtin_replies_carry_enhanced_codes(downstream: Downstream,
                                                    start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    for command in ["FOO", "RCPT TO:<r@example.net>", "DATA", "MAIL", "NOOP", "RSET"]:
        reply = await wire.cmd(command)
        assert reply.enhanced is not None, reply
    reply = await wire.cmd("QUIT")
    assert (reply.code, reply.enhanced) == (221, "2.0.0")
    await wire.close()


async def test_shutdown_answers_421_to_new_commands(downstream: Downstream,
                                                    start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    relay.edge.draining = True
    reply = await wire.cmd("MAIL FROM:<a@example.com>")
    assert (reply.code, reply.enhanced) == (421, "4.3.2")
    assert await wire.closed()
    relay.edge.draining = False


async def test_duplicate_recipients_are_delivered_once(downstream: Downstream,
                                                       start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    await wire.cmd("RCPT TO:<r@example.net>")
    await wire.cmd("DATA")
    await wire.send(BODY)
    assert (await wire.reply()).code == 250
    await downstream.wait_messages(1)
    assert downstream.messages[0].rcpt_tos == ["r@example.net"]
    assert len(await wait_events(relay, 1)) == 1
    await wire.close()


async def test_help_lists_the_commands(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    reply = await wire.cmd("HELP")
    assert reply.code == 250 and {"MAIL", "RCPT", "DATA", "EHLO"} <= set(reply.text.split())
    assert (await wire.cmd("HELP MAIL")).code == 250
    await wire.close()


async def test_nul_octet_in_data_is_refused(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    await wire.cmd("DATA")
    await wire.send(b"From: a@example.com\r\nSubject: x\r\n\r\nnul\x00here\r\n.\r\n")
    reply = await wire.reply()
    assert (reply.code, reply.enhanced) == (550, "5.6.0")
    await wire.close()
    assert await relay.store.list() == []


async def test_idle_client_gets_421_then_close(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"command_timeout": "500ms"})
    wire = await open_wire(relay)
    reply = await wire.reply(timeout=5)
    assert (reply.code, reply.enhanced) == (421, "4.4.2")
    assert await wire.closed()


async def test_data_has_its_own_longer_timeout(downstream: Downstream, start_relay) -> None:
    """A client that keeps sending data for longer than command_timeout is not cut off
    while within data_timeout (RFC 5321 4.5.3.2.6)."""
    relay = await start_relay(downstream.port, server={"command_timeout": "500ms",
                                                       "data_timeout": "10s"})
    wire = await open_wire(relay)
    await wire.cmd("MAIL FROM:<a@example.com>")
    await wire.cmd("RCPT TO:<r@example.net>")
    assert (await wire.cmd("DATA")).code == 354
    await wire.send(b"From: a@example.com\r\nSubject: slow\r\n\r\n")
    for _ in range(4):
        await asyncio.sleep(0.3)
        await wire.send(b"a line\r\n")
    await wire.send(b".\r\n")
    assert (await wire.reply()).code == 250
    await wire.close()


async def test_data_memory_budget_pushes_back_with_452(downstream: Downstream,
                                                        start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_message_size": "4MiB",
                                                       "max_data_memory": "4MiB"})
    wires = [await open_wire(relay) for _ in range(3)]
    got = []
    for w, size in zip(wires, ["SIZE=1500000", "", "SIZE=2000000"], strict=True):
        await w.cmd(f"MAIL FROM:<a@example.com> {size}")
        await w.cmd("RCPT TO:<r@example.net>")
        got.append(await w.cmd("DATA"))
    assert [r.code for r in got] == [354, 354, 452]
    assert got[2].enhanced == "4.3.1"
    for w in wires[:2]:
        await w.send(BODY)
        assert (await w.reply()).code == 250
    assert (await wires[2].cmd("DATA")).code == 354   # room again
    for w in wires:
        await w.close()
