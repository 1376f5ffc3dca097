"""RFC 2920 PIPELINING on outbound delivery (relay/outbound/smarthost.py `run_transaction`,
relay/outbound/pipelining.py).

When the next hop advertises PIPELINING, MAIL, every RCPT and DATA leave in one write and
their replies are read in order; every outcome stays what the one-command-at-a-time code
gives. The table below runs each scripted fault twice, with and without PIPELINING, and
wants the same per-recipient outcomes and the same fate of the connection.

Real servers only: the scripted aiosmtpd downstream (recording each read of its socket and
each reply it sends), and for reply patterns aiosmtpd never produces (all replies of a group
in one segment, or one byte at a time; a 354 after every recipient was refused) a plain
asyncio server that answers from a script.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.outbound import RcptResult
from relay.outbound.smarthost import SmarthostDeliverer
from relay.queue import Job, Recipient
from tests.conftest import relay_config
from tests.support.downstream import Downstream, _ScriptedSMTP, self_signed_contexts

BODY = (b"From: a@example.com\r\nSubject: pipelined\r\n\r\n"
        b"first line\r\n.a line that starts with a dot\r\nlast line\r\n")
RCPTS = ("a@example.net", "b@example.net", "c@example.net")


# --- a downstream that records its socket reads and its replies ------------------------

class _WireSMTP(_ScriptedSMTP):
    ds: WireDownstream

    def data_received(self, data: bytes) -> None:
        self.ds.wire.append((self.connection_id, "in", data))
        super().data_received(data)

    async def push(self, status: str | bytes) -> None:
        self.ds.wire.append((self.connection_id, "out", str(status).encode()))
        await super().push(status)


class WireDownstream(Downstream):
    """The scripted downstream; `wire` holds (connection, "in" | "out", bytes): each read
    of the socket as it came, and each reply as it was sent."""

    def __init__(self, *, pipelining: bool, **kw: object) -> None:
        super().__init__(ehlo_extra=["PIPELINING"] if pipelining else [], **kw)  # type: ignore[arg-type]
        self.wire: list[tuple[int, str, bytes]] = []

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _WireSMTP(self, loop), self.host, 0,
                                                ssl=self.tls_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def reads(self, connection: int = 1) -> list[bytes]:
        return [data for conn, way, data in self.wire if conn == connection and way == "in"]


@pytest.fixture
async def deliverers(tmp_path: Path) -> AsyncIterator[list[SmarthostDeliverer]]:
    made: list[SmarthostDeliverer] = []
    yield made
    for deliverer in made:
        await deliverer.close()


def make_deliverer(made: list[SmarthostDeliverer], tmp_path: Path, port: int,
                   **outbound: object) -> SmarthostDeliverer:
    cfg = relay_config(tmp_path, port, outbound=dict(outbound))
    deliverer = SmarthostDeliverer(cfg.outbound, "relay.test")
    made.append(deliverer)
    return deliverer


def job(*rcpts: str, queue_id: str = "Q1", body: bytes = BODY) -> Job:
    return Job(queue_id, "a@example.com", body, time.time(), False, False,
               [Recipient(i, r) for i, r in enumerate(rcpts, start=1)])


def outcome(result: RcptResult) -> str:
    """"250 2.0.0" for a reply of the server; "lost" / "timeout" for the relay's own."""
    reply = result.reply
    if reply.text.startswith("Connection to next hop lost"):
        return "lost"
    if reply.text.startswith("Timeout talking to next hop"):
        return "timeout"
    return f"{reply.code} {reply.enhanced}"


def outcomes(results: list[RcptResult]) -> dict[str, str]:
    return {r.recipient.address: outcome(r) for r in results}


# --- the group really is pipelined ---------------------------------------------------------

async def test_mail_rcpts_and_data_arrive_in_one_read(tmp_path, deliverers) -> None:
    async with WireDownstream(pipelining=True) as ds:
        deliverer = make_deliverer(deliverers, tmp_path, ds.port)
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == dict.fromkeys(RCPTS, "250 2.0.0")
        assert all(r.counts for r in results)
        group = (b"MAIL FROM:<a@example.com>\r\n"
                 + b"".join(b"RCPT TO:<%s>\r\n" % r.encode() for r in RCPTS)
                 + b"DATA\r\n")
        reads = ds.reads(1)
        # one read of the socket held the whole group, nothing else: no reply came between
        assert group in reads
        index = next(i for i, (_, way, data) in enumerate(ds.wire) if data == group)
        # before it: EHLO in, and out only the greeting and the EHLO reply's lines
        assert [d for _, way, d in ds.wire[:index] if way == "in"] == [b"EHLO relay.test\r\n"]
        replies_before = [d for _, way, d in ds.wire[:index] if way == "out"]
        assert replies_before[0].startswith(b"220 ") and replies_before[-1] == b"250 HELP"
        assert all(d.startswith(b"250-") for d in replies_before[1:-1])
        [msg] = ds.messages
        assert msg.rcpt_tos == list(RCPTS)
        assert msg.data == BODY              # dot-stuffed on the wire, unstuffed there

        # the session stays in step: the next transaction goes on the same connection
        results = await deliverer.deliver(job("d@example.net", queue_id="Q2"))
        assert outcomes(results) == {"d@example.net": "250 2.0.0"}
        assert ds.connections_opened == 1
        assert b"MAIL FROM:<a@example.com>\r\nRCPT TO:<d@example.net>\r\nDATA\r\n" \
            in ds.reads(1)


async def test_without_pipelining_one_command_per_round_trip(tmp_path, deliverers) -> None:
    async with WireDownstream(pipelining=False) as ds:
        deliverer = make_deliverer(deliverers, tmp_path, ds.port)
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == dict.fromkeys(RCPTS, "250 2.0.0")
        reads = ds.reads(1)
        assert b"MAIL FROM:<a@example.com>\r\n" in reads
        assert b"RCPT TO:<a@example.net>\r\n" in reads
        assert b"DATA\r\n" in reads


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_pipelined_over_tls(tmp_path, deliverers, mode) -> None:
    server_ctx, client_ctx = self_signed_contexts("localhost")
    kw = {"starttls_context": server_ctx} if mode == "starttls" else {"tls_context": server_ctx}
    async with WireDownstream(pipelining=True, **kw) as ds:
        ds.script("RCPT", "550 5.1.1 no such user", match="<b@")
        ca = tmp_path / "ca.pem"
        ca.write_text(ssl.DER_cert_to_PEM_cert(client_ctx.get_ca_certs(binary_form=True)[0]))
        deliverer = make_deliverer(deliverers, tmp_path, ds.port, tls=mode,
                                   smarthost=f"localhost:{ds.port}", tls_ca_file=str(ca))
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == {"a@example.net": "250 2.0.0",
                                     "b@example.net": "550 5.1.1",
                                     "c@example.net": "250 2.0.0"}
        assert results[0].tls.startswith("TLSv1")
        assert b"MAIL FROM:<a@example.com>\r\nRCPT TO:<a@example.net>\r\n" \
               b"RCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n" in ds.reads(1)
        results = await deliverer.deliver(job("d@example.net", queue_id="Q2"))
        assert outcomes(results) == {"d@example.net": "250 2.0.0"}
        assert ds.connections_opened == 1
        assert [m.tls for m in ds.messages] == [True, True]


# --- the same outcomes with and without PIPELINING ---------------------------------------

@dataclass(frozen=True)
class Case:
    scripts: tuple[tuple[str, str, str | None], ...]   # (stage, reply or action, match)
    expected: dict[str, str]
    reused: bool                     # the next transaction goes on the same connection
    rset: bool = False               # and an RSET comes first


ALL_250 = dict.fromkeys(RCPTS, "250 2.0.0")
CASES = {
    "delivered": Case((), ALL_250, True),
    "one RCPT refused": Case(
        (("RCPT", "550 5.1.1 no such user", "<b@"),),
        {"a@example.net": "250 2.0.0", "b@example.net": "550 5.1.1",
         "c@example.net": "250 2.0.0"}, True),
    "two RCPT refused, multi-line": Case(
        (("RCPT", "550-5.1.1 no such user\r\n550 5.1.1 here", "<a@"),
         ("RCPT", "452 4.2.2 mailbox full", "<c@")),
        {"a@example.net": "550 5.1.1", "b@example.net": "250 2.0.0",
         "c@example.net": "452 4.2.2"}, True),
    # RFC 2920 3.1: DATA is answered 503 then; that reply is nobody's outcome; RSET follows
    "every RCPT refused": Case(
        (("RCPT", "550 5.1.1 no such user", "<a@"), ("RCPT", "451 4.3.0 greylisted", "<b@"),
         ("RCPT", "452 4.2.2 mailbox full", "<c@")),
        {"a@example.net": "550 5.1.1", "b@example.net": "451 4.3.0",
         "c@example.net": "452 4.2.2"}, True, rset=True),
    "MAIL refused": Case(
        (("MAIL", "550 5.7.1 sender refused by policy", None),),
        dict.fromkeys(RCPTS, "550 5.7.1"), True, rset=True),
    "MAIL deferred": Case(
        (("MAIL", "451 4.3.0 try again later", None),),
        dict.fromkeys(RCPTS, "451 4.3.0"), True, rset=True),
    "421 at MAIL": Case((("MAIL", "421-close", None),), dict.fromkeys(RCPTS, "421 4.3.2"),
                        False),
    # the accepted a@ is deferred with the others, not left without a result
    "421 after the first RCPT": Case(
        (("RCPT", "421-close", "<b@"),), dict.fromkeys(RCPTS, "421 4.3.2"), False),
    "DATA refused": Case(
        (("DATA", "451 4.3.0 not now", None),), dict.fromkeys(RCPTS, "451 4.3.0"), True,
        rset=True),
    "drop at DATA": Case((("DATA", "drop", None),), dict.fromkeys(RCPTS, "lost"), False),
    "drop after the final dot": Case((("EOD", "drop", None),), dict.fromkeys(RCPTS, "lost"),
                                     False),
    "421 after the final dot": Case(
        (("EOD", "421-close", None),), dict.fromkeys(RCPTS, "421 4.3.2"), False),
    "message refused": Case(
        (("EOD", "550 5.7.1 message refused", None),), dict.fromkeys(RCPTS, "550 5.7.1"),
        True, rset=True),
    "RCPT reply too slow": Case(
        (("RCPT", "stall:1.5", "<b@"),), dict.fromkeys(RCPTS, "timeout"), False),
    "final reply too slow": Case(
        (("EOD", "stall:1.5", None),), dict.fromkeys(RCPTS, "timeout"), False),
}


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("name", list(CASES))
async def test_outcomes_do_not_depend_on_pipelining(tmp_path, deliverers, name,
                                                    pipelining) -> None:
    case = CASES[name]
    async with WireDownstream(pipelining=pipelining) as ds:
        for stage, action, match in case.scripts:
            ds.script(stage, action, match=match)
        deliverer = make_deliverer(deliverers, tmp_path, ds.port, command_timeout="500ms")
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == case.expected
        assert len(results) == len(RCPTS)
        assert all(r.counts for r in results)
        after = await deliverer.deliver(job("d@example.net", queue_id="Q2"))
        assert outcomes(after) == {"d@example.net": "250 2.0.0"}
        assert ds.connections_opened == (1 if case.reused else 2)
        if case.reused:
            verbs = [line[:4].upper() for conn, line in ds.commands if conn == 1]
            second_mail = verbs.index(b"MAIL", verbs.index(b"MAIL") + 1)
            assert (verbs[second_mail - 1] == b"RSET") == case.rset


# --- stale pooled connections are still retried, not counted ---------------------------

@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("closing", ["421", "silent"])
async def test_connection_closed_while_pooled_is_retried(tmp_path, deliverers, closing,
                                                         pipelining) -> None:
    async with WireDownstream(pipelining=pipelining) as ds:
        deliverer = make_deliverer(deliverers, tmp_path, ds.port)
        assert outcomes(await deliverer.deliver(job("a@example.net"))) == {
            "a@example.net": "250 2.0.0"}
        await ds.wait_until(lambda: all(p.idle for p in ds._live.values()), what="idle")
        # Closed by the server, and delivered again before the relay's loop saw it: the
        # pooled connection looks alive at acquire and fails at its first reply.
        if closing == "421":
            assert ds.close_idle_connections_with_421() == 1
        else:
            assert ds.drop_all_connections() == 1
        results = await deliverer.deliver(job("b@example.net", queue_id="Q2"))
        assert outcomes(results) == {"b@example.net": "250 2.0.0"}
        assert ds.connections_opened == 2
        assert [m.connection_id for m in ds.messages] == [1, 2]


# --- reply patterns aiosmtpd does not produce, from a plain scripted server -----------------

class ScriptServer:
    """Greets, answers EHLO with PIPELINING, then for each step reads up to its marker and
    writes its bytes (at once, or one byte at a time when `dribble`); afterwards answers
    RSET/QUIT/anything with 250/221 until the client hangs up. `seen` is every byte read."""

    def __init__(self, steps: list[tuple[bytes, bytes]], *, dribble: bool = False) -> None:
        self.steps = steps
        self.dribble = dribble
        self.seen = bytearray()
        self.connections = 0
        self.ended = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _send(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        if not self.dribble:
            writer.write(data)
            await writer.drain()
            return
        for i in range(len(data)):
            writer.write(data[i:i + 1])
            await writer.drain()
            await asyncio.sleep(0)

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       ) -> None:
        self.connections += 1
        try:
            writer.write(b"220 script.test ESMTP\r\n")
            self.seen += await reader.readuntil(b"\r\n")
            writer.write(b"250-script.test\r\n250 PIPELINING\r\n")
            for marker, reply in self.steps:
                self.seen += await reader.readuntil(marker)
                await self._send(writer, reply)
            while line := await reader.readline():
                self.seen += line
                if line.upper().startswith(b"QUIT"):
                    writer.write(b"221 bye\r\n")
                    break
                writer.write(b"250 ok\r\n")
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.ended.set()


GROUP_REPLIES = (b"250 2.1.0 sender ok\r\n"
                 b"250-2.1.5 first line\r\n250 2.1.5 recipient ok\r\n"
                 b"550-5.1.1 no such\r\n550 5.1.1 user\r\n"
                 b"250 2.1.5 ok\r\n"
                 b"354 go ahead\r\n")


@pytest.mark.parametrize("dribble", [False, True], ids=["one-segment", "byte-by-byte"])
async def test_replies_in_one_segment_or_byte_by_byte(tmp_path, deliverers, dribble) -> None:
    steps = [(b"DATA\r\n", GROUP_REPLIES), (b"\r\n.\r\n", b"250 2.0.0 queued as X\r\n")]
    async with ScriptServer(steps, dribble=dribble) as server:
        deliverer = make_deliverer(deliverers, tmp_path, server.port)
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == {"a@example.net": "250 2.0.0",
                                     "b@example.net": "550 5.1.1",
                                     "c@example.net": "250 2.0.0"}
        [refused] = [r for r in results if r.recipient.address == "b@example.net"]
        assert str(refused.reply) == "550 5.1.1 no such user"   # both lines, one reply
        assert deliverer.pool.open_now == 1    # in step: kept for the next transaction
    # the body went out dot-stuffed, once
    assert bytes(server.seen).count(b"\r\n..a line that starts with a dot\r\n") == 1


async def test_354_after_every_recipient_refused_hangs_up(tmp_path, deliverers) -> None:
    # RFC 2920 3.1: DATA's reply must be checked even when no RCPT was accepted; a server
    # that says 354 then gets no message (a message to nobody), the session is closed.
    refused = (b"250 sender ok\r\n" + b"550 5.1.1 no such user\r\n" * len(RCPTS)
               + b"354 go ahead anyway\r\n")
    async with ScriptServer([(b"DATA\r\n", refused)]) as server:
        deliverer = make_deliverer(deliverers, tmp_path, server.port)
        results = await deliverer.deliver(job(*RCPTS))
        assert outcomes(results) == dict.fromkeys(RCPTS, "550 5.1.1")
        await asyncio.wait_for(server.ended.wait(), 5)
        assert deliverer.pool.open_now == 0
    assert bytes(server.seen).endswith(b"DATA\r\n")   # nothing after DATA: no body, no dot


# --- the DATA bytes ------------------------------------------------------------------------

@settings(max_examples=5000, deadline=None)
@given(st.lists(st.sampled_from([b"\r\n", b"\r", b"\n", b".", b"..", b"a", b" ", b"\r\n."]),
                max_size=20))
def test_data_on_wire_is_what_aiosmtplib_sends(pieces: list[bytes]) -> None:
    """The fast path (CRLF-only messages) and the fallback give aiosmtplib's own bytes:
    its line-ending normalisation, its dot-stuffing, then the final dot."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    from relay.outbound.pipelining import data_on_wire

    body = b"".join(pieces)
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"
    assert data_on_wire(body) == expected, body


def test_data_on_wire_of_a_large_clean_message() -> None:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    from relay.outbound.pipelining import data_on_wire

    body = b"From: a@example.com\r\n\r\n" + b"".join(
        (b"." if i % 7 == 0 else b"") + b"line %d of text\r\n" % i for i in range(5000))
    wire = data_on_wire(body)
    assert wire == PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"
    assert wire.count(b"\r\n..line") == len(range(0, 5000, 7))


_PARTS = [b"\r\n", b"\r", b"\n", b".", b"a", b" ", b"\r\n.", b"\r\n\r\n", b"X: y"]


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
       st.lists(st.lists(st.sampled_from(_PARTS), max_size=8), min_size=4, max_size=4),
       st.lists(st.lists(st.sampled_from(_PARTS), max_size=8), min_size=4, max_size=4))
def test_data_on_wire_reuses_a_prepared_body_only_when_it_is_the_same(
        picks: list[tuple[int, int]], heads: list[list[bytes]],
        bodies: list[list[bytes]]) -> None:
    """Copies share their body part: the prepared DATA bytes of the last one are reused.
    Over sequences of messages made of a few header sections and a few bodies (repeated,
    alternating, clean or not), every result is still aiosmtplib's own."""
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    from relay.outbound.pipelining import data_on_wire

    for h, b in picks:
        message = b"From: a@b\r\n" + b"".join(heads[h]) + b"\r\n\r\n" + b"".join(bodies[b])
        expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message)) + b".\r\n"
        assert data_on_wire(message) == expected, message
