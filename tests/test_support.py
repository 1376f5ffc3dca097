"""Tests of the test harness itself: tests/support/downstream.py and transcript.py."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiosmtplib
import pytest

from tests.support.downstream import Downstream, format_reply, self_signed_contexts
from tests.support.transcript import Reply, decode_line, parse, play

CASES = Path(__file__).resolve().parents[2] / "shared" / "cases"  # as in conftest.py
if not CASES.is_dir():
    CASES = Path(__file__).resolve().parents[1] / ".." / "shared" / "cases"
CASE_FILES = sorted(CASES.glob("*.smtp"))


def case(prefix: str) -> Path:
    """The .smtp file of case *prefix* ("05")."""
    (path,) = CASES.glob(f"{prefix}-*.smtp")
    return path


class RawClient:
    """A bare asyncio SMTP client: writes exactly the bytes it is given."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        client = cls(reader, writer)
        assert (await client.reply()).startswith(b"220 ")
        return client

    async def reply(self) -> bytes:
        """One full reply, all lines with CRLF; b"" if the server closed."""
        data = b""
        while True:
            line = await asyncio.wait_for(self.reader.readline(), 5)
            data += line
            if not line.endswith(b"\n") or line[3:4] != b"-":
                return data

    async def cmd(self, line: bytes) -> bytes:
        self.writer.write(line)
        return await self.reply()

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


async def send_message(client: RawClient, mail: bytes, rcpts: list[bytes], body: bytes) -> bytes:
    """Run one transaction; returns the reply to the final dot."""
    assert (await client.cmd(mail)).startswith(b"250 ")
    for rcpt in rcpts:
        await client.cmd(rcpt)
    assert (await client.cmd(b"DATA\r\n")).startswith(b"354 ")
    return await client.cmd(body + b".\r\n")


# -- Downstream ------------------------------------------------------------------


@pytest.mark.asyncio
async def test_null_sender_recorded_byte_for_byte() -> None:
    async with Downstream() as ds:
        client = await RawClient.connect(ds.port)
        ehlo = await client.cmd(b"EHLO client.test\r\n")
        assert b"250-8BITMIME" in ehlo and b"250-SMTPUTF8" in ehlo and b"SIZE" not in ehlo
        assert b"AUTH" not in ehlo
        assert await client.cmd(b"AUTH PLAIN\r\n") == b"502 5.5.1 AUTH not supported\r\n"
        reply = await send_message(
            client, b"MAIL FROM:<>\r\n", [b'RCPT TO:<"odd user"@example.net>\r\n'],
            b"Subject: x\r\n\r\n..dot\r\n",
        )
        assert reply == b"250 2.0.0 OK queued\r\n"
        assert await client.cmd(b"QUIT\r\n") == b"221 Bye\r\n"
        await client.close()
        (msg,) = ds.messages
    assert msg.raw_mail_line == b"MAIL FROM:<>\r\n"
    assert msg.mail_from == "" and msg.mail_options == []
    assert msg.rcpt_tos == ['"odd user"@example.net']
    assert msg.raw_rcpt_lines == [b'RCPT TO:<"odd user"@example.net>\r\n']
    assert msg.data == b"Subject: x\r\n\r\n.dot\r\n"
    assert msg.connection_id == 1 and not msg.tls
    assert (1, b"MAIL FROM:<>\r\n") in ds.commands
    assert [line for _, line in ds.commands][-2:] == [b"DATA\r\n", b"QUIT\r\n"]


@pytest.mark.asyncio
async def test_paths_and_options_kept_as_sent() -> None:
    """aiosmtpd would normalise these (drop quotes, the source route, upper-case)."""
    async with Downstream() as ds:
        client = await RawClient.connect(ds.port)
        await client.cmd(b"EHLO client.test\r\n")
        await send_message(
            client, "MAIL FROM:<jörg@example.com> body=8BITMIME SMTPUTF8\r\n".encode(),
            [b'RCPT TO:<"abc"@example.net>\r\n', b"RCPT TO:<@hop.example.org:r@example.net>\r\n"],
            b"hi\r\n",
        )
        await client.close()
    (msg,) = ds.messages
    assert msg.mail_from == "jörg@example.com"
    assert msg.mail_options == ["body=8BITMIME", "SMTPUTF8"]
    assert msg.rcpt_tos == ['"abc"@example.net', "@hop.example.org:r@example.net"]


@pytest.mark.asyncio
async def test_scripted_550_for_matched_recipient_only() -> None:
    async with Downstream() as ds:
        ds.script("RCPT", "550-5.1.1 no such user\r\n550 5.1.1 here", match="b@example.net")
        client = await RawClient.connect(ds.port)
        await client.cmd(b"EHLO client.test\r\n")
        await client.cmd(b"MAIL FROM:<s@example.com>\r\n")
        replies = [
            await client.cmd(b"RCPT TO:<%s@example.net>\r\n" % name) for name in (b"a", b"b", b"c")
        ]
        assert replies == [
            b"250 OK\r\n", b"550-5.1.1 no such user\r\n550 5.1.1 here\r\n", b"250 OK\r\n",
        ]
        assert (await client.cmd(b"DATA\r\n")).startswith(b"354")
        assert await client.cmd(b"hi\r\n.\r\n") == b"250 2.0.0 OK queued\r\n"
        # times=1: the rule is used up
        await client.cmd(b"MAIL FROM:<s@example.com>\r\n")
        assert await client.cmd(b"RCPT TO:<b@example.net>\r\n") == b"250 OK\r\n"
        await client.close()
    assert ds.messages[0].rcpt_tos == ["a@example.net", "c@example.net"]
    assert ds.messages[0].raw_rcpt_lines == [
        b"RCPT TO:<a@example.net>\r\n", b"RCPT TO:<c@example.net>\r\n",
    ]


@pytest.mark.asyncio
async def test_multi_line_replies_and_eod_script() -> None:
    async with Downstream() as ds:
        ds.script("MAIL", "451 4.3.0 try\r\n451 4.3.0 later")  # no "-": normalised
        ds.script("EOD", "552 5.3.4 too big", match="x@example.net")
        ds.script("EHLO", "250-mx.example.net\r\n250-SIZE 10300\r\n250 8BITMIME\r\n")
        client = await RawClient.connect(ds.port)
        ehlo = await client.cmd(b"EHLO client.test\r\n")
        assert ehlo == b"250-mx.example.net\r\n250-SIZE 10300\r\n250 8BITMIME\r\n"
        assert await client.cmd(b"MAIL FROM:<s@example.com>\r\n") == (
            b"451-4.3.0 try\r\n451 4.3.0 later\r\n"
        )
        assert await send_message(
            client, b"MAIL FROM:<s@example.com>\r\n", [b"RCPT TO:<x@example.net>\r\n"], b"a\r\n"
        ) == b"552 5.3.4 too big\r\n"
        assert await send_message(
            client, b"MAIL FROM:<s@example.com>\r\n", [b"RCPT TO:<y@example.net>\r\n"], b"b\r\n"
        ) == b"250 2.0.0 OK queued\r\n"
        await client.close()
    assert [m.rcpt_tos for m in ds.messages] == [["y@example.net"]]
    assert format_reply("250") == "250"
    assert format_reply("550-a\n550 b\n") == "550-a\r\n550 b"


@pytest.mark.asyncio
async def test_drop_closes_without_reply_then_next_connection_works() -> None:
    async with Downstream() as ds:
        ds.script("RCPT", "drop")
        client = await RawClient.connect(ds.port)
        await client.cmd(b"EHLO client.test\r\n")
        await client.cmd(b"MAIL FROM:<s@example.com>\r\n")
        assert await client.cmd(b"RCPT TO:<a@example.net>\r\n") == b""
        await client.close()
        await ds.wait_until(lambda: ds.open_connections == 0, what="close")
        client = await RawClient.connect(ds.port)
        await client.cmd(b"EHLO client.test\r\n")
        await send_message(
            client, b"MAIL FROM:<s@example.com>\r\n", [b"RCPT TO:<a@example.net>\r\n"], b"x\r\n"
        )
        await client.close()
        assert ds.connections_opened == 2 and ds.max_concurrent == 1
        assert [m.connection_id for m in ds.messages] == [2]


@pytest.mark.asyncio
async def test_greeting_421_close_and_stall() -> None:
    async with Downstream() as ds:
        ds.script("connect", "554 5.3.2 no service")
        ds.script("MAIL", "stall:0.2")
        ds.script("RCPT", "421-close")
        reader, writer = await asyncio.open_connection("127.0.0.1", ds.port)
        assert await reader.readline() == b"554 5.3.2 no service\r\n"
        client = RawClient(reader, writer)
        await client.cmd(b"EHLO client.test\r\n")
        started = time.monotonic()
        assert await client.cmd(b"MAIL FROM:<s@example.com>\r\n") == b"250 OK\r\n"
        assert time.monotonic() - started >= 0.2
        assert await client.cmd(b"RCPT TO:<a@example.net>\r\n") == b"421 4.3.2 closing\r\n"
        assert await client.reply() == b""
        await client.close()


@pytest.mark.asyncio
async def test_idle_421_only_between_transactions_and_concurrency() -> None:
    async with Downstream() as ds:
        idle = await RawClient.connect(ds.port)
        await idle.cmd(b"EHLO client.test\r\n")
        busy = await RawClient.connect(ds.port)
        await busy.cmd(b"EHLO client.test\r\n")
        await busy.cmd(b"MAIL FROM:<s@example.com>\r\n")
        assert ds.max_concurrent == 2
        assert ds.close_idle_connections_with_421() == 1
        assert await idle.reply() == b"421 4.4.2 idle timeout\r\n"
        assert await idle.reply() == b""
        assert await busy.cmd(b"RCPT TO:<a@example.net>\r\n") == b"250 OK\r\n"
        assert ds.drop_all_connections() == 1
        assert await busy.reply() == b""
        await idle.close()
        await busy.close()


@pytest.mark.asyncio
async def test_session_is_idle_once_the_message_is_published() -> None:
    async with Downstream() as ds:
        client = await RawClient.connect(ds.port)
        await client.cmd(b"EHLO client.test\r\n")
        await client.cmd(b"MAIL FROM:<s@example.com>\r\n")
        await client.cmd(b"RCPT TO:<a@example.net>\r\n")
        await client.cmd(b"DATA\r\n")
        client.writer.write(b"hi\r\n.\r\n")  # do not read the reply yet
        await ds.wait_messages(1)
        assert ds.close_idle_connections_with_421() == 1
        assert await client.reply() == b"250 2.0.0 OK queued\r\n"
        assert await client.reply() == b"421 4.4.2 idle timeout\r\n"
        assert await client.reply() == b""
        await client.close()
        await ds.wait_until(lambda: ds.open_connections == 0, what="close")


@pytest.mark.asyncio
async def test_size_limit_and_no_8bitmime() -> None:
    async with Downstream(size_limit=100, eightbit=False, ehlo_extra=["PIPELINING"]) as ds:
        client = await RawClient.connect(ds.port)
        ehlo = await client.cmd(b"EHLO client.test\r\n")
        assert b"250-SIZE 100\r\n" in ehlo and b"250-PIPELINING\r\n" in ehlo
        assert b"8BITMIME" not in ehlo
        assert (await client.cmd(b"MAIL FROM:<s@example.com> SIZE=500\r\n")).startswith(b"552")
        assert (await client.cmd(b"MAIL FROM:<s@example.com> BODY=8BITMIME\r\n")).startswith(
            b"555"
        )
        reply = await send_message(
            client, b"MAIL FROM:<s@example.com>\r\n", [b"RCPT TO:<a@example.net>\r\n"],
            b"x" * 80 + b"\r\n" + b"y" * 80 + b"\r\n",
        )
        assert reply.startswith(b"552")
        await client.close()
    assert ds.messages == []


@pytest.mark.asyncio
async def test_starttls_auth_and_implicit_tls() -> None:
    server_ctx, client_ctx = self_signed_contexts()
    message = "From: a@example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhi\r\n"
    async with Downstream(starttls_context=server_ctx, auth={"user": "pw"}) as ds:
        await aiosmtplib.send(
            message, sender="a@example.com", recipients=["b@example.net"], hostname="127.0.0.1",
            port=ds.port, start_tls=True, tls_context=client_ctx, username="user", password="pw",
        )
        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await aiosmtplib.send(
                message, sender="a@example.com", recipients=["b@example.net"],
                hostname="127.0.0.1", port=ds.port, start_tls=True, tls_context=client_ctx,
                username="user", password="wrong",
            )
    (msg,) = ds.messages
    assert msg.tls and msg.auth_user == "user"
    async with Downstream(tls_context=server_ctx) as ds:
        await aiosmtplib.send(
            message, sender="a@example.com", recipients=["b@example.net"], hostname="127.0.0.1",
            port=ds.port, use_tls=True, tls_context=client_ctx,
        )
    assert ds.messages[0].tls


# -- transcript parser --------------------------------------------------------------


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.name)
def test_every_case_parses(path: Path) -> None:
    transcript = parse(path)
    assert transcript.steps
    for step in transcript.steps:
        assert step[0] in {"send", "close", "tls", "wait"}
        if step[0] == "send":
            assert step[1] and all(isinstance(chunk, bytes) for chunk in step[1])
            assert b"\\" not in b"".join(step[1])  # every escape decoded


def test_parser_details() -> None:
    assert len(CASE_FILES) >= 16
    long_line = b"x" * 1200 + b"\r\n"
    (content,) = [s[1] for s in parse(case("05")).steps if s[0] == "send" and len(s[1]) > 1]
    assert long_line in content and b"x" * 1201 not in b"".join(content)

    t01 = parse(case("01"))
    assert [len(s[1]) for s in t01.steps] == [1, 1, 1, 1, 16]  # one big pipelined write
    assert b"first body line\n.\r\nMAIL FROM:<ceo@example.org>\r\n" in b"".join(t01.steps[4][1])

    t15 = parse(case("15"))  # the comment splits group 1 from group 2
    assert [len(s[1]) for s in t15.steps] == [1, 11, 4, 1]

    t16 = parse(case("16"))
    filler = b"line of filler text that is exactly sixty-eight octets long.......\r\n"
    assert len(filler) == 68
    assert [b"".join(s[1]).count(filler) for s in t16.steps if len(s[1]) > 1] == [200, 145]
    assert t16.downstream[1] == "250-mx.example.net\r\n250-SIZE 10300\r\n250 8BITMIME\r\n"

    assert parse(case("17")).steps[5] == ("close",)
    assert parse(case("09")).steps[1] == (
        "send", ["MAIL FROM:<jörg@example.com> SMTPUTF8\r\n".encode()],
    )
    assert parse(case("21")).downstream[4] == "[close]"
    assert decode_line(r"a\tb\x00\xff\\{REPEAT:ab:3}") == b"a\tb\x00\xff\\ababab"
    with pytest.raises(ValueError):
        decode_line(r"\q")


def test_reply_parsing() -> None:
    reply = Reply.from_lines(["550-5.1.1 no mailbox;", "550 5.1.1 verify it"])
    assert (reply.code, reply.enhanced) == (550, "5.1.1")
    assert reply.text == "5.1.1 no mailbox;\n5.1.1 verify it"
    assert Reply.from_lines(["550 Rejected: hourly limit"]).enhanced is None
    assert Reply.from_lines(["451 4.7.500 busy"]).enhanced == "4.7.500"


# -- player against a real SMTP server (the Downstream) ------------------------------


def codes(connections: list[list[Reply]]) -> list[list[int]]:
    return [[reply.code for reply in replies] for replies in connections]


@pytest.mark.asyncio
async def test_play_quoted_local_parts() -> None:
    async with Downstream() as ds:
        result = await play(parse(case("12")), ds.host, ds.port, timeout=5)
    assert codes(result) == [[220, 250, 250, 250, 250, 354, 250, 221]]
    assert ds.messages[0].rcpt_tos == ['"odd user"@example.net', '"a@b"@example.net']


@pytest.mark.asyncio
async def test_play_source_route() -> None:
    async with Downstream() as ds:
        result = await play(parse(case("26")), ds.host, ds.port, timeout=5)
    assert codes(result) == [[220, 250, 250, 250, 553, 354, 250, 221]]
    assert ds.messages[0].rcpt_tos == ["@hop1.example.org,@hop2.example.org:reader@example.net"]


@pytest.mark.asyncio
async def test_play_pipelined_groups_with_and_without_354() -> None:
    async with Downstream() as ds:
        result = await play(parse(case("15")), ds.host, ds.port, timeout=5)
        assert codes(result) == [[220, 250, 250, 250, 250, 553, 354, 250, 250, 250, 354, 250, 221]]
        assert [m.data for m in ds.messages][1] == b""
    async with Downstream() as ds:
        ds.script("RCPT", "550 5.1.1 gone", match="gone@", times=None)
        result = await play(parse(case("15")), ds.host, ds.port, timeout=5)
    # group 2: DATA refused (503), so ".\r\n" is a command line and owes its own reply
    assert codes(result) == [[220, 250, 250, 250, 550, 553, 354, 250, 250, 550, 503, 500, 221]]


@pytest.mark.asyncio
async def test_play_smuggling_case_reads_one_end_of_data() -> None:
    async with Downstream() as ds:
        result = await play(parse(case("01")), ds.host, ds.port, timeout=5)
    assert codes(result) == [[220, 250, 250, 250, 354, 250, 221]]
    (msg,) = ds.messages
    assert b"\n.\r\nMAIL FROM:<ceo@example.org>\r\n" in msg.data


@pytest.mark.asyncio
async def test_play_auth_exchange() -> None:
    async with Downstream(auth={"relayuser": "example-password"}) as ds:
        result = await play(parse(case("19")), ds.host, ds.port, timeout=5)
    assert codes(result) == [[220, 250, 530, 501, 334, 501, 501, 334, 235, 503, 250, 221]]


@pytest.mark.asyncio
async def test_play_client_close_mid_data_then_new_connection() -> None:
    async with Downstream() as ds:
        result = await play(parse(case("17")), ds.host, ds.port, timeout=5)
        await ds.wait_until(lambda: ds.open_connections == 0, what="close")
    assert codes(result) == [[220, 250, 250, 250, 354], [220, 250, 250, 250, 354, 250, 221]]
    assert ds.connections_opened == 2
    assert [b"after the drop" in m.data for m in ds.messages] == [True]


@pytest.mark.asyncio
async def test_play_stops_reading_when_server_closes() -> None:
    async with Downstream() as ds:
        ds.script("RCPT", "421 4.7.0 [TSS04] deferred")
        result = await play(parse(case("21")), ds.host, ds.port, timeout=5)
    assert codes(result) == [[220, 250, 250, 421]]


@pytest.mark.asyncio
async def test_play_timeout_names_what_it_awaited() -> None:
    async with Downstream() as ds:
        ds.script("EHLO", "stall:3")
        with pytest.raises(AssertionError, match="EHLO client.example.net"):
            await play(parse(case("12")), ds.host, ds.port, timeout=0.3)
