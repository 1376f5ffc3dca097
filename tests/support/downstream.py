"""A scripted downstream ("next hop") SMTP server for tests.

`Downstream` runs aiosmtpd's SMTP protocol in the test's own event loop (no
Controller thread). It records exactly what the client (the relay under test)
put on the wire, and it can be scripted per stage to answer with a chosen
reply, drop the connection, stall, or close with 421::

    async with Downstream(size_limit=10300) as ds:
        ds.script("RCPT", "550-5.1.1 no such user\\r\\n550 5.1.1 here", match="r6@")
        ds.script("EOD", "451 4.3.0 try later", times=2)
        ...  # point the relay at ("127.0.0.1", ds.port)
        await ds.wait_messages(1)
        assert ds.messages[0].raw_mail_line == b"MAIL FROM:<>\\r\\n"

Raw lines (``commands``, ``raw_mail_line``, ``raw_rcpt_lines``) are the bytes
exactly as read from the socket, line terminator included.
"""

from __future__ import annotations

import asyncio
import collections
import datetime
import ipaddress
import re
import ssl
import tempfile
import warnings
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NoReturn, Self

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

STAGES = ("CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "EOD", "RSET", "NOOP", "QUIT")
"""Stages that `Downstream.script` accepts (case-insensitive)."""

DEFAULT_EOD_REPLY = "250 2.0.0 OK queued"
IDLE_421 = b"421 4.4.2 idle timeout\r\n"

_REPLY_LINE = re.compile(r"(\d{3})(?:[ -]|$)")


@dataclass
class Received:
    """One message the downstream accepted.

    It is added to `Downstream.messages` once the 2xx reply to the final dot
    has been sent, so a test that awaited it finds that session idle again.
    """

    mail_from: str
    """Reverse-path exactly as sent between < and > ("" for the null sender)."""
    mail_options: list[str]
    """MAIL parameters as sent, e.g. ["BODY=8BITMIME", "SMTPUTF8"]."""
    rcpt_tos: list[str]
    """Accepted forward-paths exactly as sent between < and > (quotes kept)."""
    data: bytes
    """Message content after dot-unstuffing, without the final ".\\r\\n"."""
    raw_mail_line: bytes
    raw_rcpt_lines: list[bytes]
    """RCPT lines of the accepted recipients, parallel to rcpt_tos."""
    peer: Any
    connection_id: int
    tls: bool = False
    auth_user: str | None = None


@dataclass(frozen=True)
class _Action:
    kind: str  # "reply", "drop" or "stall"
    reply: str = ""  # well-formed reply, lines joined by CRLF, no final CRLF
    delay: float = 0.0

    @property
    def code(self) -> int:
        return int(self.reply[:3])


@dataclass
class _Rule:
    action: _Action
    times: int | None
    match: str | None


def format_reply(text: str) -> str:
    """Make a well-formed (multi-line) SMTP reply out of *text*.

    Lines may be separated by CRLF or LF; a trailing line break is ignored.
    Every line but the last gets "NNN-", the last "NNN "; a line without its
    own code takes the first line's code. Returns the lines joined by CRLF.
    """
    lines = [line for line in text.replace("\r\n", "\n").split("\n") if line]
    if not lines or not _REPLY_LINE.match(lines[0]):
        raise ValueError(f"not an SMTP reply: {text!r}")
    first_code = lines[0][:3]
    out = []
    for index, line in enumerate(lines):
        m = _REPLY_LINE.match(line)
        code, body = (m.group(1), line[m.end():]) if m else (first_code, line)
        last = index == len(lines) - 1
        out.append(code + (" " if last else "-") + body if body or not last else code)
    return "\r\n".join(out)


def _parse_action(text: str) -> _Action:
    if text == "drop":
        return _Action("drop")
    if text == "421-close":
        return _Action("reply", "421 4.3.2 closing")
    if text.startswith("stall:"):
        return _Action("stall", delay=float(text.removeprefix("stall:")))
    return _Action("reply", format_reply(text))


def _reply_code(status: str | bytes) -> int:
    head = status[:3]
    return int(head) if head.isdigit() else 0


def _split_path(raw: bytes) -> tuple[str, list[str]]:
    """Split a raw MAIL/RCPT line into the path as sent (without <>) and its parameters."""
    text = raw.rstrip(b"\r\n").decode("utf-8", "surrogateescape")
    rest = text.partition(":")[2].lstrip(" ")
    if not rest.startswith("<"):
        path, _, params = rest.partition(" ")
        return path, params.split()
    quoted = escaped = False
    for index, char in enumerate(rest[1:], start=1):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return rest[1:index], rest[index + 1:].split()
    return rest[1:], []


def _consume_result(task: asyncio.Task[None]) -> None:
    """Retrieve a session task's exception (a reset connection) so asyncio does not log it."""
    if not task.cancelled():
        task.exception()


class _WireEnvelope(Envelope):
    """aiosmtpd's Envelope plus what was actually on the wire."""

    def __init__(self) -> None:
        super().__init__()
        self.raw_mail_line = b""
        self.wire_from = ""
        self.wire_options: list[str] = []
        self.raw_rcpt_lines: list[bytes] = []
        self.wire_rcpts: list[str] = []

    def match_text(self) -> str:
        """What a `match=` of the DATA and EOD stages is tested against."""
        return " ".join([self.wire_from, *self.wire_rcpts])


class _RecordingReader:
    """Wraps a connection's StreamReader and reports each command line read.

    aiosmtpd reads commands with ``readuntil()`` (separator LF), DATA content
    with ``readuntil(b"\\r\\n")`` and AUTH responses with ``readline()``.
    Commands and AUTH responses are reported; DATA content is not.
    """

    _OWN = frozenset({"_inner", "_on_line", "waiting", "fragment"})

    def __init__(self, inner: asyncio.StreamReader, on_line: Callable[[bytes], None]) -> None:
        self._inner = inner
        self._on_line = on_line
        self.waiting = False  # blocked waiting for the next command line
        self.fragment: bytes | None = None  # start of an over-long command line

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        if separator != b"\n":
            return await self._inner.readuntil(separator)
        self.waiting = True
        try:
            line = await self._inner.readuntil(separator)
        except asyncio.LimitOverrunError:
            # aiosmtpd now drains the line with read(); collect it.
            self.fragment = self.fragment or b""
            raise
        finally:
            self.waiting = False
        line, self.fragment = (self.fragment or b"") + line, None
        self._on_line(line)
        return line

    async def readline(self) -> bytes:
        line = await self._inner.readline()
        self._on_line(line)
        return line

    async def read(self, n: int = -1) -> bytes:
        data = await self._inner.read(n)
        if self.fragment is not None:
            self.fragment += data
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        # aiosmtpd sets reader._transport on STARTTLS: it must reach the real reader.
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._inner, name, value)


class _Hooks:
    """aiosmtpd handler object; every hook defers to the connection's protocol."""

    async def handle_EHLO(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, hostname: str,
        responses: list[str],
    ) -> list[str]:
        return server.ehlo_lines(session, hostname, responses)

    async def handle_MAIL(
        self, server: _ScriptedSMTP, session: Session, envelope: _WireEnvelope, address: str,
        mail_options: list[str],
    ) -> str:
        return server.accept_mail(envelope, address, mail_options)

    async def handle_RCPT(
        self, server: _ScriptedSMTP, session: Session, envelope: _WireEnvelope, address: str,
        rcpt_options: list[str],
    ) -> str:
        return server.accept_rcpt(envelope, address, rcpt_options)

    async def handle_DATA(
        self, server: _ScriptedSMTP, session: Session, envelope: _WireEnvelope,
    ) -> str:
        return await server.end_of_data(session, envelope)

    async def handle_RSET(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        return server.take_pending() or "250 OK"

    async def handle_NOOP(
        self, server: _ScriptedSMTP, session: Session, envelope: Envelope, arg: str,
    ) -> str:
        return server.take_pending() or "250 OK"

    async def handle_QUIT(self, server: _ScriptedSMTP, session: Session, envelope: Envelope) -> str:
        return server.take_pending() or "221 Bye"


class _ScriptedSMTP(SMTP):
    """One downstream connection: aiosmtpd's SMTP plus scripting and recording."""

    def __init__(self, downstream: Downstream, loop: asyncio.AbstractEventLoop) -> None:
        # aiosmtpd keeps command_size_limits in a class attribute that every new
        # instance clears; give each connection its own so they do not interfere.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.ds = downstream
        self.connection_id = 0
        self.last_line = b""  # the last command line read
        self._pending: str | None = None  # positive scripted reply for the running command
        self._greeting: str | None = None
        self._accepted: Received | None = None  # published once its reply is sent
        with warnings.catch_warnings():
            # "Requiring AUTH while not requiring TLS" is what a test server wants.
            warnings.simplefilter("ignore")
            super().__init__(
                _Hooks(),
                data_size_limit=downstream.size_limit,
                enable_SMTPUTF8=downstream.smtputf8,
                hostname=downstream.hostname,
                tls_context=downstream.starttls_context,
                auth_required=downstream.auth is not None,
                auth_require_tls=downstream.auth is not None
                and downstream.starttls_context is not None,
                authenticator=downstream.authenticate if downstream.auth is not None else None,
                loop=loop,
            )

    # -- connection registry -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        after_starttls = self._original_transport is not None
        super().connection_made(transport)
        if not after_starttls:
            self.connection_id = self.ds.register(self)
            assert self._handler_coroutine is not None
            self._handler_coroutine.add_done_callback(_consume_result)

    def connection_lost(self, error: Exception | None) -> None:
        super().connection_lost(error)
        self.ds.unregister(self)

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
    ) -> None:
        recording: Any = _RecordingReader(reader, self._record_line)
        super()._cb_client_connected(recording, writer)

    def _record_line(self, line: bytes) -> None:
        self.last_line = line
        self.ds.commands.append((self.connection_id, line))
        self.ds.notify()

    def _create_envelope(self) -> _WireEnvelope:
        return _WireEnvelope()

    @property
    def idle(self) -> bool:
        """Waiting for a command, outside a transaction, nothing unread."""
        reader: Any = self._reader
        return (
            self.transport is not None
            and not self.transport.is_closing()
            and reader.waiting
            and not reader._buffer
            and self.envelope is not None
            and self.envelope.mail_from is None
        )

    @property
    def tls(self) -> bool:
        return self.transport is not None and self.transport.get_extra_info("ssl_object") is not None

    def close_with(self, reply: bytes) -> None:
        """Write *reply* (raw bytes) and close; aiosmtpd's task ends on connection_lost."""
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(reply)
            self.transport.close()

    # -- scripting -------------------------------------------------------------

    async def _hang_up(self, reply: str | None = None) -> NoReturn:
        """Optionally send *reply*, close the connection and end this session."""
        if reply is not None:
            await super().push(reply)
        assert self.transport is not None
        self.transport.close()
        raise asyncio.CancelledError  # aiosmtpd treats this like a lost connection

    async def push(self, status: str | bytes) -> None:
        if self._greeting is not None:
            status, self._greeting = self._greeting, None
        elif self._pending is not None and _reply_code(status) == 354:
            status = self.take_pending() or status
        await super().push(status)
        if self._accepted is not None:
            # This was the reply to the final dot. Publish the message only now,
            # so whoever waits for it finds the session back at reading commands.
            self.ds.messages.append(self._accepted)
            self._accepted = None
            self.ds.notify()

    def take_pending(self) -> str | None:
        """Return and forget the positive scripted reply of the running command."""
        reply, self._pending = self._pending, None
        return reply

    async def _handle_client(self) -> None:
        action = self.ds.next_action("CONNECT", "")
        if action is not None:
            if action.kind == "drop":
                await self._hang_up()
            if action.kind == "stall":
                await asyncio.sleep(action.delay)
            elif action.code == 421:
                await self._hang_up(action.reply)
            else:
                self._greeting = action.reply
        await super()._handle_client()

    async def _dispatch(
        self, stage: str, arg: str | None, default: Callable[[Any], Awaitable[None]],
    ) -> None:
        """Run the scripted action for *stage*, or aiosmtpd's *default* handling.

        A positive scripted reply (2xx/3xx, or 354 for DATA) still runs the
        default handling so the session state advances; only the reply text is
        replaced. Any other reply is sent instead of the default handling.
        Every 421 reply closes the connection after it is sent.
        """
        if stage == "DATA":
            assert isinstance(self.envelope, _WireEnvelope)
            text = self.envelope.match_text()
        else:
            text = arg or ""
        action = self.ds.next_action(stage, text)
        if action is None:
            await default(arg)
            return
        if action.kind == "drop":
            await self._hang_up()
        if action.kind == "stall":
            await asyncio.sleep(action.delay)
            await default(arg)
            return
        if action.code == 421:
            await self._hang_up(action.reply)
        positive = action.code == 354 if stage == "DATA" else action.code < 400
        if not positive:
            await self.push(action.reply)
            return
        self._pending = action.reply
        try:
            await default(arg)
        finally:
            self._pending = None

    async def smtp_EHLO(self, hostname: str) -> None:
        await self._dispatch("EHLO", hostname, super().smtp_EHLO)

    async def smtp_MAIL(self, arg: str | None) -> None:
        await self._dispatch("MAIL", arg, super().smtp_MAIL)

    async def smtp_RCPT(self, arg: str | None) -> None:
        await self._dispatch("RCPT", arg, super().smtp_RCPT)

    async def smtp_DATA(self, arg: str) -> None:
        await self._dispatch("DATA", arg, super().smtp_DATA)

    async def smtp_AUTH(self, arg: str) -> None:
        if self.ds.auth is None:
            await self.push("502 5.5.1 AUTH not supported")
            return
        await super().smtp_AUTH(arg)

    async def smtp_RSET(self, arg: str) -> None:
        await self._dispatch("RSET", arg, super().smtp_RSET)

    async def smtp_NOOP(self, arg: str) -> None:
        await self._dispatch("NOOP", arg, super().smtp_NOOP)

    async def smtp_QUIT(self, arg: str) -> None:
        await self._dispatch("QUIT", arg, super().smtp_QUIT)

    # -- hook bodies (called through _Hooks) -----------------------------------

    def ehlo_lines(self, session: Session, hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname  # the 5-argument hook must do this itself
        pending = self.take_pending()
        if pending is not None:
            return pending.split("\r\n")
        ds = self.ds
        lines = [
            line for line in responses[:-1]
            if (ds.eightbit or line != "250-8BITMIME")
            and (ds.auth is not None or not line.startswith("250-AUTH"))
        ]
        lines += [f"250-{keyword}" for keyword in ds.ehlo_extra]
        return [*lines, responses[-1]]

    def accept_mail(self, envelope: _WireEnvelope, address: str, options: list[str]) -> str:
        if not self.ds.eightbit and "BODY=8BITMIME" in options:
            return "555 5.5.4 BODY=8BITMIME not supported"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        envelope.raw_mail_line = self.last_line
        envelope.wire_from, envelope.wire_options = _split_path(self.last_line)
        return self.take_pending() or "250 OK"

    def accept_rcpt(self, envelope: _WireEnvelope, address: str, options: list[str]) -> str:
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        envelope.raw_rcpt_lines.append(self.last_line)
        envelope.wire_rcpts.append(_split_path(self.last_line)[0])
        return self.take_pending() or "250 OK"

    async def end_of_data(self, session: Session, envelope: _WireEnvelope) -> str:
        reply = DEFAULT_EOD_REPLY
        action = self.ds.next_action("EOD", envelope.match_text())
        if action is not None:
            if action.kind == "drop":
                await self._hang_up()
            if action.kind == "stall":
                await asyncio.sleep(action.delay)
            else:
                reply = action.reply
        if _reply_code(reply) < 300:
            login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
            self._accepted = Received(
                mail_from=envelope.wire_from,
                mail_options=envelope.wire_options,
                rcpt_tos=envelope.wire_rcpts,
                data=envelope.original_content or b"",
                raw_mail_line=envelope.raw_mail_line,
                raw_rcpt_lines=envelope.raw_rcpt_lines,
                peer=session.peer,
                connection_id=self.connection_id,
                tls=self.tls,
                auth_user=login.decode("utf-8", "replace") if login is not None else None,
            )
        if _reply_code(reply) == 421:
            await self._hang_up(reply)
        return reply


class Downstream:
    """A scripted SMTP server in the current event loop; see the module docstring.

    EHLO advertises SIZE only when *size_limit* is set (and enforces it),
    8BITMIME and SMTPUTF8 as configured, STARTTLS when *starttls_context* is
    given, AUTH PLAIN/LOGIN (required before MAIL) when *auth* maps users to
    passwords, plus the keywords in *ehlo_extra*. *tls_context* makes the
    whole connection TLS (implicit TLS, port-465 style).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        ehlo_extra: Sequence[str] | None = None,
        size_limit: int | None = None,
        smtputf8: bool = True,
        eightbit: bool = True,
        hostname: str = "sink.test",
        tls_context: ssl.SSLContext | None = None,
        starttls_context: ssl.SSLContext | None = None,
        auth: dict[str, str] | None = None,
    ) -> None:
        self.host = host
        self.port = 0
        self.ehlo_extra = list(ehlo_extra or [])
        self.size_limit = size_limit
        self.smtputf8 = smtputf8
        self.eightbit = eightbit
        self.hostname = hostname
        self.tls_context = tls_context
        self.starttls_context = starttls_context
        self.auth = auth
        self.messages: list[Received] = []
        self.commands: list[tuple[int, bytes]] = []
        self.connections_opened = 0
        self.max_concurrent = 0
        self._live: dict[int, _ScriptedSMTP] = {}
        self._rules: dict[str, list[_Rule]] = {stage: [] for stage in STAGES}
        self._waiters: list[asyncio.Future[None]] = []
        self._server: asyncio.Server | None = None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Listen on an ephemeral port of *host*; sets `port`."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ScriptedSMTP(self, loop), self.host, 0, ssl=self.tls_context,
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening, abort every connection and wait for their sessions to end."""
        if self._server is None:
            return
        self._server.close()
        sessions = list(self._live.values())
        for proto in sessions:
            if proto.transport is not None:
                proto.transport.abort()
        await self._server.wait_closed()
        tasks = [p._handler_coroutine for p in sessions if p._handler_coroutine is not None]
        await asyncio.gather(*tasks, return_exceptions=True)
        self._server = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- scripting ---------------------------------------------------------------

    def script(
        self, stage: str, reply_or_action: str, *, times: int | None = 1, match: str | None = None,
    ) -> None:
        """Queue an action for *stage* (one of `STAGES`, case-insensitive).

        *reply_or_action* is a reply ("451 4.3.0 try later", or several lines
        separated by CRLF) or "drop", "stall:SECONDS", "421-close". The first
        queued rule for the stage whose *match* is None or a substring of the
        command's argument fires, *times* times (None: forever). For DATA and
        EOD the argument is the transaction's sender and recipients, joined by
        spaces, so ``match="r1@"`` picks one single-recipient message.
        """
        key = stage.upper()
        if key not in self._rules:
            raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
        if times is not None and times < 1:
            raise ValueError("times must be None or at least 1")
        self._rules[key].append(_Rule(_parse_action(reply_or_action), times, match))

    def next_action(self, stage: str, text: str) -> _Action | None:
        """Consume and return the scripted action for a command, if any."""
        rules = self._rules[stage]
        for index, rule in enumerate(rules):
            if rule.match is None or rule.match in text:
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times == 0:
                        del rules[index]
                return rule.action
        return None

    # -- connections ---------------------------------------------------------------

    @property
    def open_connections(self) -> int:
        """Connections open right now."""
        return len(self._live)

    def register(self, proto: _ScriptedSMTP) -> int:
        """Record a new connection; returns its connection_id (1, 2, ...)."""
        self.connections_opened += 1
        self._live[self.connections_opened] = proto
        self.max_concurrent = max(self.max_concurrent, len(self._live))
        self.notify()
        return self.connections_opened

    def unregister(self, proto: _ScriptedSMTP) -> None:
        if self._live.pop(proto.connection_id, None) is not None:
            self.notify()

    def close_idle_connections_with_421(self) -> int:
        """Send "421 4.4.2 idle timeout" to every connection idle between
        transactions and close it. Returns how many were closed."""
        idle = [proto for proto in self._live.values() if proto.idle]
        for proto in idle:
            proto.close_with(IDLE_421)
        return len(idle)

    def drop_all_connections(self) -> int:
        """Close every connection without a reply. Returns how many."""
        live = list(self._live.values())
        for proto in live:
            if proto.transport is not None:
                proto.transport.close()
        return len(live)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any,
    ) -> AuthResult:
        """aiosmtpd authenticator checking LoginPassword against `auth`."""
        ok = (
            self.auth is not None
            and isinstance(auth_data, LoginPassword)
            and self.auth.get(auth_data.login.decode("utf-8", "replace"))
            == auth_data.password.decode("utf-8", "replace")
        )
        return AuthResult(success=ok, handled=False, auth_data=auth_data)

    # -- waiting -------------------------------------------------------------------

    def notify(self) -> None:
        """Wake `wait_until` callers; called on every recorded change."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait_until(
        self, predicate: Callable[[], bool], *, timeout: float = 10.0, what: str = "condition",
    ) -> None:
        """Wait until *predicate()* holds, re-checking on every recorded event
        (command line, message, connection opened or closed)."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    waiter = loop.create_future()
                    self._waiters.append(waiter)
                    await waiter
        except TimeoutError:
            raise AssertionError(f"downstream: no {what} within {timeout}s") from None

    async def wait_messages(self, count: int, *, timeout: float = 10.0) -> list[Received]:
        """Wait until at least *count* messages have been accepted; returns `messages`."""
        await self.wait_until(
            lambda: len(self.messages) >= count, timeout=timeout, what=f"{count} message(s)",
        )
        return self.messages


def self_signed_contexts(hostname: str = "sink.test") -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """Return (server_context, client_context) for a fresh self-signed certificate.

    The certificate names *hostname*, localhost and 127.0.0.1; the client
    context trusts exactly that certificate and checks host names.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname),
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        ]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_file, key_file = Path(tmp, "cert.pem"), Path(tmp, "key.pem")
        cert_file.write_bytes(cert_pem)
        key_file.write_bytes(key_pem)
        server.load_cert_chain(cert_file, key_file)
    client = ssl.create_default_context(cadata=cert_pem.decode("ascii"))
    return server, client
