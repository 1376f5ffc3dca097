"""Hostile clients: SMTP smuggling, over-long lines, 10,000 recipients, a 100 MB DATA, slow
drip, 1,000 connections, AUTH brute force, header injection, and malformed HTTP requests.

Every one must get a precise reply with an enhanced status code (invariant 7), never crash
the relay, never forward what it should not, and stay within bounded memory (STYLE rule 5).
The memory figures come from /proc/PID/status (VmHWM) of a real `relay serve` process.
"""

from __future__ import annotations

import asyncio
import base64
import email.parser
import email.policy
import re
import resource
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import StartRelay
from tests.policy.test_access_smtp import make_cert
from tests.reliability.proc import RelayProcess, write_config
from tests.support.downstream import Downstream, Received
from tests.support.wire import Wire

HEADER = b"From: a@example.com\r\nTo: r@example.net\r\nSubject: hostile\r\n\r\n"


async def read_replies(wire: Wire, count: int, timeout: float = 10.0) -> list[int]:
    return [(await wire.reply(timeout)).code for _ in range(count)]


async def replies_until_closed(wire: Wire, timeout: float = 15.0) -> list[str]:
    """Every reply line until the server closes the connection."""
    lines: list[str] = []
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        raw = await asyncio.wait_for(wire.reader.readline(), end - time.monotonic())
        if not raw:
            return lines
        lines.append(raw.decode("utf-8", "replace").rstrip("\r\n"))
    raise AssertionError(f"not closed within {timeout}s: {lines}")


async def open_transaction(wire: Wire, rcpt: str = "r@example.net") -> None:
    assert (await wire.cmd("EHLO client.example")).code == 250
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await wire.cmd(f"RCPT TO:<{rcpt}>")).code == 250
    assert (await wire.cmd("DATA")).code == 354


# --- SMTP smuggling ---------------------------------------------------------------------------

SMUGGLED = (b"MAIL FROM:<ceo@example.com>\r\nRCPT TO:<victim@example.org>\r\nDATA\r\n"
            b"From: ceo@example.com\r\nTo: victim@example.org\r\nSubject: smuggled\r\n\r\n"
            b"pay the invoice\r\n")


@pytest.mark.parametrize("end", [b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n", b"\r.\r\n",
                                 b"\n.\r", b"\r\n.\r"],
                         ids=["LF.LF", "CR.CR", "LF.CRLF", "CRLF.LF", "CR.CRLF", "LF.CR",
                              "CRLF.CR"])
async def test_smuggling_with_a_fake_end_of_data(downstream: Downstream, start_relay: StartRelay,
                                                 end: bytes) -> None:
    relay = await start_relay(downstream.port)
    wire = await Wire.open(*relay.smtp_addresses[0])
    await open_transaction(wire)
    # Everything after the fake end is data to the relay; only CRLF.CRLF ends it.
    await wire.send(HEADER + b"innocent" + end + SMUGGLED + b".\r\nQUIT\r\n")
    lines = await replies_until_closed(wire)
    assert len(lines) == 2 and lines[0][:1] == "5" and lines[1].startswith("221"), lines
    assert lines[0].startswith("550 5.6.0"), lines
    await asyncio.sleep(0.3)
    assert downstream.messages == [] and await relay.store.list() == []


@pytest.mark.parametrize("content", [HEADER + b"bare\nLF\r\n", HEADER + b"bare\rCR\r\n",
                                     b"From: a@example.com\nTo: b@example.net\r\n\r\nx\r\n",
                                     HEADER + b"nul\0here\r\n"],
                         ids=["bare-LF", "bare-CR", "bare-LF-in-header", "NUL"])
async def test_bare_line_endings_get_one_refusal(downstream: Downstream,
                                                 start_relay: StartRelay,
                                                 content: bytes) -> None:
    relay = await start_relay(downstream.port)
    wire = await Wire.open(*relay.smtp_addresses[0])
    await open_transaction(wire)
    await wire.send(content + b".\r\nQUIT\r\n")
    lines = await replies_until_closed(wire)
    assert len(lines) == 2 and lines[0].startswith("550 5.6.0") and lines[1].startswith("221")
    await asyncio.sleep(0.2)
    assert downstream.messages == []


# --- long lines -------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [1001, 5000, 70_000, 1_000_000])
async def test_overlong_command_lines(downstream: Downstream, start_relay: StartRelay,
                                      length: int) -> None:
    relay = await start_relay(downstream.port)
    wire = await Wire.open(*relay.smtp_addresses[0])
    assert (await wire.cmd("EHLO client.example")).code == 250
    for line in (b"NOOP " + b"x" * (length - 5),
                 b"MAIL FROM:<" + b"a" * (length - 24) + b"@example.com>",
                 b"RCPT TO:<" + b"a" * (length - 22) + b"@example.net>"):
        reply = await wire.cmd(line)
        assert reply.code in (500, 501, 503, 552, 553) and reply.enhanced, (length, str(reply))
        assert reply.enhanced[0] == "5"
    # The session goes on: a normal transaction works.
    assert (await wire.cmd("RSET")).code == 250
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await wire.cmd("RCPT TO:<r@example.net>")).code == 250
    assert (await wire.cmd("DATA")).code == 354
    assert (await wire.cmd(HEADER + b"ok\r\n.")).code == 250
    await wire.close()
    await downstream.wait_messages(1)


async def test_text_line_limit_counts_without_the_stuffed_dot(downstream: Downstream,
                                                               start_relay: StartRelay) -> None:
    """RFC 5321 4.5.3.1.6: 1000 octets with the CRLF, "not counting the leading dot
    duplicated for transparency": a 998-octet line that starts with "." is sent as 999
    octets and must be accepted; a 999-octet line is refused once, after the final dot."""
    relay = await start_relay(downstream.port)
    wire = await Wire.open(*relay.smtp_addresses[0])
    await open_transaction(wire)
    line = b"." + b"x" * 997                       # 998 octets in the message
    reply = await wire.cmd(HEADER + b"." + line + b"\r\n.")   # dot-stuffed on the wire
    assert reply.code == 250, str(reply)
    [msg] = await downstream.wait_messages(1)
    assert line + b"\r\n" in msg.data
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await wire.cmd("RCPT TO:<r@example.net>")).code == 250
    assert (await wire.cmd("DATA")).code == 354
    reply = await wire.cmd(HEADER + b"y" * 999 + b"\r\n.")
    assert (reply.code, reply.enhanced) == (554, "5.6.0"), str(reply)
    await wire.close()


# --- 10,000 recipients --------------------------------------------------------------------------

async def test_ten_thousand_recipients(downstream: Downstream, start_relay: StartRelay) -> None:
    relay = await start_relay(downstream.port, server={"max_recipients": 1000})
    wire = await Wire.open(*relay.smtp_addresses[0])
    ehlo = await wire.cmd("EHLO client.example")
    assert "250-PIPELINING" in ehlo.lines
    # RFC 2920: pipelined, in one write.
    await wire.send(b"MAIL FROM:<a@example.com>\r\n" + b"".join(
        b"RCPT TO:<r%d@example.net>\r\n" % i for i in range(10_000)))
    mail = await wire.reply()
    assert mail.code == 250
    codes: dict[str, int] = {}
    for _ in range(10_000):
        reply = await wire.reply(30)
        key = f"{reply.code} {reply.enhanced}"
        codes[key] = codes.get(key, 0) + 1
    assert codes == {"250 2.1.5": 1000, "452 4.5.3": 9000}, codes
    assert (await wire.cmd("DATA")).code == 354
    reply = await wire.cmd(HEADER + b"many\r\n.")
    assert reply.code == 250, str(reply)
    await wire.close()
    await downstream.wait_until(lambda: sum(len(m.rcpt_tos) for m in downstream.messages)
                                >= 1000, timeout=30, what="1000 recipients")
    got = [r for m in downstream.messages for r in m.rcpt_tos]
    assert sorted(got) == sorted(f"r{i}@example.net" for i in range(1000))
    print(f"\n10,000 RCPTs: {codes}; one message, its 1000 recipients delivered in "
          f"{len(downstream.messages)} transaction(s)")


# --- a 100 MB DATA against the 25 MB limit, memory bounded ------------------------------------

async def test_hundred_megabyte_data_with_bounded_memory(tmp_path: Path) -> None:
    async with Downstream() as ds:
        cfg, port = write_config(tmp_path, ds.port, server='max_message_size = "25MiB"')
        relay = RelayProcess(cfg)
        try:
            await asyncio.to_thread(relay.wait_started, port)
            idle = relay.status_kib("VmHWM")
            wire = await Wire.open("127.0.0.1", port)
            await open_transaction(wire)
            line = b"x" * 76 + b"\r\n"
            chunk = line * (65536 // len(line))
            total = 0
            started = time.monotonic()
            await wire.send(HEADER)
            while total < 100 * 1024 * 1024:      # streamed: never built in memory
                wire.writer.write(chunk)
                await wire.writer.drain()
                total += len(chunk)
            reply = await wire.cmd(b".")
            elapsed = time.monotonic() - started
            assert (reply.code, reply.enhanced) == (552, "5.3.4"), str(reply)
            assert (await wire.cmd("NOOP")).code == 250      # the session goes on
            assert (await wire.cmd("QUIT")).code == 221
            hwm = relay.status_kib("VmHWM")
        finally:
            relay.stop()
        assert ds.messages == []
        print(f"\n100 MB DATA: 552 5.3.4 after {elapsed:.1f}s; relay VmHWM {hwm / 1024:.0f} MiB "
              f"(idle {idle / 1024:.0f} MiB)")
        assert hwm < 200 * 1024, f"VmHWM {hwm} KiB"


# --- slow drip ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["command", "data"])
async def test_slow_drip_client_is_timed_out(downstream: Downstream, start_relay: StartRelay,
                                             stage: str) -> None:
    relay = await start_relay(downstream.port, server={"command_timeout": "1s",
                                                       "data_timeout": "2s"})
    wire = await Wire.open(*relay.smtp_addresses[0])
    assert (await wire.cmd("EHLO client.example")).code == 250
    if stage == "data":
        assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
        assert (await wire.cmd("RCPT TO:<r@example.net>")).code == 250
        assert (await wire.cmd("DATA")).code == 354
    started = time.monotonic()
    drip = (HEADER + b"x" * 200) if stage == "data" else b"NOOP " + b"x" * 200
    closed_after = None
    got = b""
    for byte in drip:                       # one byte every 0.3 s: bounded by len(drip)
        try:
            wire.writer.write(bytes([byte]))
            await wire.writer.drain()
        except ConnectionError:
            closed_after = time.monotonic() - started
            break
        try:
            got += await asyncio.wait_for(wire.reader.read(1000), 0.3)
        except TimeoutError:
            continue
        if got.endswith(b"\r\n") or not got:
            closed_after = time.monotonic() - started
            break
        if time.monotonic() - started > 10:
            break
    assert closed_after is not None and closed_after < (1.5 if stage == "command" else 2.5) + 1
    assert got.startswith(b"421 4.4.2"), got
    assert await wire.closed(3)
    print(f"\nslow drip during {stage}: 421 4.4.2 after {closed_after:.1f}s")


# --- 1,000 concurrent connections, memory bounded -----------------------------------------------

async def test_thousand_connections_with_bounded_memory(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2500:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    async with Downstream() as ds:
        cfg, port = write_config(tmp_path, ds.port, server="max_sessions = 1000")
        relay = RelayProcess(cfg)
        wires: list[Wire] = []
        try:
            await asyncio.to_thread(relay.wait_started, port)
            idle = relay.status_kib("VmHWM")
            started = time.monotonic()
            for i in range(0, 1000, 100):
                wires += await asyncio.gather(*(Wire.open("127.0.0.1", port, timeout=30)
                                                for _ in range(100)))
            assert len(wires) == 1000
            assert all(w.greeting is not None and w.greeting.code == 220 for w in wires)
            opened = time.monotonic() - started
            # All of them are alive: each answers a command.
            replies = await asyncio.gather(*(w.cmd("NOOP") for w in wires))
            assert {r.code for r in replies} == {250}
            # One more is turned away politely (max_sessions), not left hanging.
            extra = await Wire.open("127.0.0.1", port, timeout=10)
            assert extra.greeting is not None and \
                (extra.greeting.code, extra.greeting.enhanced) == (421, "4.7.0"), extra.greeting
            await extra.close()
            hwm = relay.status_kib("VmHWM")
            rss = relay.status_kib("VmRSS")
            for w in wires:
                await w.close()
            wires = []
            # The relay still works after the crowd has gone.
            await asyncio.sleep(0.5)
            async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as c:
                await c.sendmail("a@example.com", ["r@example.net"], HEADER + b"after\r\n")
            await ds.wait_messages(1)
        finally:
            for w in wires:
                await w.close()
            relay.stop()
        print(f"\n1000 connections: opened in {opened:.1f}s, relay VmHWM {hwm / 1024:.0f} MiB, "
              f"VmRSS {rss / 1024:.0f} MiB (idle {idle / 1024:.0f} MiB)")
        assert hwm < 150 * 1024, f"VmHWM {hwm} KiB"


# --- AUTH brute force ---------------------------------------------------------------------------

PASSWORD = "correct horse battery staple"


async def test_auth_brute_force_is_locked_out(tmp_path: Path, downstream: Downstream,
                                              start_relay: StartRelay,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_APP_PASSWORD", PASSWORD)
    cert, key, client_tls = make_cert(tmp_path)
    relay = await start_relay(downstream.port, server={
        "tls_cert": cert, "tls_key": key, "mynetworks": ["192.0.2.0/24"],
        "auth_max_failures": 3, "auth_lockout": "10m"},
        app=[{"name": "shop", "password_env": "HOSTILE_APP_PASSWORD",
              "from_domains": ["example.com"]}])
    host, port = relay.smtp_addresses[0]
    outcomes: list[tuple[str, int, str]] = []
    for attempt in range(8):
        password = PASSWORD if attempt in (5, 7) else f"guess-{attempt}"
        # One AUTH PLAIN per connection, by hand (aiosmtplib's login() would try every
        # mechanism in turn, several failures per attempt).
        async with aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True,
                                   tls_context=client_tls, timeout=10) as c:
            await c.ehlo()
            token = base64.b64encode(f"\0shop\0{password}".encode())
            code, text = await c.execute_command(b"AUTH", b"PLAIN", token)
            outcomes.append(("right" if password == PASSWORD else "wrong", code, text[:5]))
    print(f"\nAUTH brute force: {outcomes}")
    # Three failures lock the address out: from then on even the right password gets 454.
    assert [o[1:] for o in outcomes[:3]] == [(535, "5.7.8")] * 3, outcomes
    assert all(o[1:] == (454, "4.7.0") for o in outcomes[3:]), outcomes
    # And no mail goes anywhere from the locked-out client.
    wire = await Wire.open(host, port)
    await wire.cmd("EHLO client.example")
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code >= 500
    await wire.close()


# --- header injection ---------------------------------------------------------------------------

INJECTED = "X-Injected: yes"
ALLOWED_FIELDS = {"received", "from", "to", "subject", "date", "message-id", "feedback-id",
                  "list-unsubscribe", "list-unsubscribe-post", "mime-version", "content-type",
                  "content-transfer-encoding", "auto-submitted", "in-reply-to", "references",
                  "content-description", "dkim-signature", "return-path"}
_FIELD = re.compile(rb"^([!-9;-~]+):")


def header_fields(raw: bytes) -> list[str]:
    """The field names of a raw message's header section; every line must be a field or a
    continuation (RFC 5322 2.2)."""
    head = raw.split(b"\r\n\r\n", 1)[0]
    names = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t"):
            continue
        m = _FIELD.match(line)
        assert m is not None, f"not a header line: {line!r}"
        names.append(m.group(1).decode().lower())
    return names


def assert_no_injection(msg: Received) -> None:
    names = header_fields(msg.data)
    assert set(names) <= ALLOWED_FIELDS, (names, msg.data[:2000])
    assert "x-injected" not in names and "bcc" not in names
    parsed = email.parser.BytesParser(policy=email.policy.default).parsebytes(msg.data)
    assert {k.lower() for k in parsed} <= ALLOWED_FIELDS, list(parsed)
    assert parsed.defects == [] or all("Header" not in type(d).__name__ for d in parsed.defects)


async def test_no_header_injection_through_relay_written_values(
        tmp_path: Path, downstream: Downstream, start_relay: StartRelay,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_APP_PASSWORD", PASSWORD)
    hostile_app = f"shop\r\n{INJECTED}"       # an app name with a line break (from config)
    relay = await start_relay(downstream.port, server={"auth_require_tls": False},
                              app=[{"name": hostile_app, "password_env": "HOSTILE_APP_PASSWORD",
                                    "from_domains": ["example.com"], "stream": "marketing"}],
                              http={"listen": "127.0.0.1:0",
                                    "public_url": "http://127.0.0.1:8025"})
    downstream.script("RCPT", f"550-5.1.1 no such user\r\n550 5.1.1 {INJECTED}", match="gone@")
    host, port = relay.smtp_addresses[0]
    body = (f"From: news@example.com\r\nTo: r@example.net\r\nSubject: hi\r\n"
            f"Message-ID: <m1@example.com>\r\n"
            f"X-Relay-Campaign: spring\r\n {INJECTED}\r\n"      # folded: one value
            f"X-Relay-Stream: marketing\r\n"
            f"\r\nbody\r\n").encode()
    recipients = ["r@example.net", "gone@example.net", '"odd >, <\\"name"@example.net',
                  '"x\u2028X-Injected: yes"@example.net', "r\u00e9@example.net"]
    wire = await Wire.open(host, port)
    # HELO name with a bare CR in it (the name goes into Received).
    assert (await wire.cmd(f"EHLO evil.example\r{INJECTED}")).code == 250
    login = base64.b64encode(b"\0" + hostile_app.encode() + b"\0" + PASSWORD.encode())
    assert (await wire.cmd(b"AUTH PLAIN " + login)).code == 235
    assert (await wire.cmd("MAIL FROM:<news@example.com> SMTPUTF8")).code == 250
    for rcpt in recipients:
        reply = await wire.cmd(f"RCPT TO:<{rcpt}>")
        assert reply.code == 250, (rcpt, str(reply))
    assert (await wire.cmd("DATA")).code == 354
    assert (await wire.cmd(body + b".")).code == 250
    await wire.close()
    # The same through mynetworks (no app), with a hostile EHLO in the other form.
    wire = await Wire.open(host, port)
    assert (await wire.cmd(f"EHLO [1.2.3.4] ({INJECTED})\t")).code == 250
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await wire.cmd("RCPT TO:<plain@example.net>")).code == 250
    assert (await wire.cmd("DATA")).code == 354
    assert (await wire.cmd(b"From: a@example.com\r\nX-Relay-Campaign: c\r\n\t"
                           + INJECTED.encode() + b"\r\nMessage-ID: <x@y>\r\n "
                           + INJECTED.encode() + b"\r\n\r\nb\r\n.")).code == 250
    await wire.close()

    # 4 good recipients of the app's message, one to mynetworks, and the bounce notice
    # for gone@ (its diagnostic is the hostile downstream reply).
    await downstream.wait_until(lambda: len(downstream.messages) >= 6, timeout=15,
                                what="6 messages")
    for msg in downstream.messages:
        assert_no_injection(msg)
    notices = [m for m in downstream.messages if m.mail_from == ""]
    assert len(notices) == 1
    marketing = [m for m in downstream.messages if b"List-Unsubscribe:" in m.data]
    assert len(marketing) == 4
    for msg in marketing:
        fid = re.search(rb"\r\nFeedback-ID: ([^\r\n]*)\r\n", msg.data)
        assert fid is not None and re.fullmatch(rb"[A-Za-z0-9._:-]+", fid.group(1)), fid
    print(f"\nheader injection: {len(downstream.messages)} messages checked, no injected "
          f"header line")


# --- HTTP: oversized and malformed requests ----------------------------------------------------

HTTP_ATTACKS = {
    "huge declared body": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nContent-Type: "
                          b"application/x-www-form-urlencoded\r\nContent-Length: 1000000000\r\n"
                          b"\r\nList-Unsubscribe=One-Click",
    "streamed chunked body": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"\r\n" + (b"10000\r\n" + b"a" * 65536 + b"\r\n") * 16 + b"0\r\n\r\n",
    "broken chunked": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                      b"zz\r\nxx\r\n0\r\n\r\n",
    "huge URL": b"GET /u/" + b"A" * 100_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "huge header": b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 100_000 + b"\r\n\r\n",
    "many headers": b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i
                                                           for i in range(2000)) + b"\r\n",
    "garbage request line": b"\x00\xff\xfe GARBAGE\r\n\r\n",
    "no version": b"POST /u/abc\r\n\r\n",
    "bad method": b"BREW /u/abc HTTP/1.1\r\nHost: x\r\n\r\n",
    "non-UTF-8 path": b"GET /u/\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    "bad token": b"POST /u/%00%ff HTTP/1.1\r\nHost: x\r\nContent-Length: 26\r\n\r\n"
                 b"List-Unsubscribe=One-Click",
    "bad multipart": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                     b"boundary=\r\nContent-Length: 10\r\n\r\n--\r\n--\r\n\r\n",
    "expect 100 huge": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                       b"Content-Length: 99999999\r\n\r\n",
    "content-length twice": b"POST /u/abc HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                            b"Content-Length: 6\r\n\r\nabcdef",
    "http/0.9": b"GET /\r\n\r\n",
}


async def http_raw(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        out = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end and len(out) < 1_000_000:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), end - time.monotonic())
            except (TimeoutError, ConnectionError):
                break
            if not chunk:
                break
            out += chunk
            if b"\r\n\r\n" in out:
                break
        return out
    finally:
        writer.close()


async def test_http_oversized_and_malformed_requests(downstream: Downstream,
                                                     start_relay: StartRelay) -> None:
    relay: Relay = await start_relay(downstream.port, http={"listen": "127.0.0.1:0"})
    assert relay.http_address is not None
    port = relay.http_address[1]
    statuses = {}
    for name, request in HTTP_ATTACKS.items():
        answer = await http_raw(port, request)
        m = re.match(rb"HTTP/\d\.\d (\d{3})", answer)
        status = int(m.group(1)) if m else None
        statuses[name] = status
        # A 4xx (or the connection closed on garbage), never a 2xx or a 5xx.
        assert status is None or 400 <= status < 500, (name, answer[:300])
        assert status is not None or name in ("garbage request line", "http/0.9"), \
            (name, answer[:300])
        health = await http_raw(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
                                      b"Connection: close\r\n\r\n")
        assert health.startswith(b"HTTP/1.1 200"), (name, health[:200])
    print(f"\nHTTP: {statuses}")
