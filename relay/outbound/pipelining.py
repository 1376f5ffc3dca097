"""RFC 2920 command pipelining on an aiosmtplib session.

aiosmtplib reads one reply per command it has just written: its protocol parses the first
complete reply in what arrives, keeps the rest of those bytes unparsed, and drops whatever
arrives while a parsed reply waits to be picked up. With a group of pipelined commands the
server sends several replies back to back, often in one segment, so reading them through
`SMTPProtocol.read_response` loses all but the first (it then times out).

`Pipeline` therefore puts a `_ReplyCollector` in front of the session's protocol on the
transport (`transport.set_protocol`, an asyncio API) for the length of one transaction: it
keeps every reply, parsed by aiosmtplib's own parser (`SMTPProtocol`), in order. The
session's protocol gets the transport back at `finish()`, in step (no reply owed, nothing
unread), or the session is closed.
"""

from __future__ import annotations

import asyncio
import collections

import aiosmtplib
from aiosmtplib.protocol import (
    COMMAND_INJECTION_REGEX,
    MAX_RESPONSE_LENGTH,
    PERIOD_REGEX,
    SMTPProtocol,
    normalize_message_line_endings,
)


def data_on_wire(body: bytes) -> bytes:
    """What follows the 354 for `body`: line endings made CRLF, dot-stuffed (RFC 5321
    4.5.2), the final dot; byte for byte what aiosmtplib's DATA command sends.

    aiosmtplib gets there with two regular-expression substitutions over the whole message
    (370 us for 50 KB here); a queued message has CRLF line endings only (the edge refuses
    bare CR and LF), and then counts and one replace give the same bytes. The part after the
    header section is the same for every copy of a message (per-recipient headers): the last
    one is kept prepared. A test holds the result equal to aiosmtplib's over arbitrary
    bytes."""
    global _last_prepared
    end = body.find(b"\r\n\r\n")
    if end >= 0:
        rest = body[end + 4:]
        last = _last_prepared
        if last is not None and last[0] == rest:
            prepared = last[1]
        else:
            prepared = _stuffed_lines(rest, last=True)
            if prepared is None:
                return _as_aiosmtplib(body)
            _last_prepared = (rest, prepared)
        head = _stuffed_lines(body[:end + 4], last=False)
        if head is None:
            return _as_aiosmtplib(body)
        return head + prepared
    whole = _stuffed_lines(body, last=True, whole=True)
    return _as_aiosmtplib(body) if whole is None else whole


_last_prepared: tuple[bytes, bytes] | None = None   # (body part, its DATA bytes)


def _stuffed_lines(text: bytes, *, last: bool, whole: bool = False) -> bytes | None:
    """`text`, which starts at a line start, dot-stuffed; the message's `last` part also
    ends with CRLF and the final dot (an empty last part after a header section follows a
    CRLF already; an empty `whole` message becomes one empty line). None if it has a bare
    CR or LF (then aiosmtplib's own rewrite applies)."""
    pairs = text.count(b"\r\n")
    if text.count(b"\r") != pairs or text.count(b"\n") != pairs:
        return None
    if b"\r\n." in text:
        text = text.replace(b"\r\n.", b"\r\n..")
    if text.startswith(b"."):
        text = b"." + text
    if not last:
        return text
    if (text or whole) and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text + b".\r\n"


def _as_aiosmtplib(body: bytes) -> bytes:
    return PERIOD_REGEX.sub(b"..", normalize_message_line_endings(body)) + b".\r\n"


_CLOSING = 421   # aiosmtplib closes the session on this reply (SMTP.execute_command); so do we


class _ReplyCollector(SMTPProtocol):
    """The transport's protocol while pipelined commands await replies: every complete reply
    is kept (aiosmtplib's own parser, inherited), in the order the server sent them."""

    def __init__(self, session: SMTPProtocol, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop=loop)
        self.session = session
        self.replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self.failure: BaseException | None = None   # after the replies already kept
        self._wakeup: asyncio.Future[None] | None = None

    @property
    def unread(self) -> bool:
        return bool(self.replies or self._buffer)

    def data_received(self, data: bytes) -> None:
        if self.failure is not None:
            return
        self._buffer.extend(data)
        try:
            while (reply := self._read_response_from_buffer()) is not None:
                self.replies.append(reply)
        except aiosmtplib.SMTPResponseException as exc:   # a malformed reply line
            self._fail(exc)
            return
        if len(self._buffer) > MAX_RESPONSE_LENGTH:
            self._fail(aiosmtplib.SMTPResponseException(
                aiosmtplib.SMTPStatus.invalid_response.value, "Response too long"))
            return
        self._wake()

    def eof_received(self) -> bool:
        self._fail(aiosmtplib.SMTPServerDisconnected("Unexpected EOF received"))
        return False   # close the transport, as aiosmtplib does

    def connection_lost(self, exc: Exception | None) -> None:
        lost = aiosmtplib.SMTPServerDisconnected("Connection lost")
        lost.__cause__ = exc
        self._fail(lost)
        self.session.connection_lost(exc)   # the session notices, as if it had held it

    def pause_writing(self) -> None:
        self.session.pause_writing()

    def resume_writing(self) -> None:
        self.session.resume_writing()

    def _fail(self, exc: BaseException) -> None:
        if self.failure is None:
            self.failure = exc
        self._wake()

    def _wake(self) -> None:
        if self._wakeup is not None and not self._wakeup.done():
            self._wakeup.set_result(None)

    async def next_reply(self, timeout: float | None) -> aiosmtplib.SMTPResponse:
        try:
            async with asyncio.timeout(timeout):
                while not self.replies:
                    if self.failure is not None:
                        raise self.failure
                    self._wakeup = self._loop.create_future()
                    await self._wakeup
        except TimeoutError as exc:
            raise aiosmtplib.SMTPReadTimeoutError(
                "Timed out waiting for server response") from exc
        return self.replies.popleft()


class Pipeline:
    """One transaction's commands on a session that advertised PIPELINING (RFC 2920):
    `send` writes a group at once, `reply` returns the replies in order, `send_body` the
    message after a 354, `finish` gives the session back to aiosmtplib.

    A lost connection, a timeout or a malformed reply closes the session and raises
    aiosmtplib's exception (`SMTPServerDisconnected`, `SMTPReadTimeoutError`,
    `SMTPResponseException`), as aiosmtplib's own commands close it on the first two; a 421
    reply closes it too (as aiosmtplib does) and is returned."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.owed = 0   # replies the server still owes us
        self._collector: _ReplyCollector | None = None

    def send(self, *commands: bytes) -> None:
        """Write `commands` (lines without CRLF) in one go. Like aiosmtplib, refuses a
        control character in any of them (ValueError) before anything is written."""
        for command in commands:
            if COMMAND_INJECTION_REGEX.search(command):
                raise ValueError("Command arg contains a prohibited control character")
        self._write(b"".join(command + b"\r\n" for command in commands), len(commands))

    def send_body(self, body: bytes) -> None:
        """The message after a 354 (see `data_on_wire`)."""
        self._write(data_on_wire(body), 1)

    def _write(self, data: bytes, replies: int) -> None:
        protocol = self.smtp.protocol
        if protocol is None or not protocol.is_connected or protocol.transport is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        if self._collector is None:
            self._collector = _ReplyCollector(protocol, asyncio.get_running_loop())
            protocol.transport.set_protocol(self._collector)
        self.owed += replies
        protocol.write(data)

    async def reply(self) -> aiosmtplib.SMTPResponse:
        """The next reply of what was sent."""
        if self._collector is None or self.owed == 0:
            raise RuntimeError("no reply is owed")
        try:
            reply = await self._collector.next_reply(self.smtp.timeout)
        except aiosmtplib.SMTPException:   # lost, timed out or a malformed reply
            self.close()
            raise
        self.owed -= 1
        if reply.code == _CLOSING:
            self.close()
        return reply

    def finish(self) -> bool:
        """Give the session's protocol its transport back. True when the session is open
        and in step with the server; otherwise it is closed and False returned."""
        collector, self._collector = self._collector, None
        protocol = self.smtp.protocol
        if collector is None:
            return protocol is not None and protocol.is_connected
        in_step = self.owed == 0 and not collector.unread and collector.failure is None
        if protocol is None or protocol.transport is None or not protocol.is_connected:
            return False
        protocol.transport.set_protocol(protocol)
        if not in_step:
            self.smtp.close()
        return in_step

    def close(self) -> None:
        """Close the session (it is out of step with the server)."""
        self.owed = 0
        if self._collector is not None:
            self._collector.replies.clear()
        self.finish()
        self.smtp.close()
