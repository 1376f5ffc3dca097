"""Parse and play the client transcripts in /work/shared/cases/*.smtp.

Format (see /work/shared/cases/README.md): ``C:`` one client write, ``P:``
consecutive lines form one write, ``X: close`` / ``X: tls-handshake`` /
``X: wait N``, ``D:`` next-hop script lines, ``#`` comments. Escapes ``\\r``,
``\\n``, ``\\t``, ``\\xHH`` (and ``\\\\``); ``{REPEAT:<text>:<n>}``;
non-ASCII characters are sent as UTF-8. A comment line ends a run of ``P:``
lines, so case 15's "Group 1" and "Group 2" are two writes.

`play` never sleeps to collect replies: it tracks, over the bytes written so
far, what a correct server reads, and reads exactly the replies owed:

* on connect, one reply (the greeting);
* in command mode, one reply per CRLF-terminated line; ``DATA`` answered
  with 354 switches to data mode;
* in data mode, one reply for the first CRLF.CRLF (the CRLF ending the DATA
  line counts as the first CRLF), then command mode again;
* a 334 reply makes the next line an AUTH response, owing one reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Step = tuple[Any, ...]
"""("send", [bytes, ...]) one write | ("close",) | ("tls",) | ("wait", seconds)."""

_REPEAT = re.compile(r"\{REPEAT:(.*?):(\d+)\}")
_ESCAPE = re.compile(r"(\\x[0-9A-Fa-f]{2}|\\.?)")
_SIMPLE_ESCAPES = {"\\r": b"\r", "\\n": b"\n", "\\t": b"\t", "\\\\": b"\\"}
_REPLY_LINE = re.compile(r"(\d{3})([ -]|$)")
_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)")


def decode_line(text: str) -> bytes:
    """Expand ``{REPEAT:..}``, then decode escapes; other characters become UTF-8."""
    text = _REPEAT.sub(lambda m: m.group(1) * int(m.group(2)), text)
    out = bytearray()
    for index, part in enumerate(_ESCAPE.split(text)):
        if index % 2 == 0:
            out += part.encode("utf-8")
        elif part in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[part]
        elif part.startswith("\\x") and len(part) == 4:
            out += bytes.fromhex(part[2:])
        else:
            raise ValueError(f"unknown escape {part!r}")
    return bytes(out)


@dataclass
class Transcript:
    """A parsed ``.smtp`` file."""

    path: Path
    steps: list[Step]
    downstream: list[str] = field(default_factory=list)
    """The ``D:`` lines, escapes decoded (so "\\r\\n" is a real CRLF)."""

    def substitute(self, old: bytes, new: bytes) -> Transcript:
        """A copy with *old* replaced by *new* in every write (e.g. case 22's "rN")."""
        steps = [
            ("send", [chunk.replace(old, new) for chunk in step[1]]) if step[0] == "send" else step
            for step in self.steps
        ]
        return Transcript(self.path, steps, list(self.downstream))


def _parse_x(body: str) -> Step:
    words = body.split()
    if words == ["close"]:
        return ("close",)
    if words == ["tls-handshake"]:
        return ("tls",)
    if len(words) == 2 and words[0] == "wait":
        return ("wait", float(words[1]))
    raise ValueError(f"unknown X: action {body!r}")


def parse(path: str | Path) -> Transcript:
    """Parse a transcript file; raises ValueError naming the bad line."""
    path = Path(path)
    steps: list[Step] = []
    downstream: list[str] = []
    group: list[bytes] | None = None  # the write that P: lines are appended to
    for number, raw in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        line = raw.removesuffix("\r")
        tag, colon, rest = line.partition(":")
        if tag != "P":
            group = None
        if not line.strip() or line.startswith("#"):
            continue
        body = rest.removeprefix(" ")
        try:
            if not colon or tag not in "CPXD" or len(tag) != 1:
                raise ValueError("expected a C:, P:, X:, D: or # line")
            if tag == "C":
                steps.append(("send", [decode_line(body)]))
            elif tag == "P":
                if group is None:
                    group = []
                    steps.append(("send", group))
                group.append(decode_line(body))
            elif tag == "X":
                steps.append(_parse_x(body))
            else:
                downstream.append(decode_line(body).decode("utf-8"))
        except ValueError as error:
            raise ValueError(f"{path}:{number}: {error}: {line!r}") from None
    return Transcript(path, steps, downstream)


@dataclass
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: list[str]
    """The reply lines as received, without CRLF ("550-5.1.1 a", "550 5.1.1 b")."""
    text: str
    """The text after "NNN-"/"NNN " of every line, joined by "\\n"."""
    enhanced: str | None
    """Enhanced status code of the first line (RFC 3463), e.g. "5.6.0"."""

    @classmethod
    def from_lines(cls, lines: list[str]) -> Reply:
        texts = [line[4:] for line in lines]
        m = _ENHANCED.match(texts[0])
        return cls(int(lines[0][:3]), lines, "\n".join(texts), m.group(1) if m else None)

    def __str__(self) -> str:
        return "\r\n".join(self.lines)


def _describe(data: bytes) -> str:
    return repr(data if len(data) <= 80 else data[:60] + b"..." + data[-12:])


class _Connection:
    """One client connection and the replies it is owed."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int,
        timeout: float,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.number = number
        self.timeout = timeout
        self.replies: list[Reply] = []
        self.closed_by_server = False
        self._unread = bytearray()  # written bytes a server has not answered yet
        self._mode = "command"  # "command", "auth" (AUTH response line) or "data"

    @classmethod
    async def open(cls, host: str, port: int, number: int, timeout: float) -> _Connection:
        try:
            async with asyncio.timeout(timeout):
                reader, writer = await asyncio.open_connection(host, port)
        except TimeoutError:
            raise AssertionError(f"connection {number}: connect to {host}:{port} timed out") from None
        conn = cls(reader, writer, number, timeout)
        await conn.read_reply("the greeting")
        return conn

    async def read_reply(self, awaited: str) -> Reply | None:
        """Read one full reply; None (and closed_by_server) if the server hung up."""
        lines: list[str] = []
        while True:
            try:
                async with asyncio.timeout(self.timeout):
                    raw = await self.reader.readline()
            except TimeoutError:
                raise AssertionError(
                    f"connection {self.number}: no reply within {self.timeout}s to {awaited}"
                    f" (replies so far: {[str(r) for r in self.replies]})"
                ) from None
            except OSError:
                raw = b""
            if not raw.endswith(b"\n"):
                self.closed_by_server = True
                return None
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            m = _REPLY_LINE.match(line)
            if m is None:
                raise AssertionError(
                    f"connection {self.number}: malformed reply line {raw!r} to {awaited}"
                )
            lines.append(line)
            if m.group(2) != "-":
                reply = Reply.from_lines(lines)
                self.replies.append(reply)
                return reply

    def _next_owed(self) -> tuple[str, bytes] | None:
        """Take the next complete unit that owes a reply off the unread bytes."""
        if self._mode == "data":
            end = (b"\r\n" + self._unread).find(b"\r\n.\r\n")
            size = end + 3  # end + 5 in the CRLF-prefixed buffer
        else:
            end = self._unread.find(b"\r\n")
            size = end + 2
        if end < 0:
            return None
        unit = bytes(self._unread[:size])
        del self._unread[:size]
        return self._mode, unit

    async def send(self, data: bytes) -> None:
        """Write *data* in one write, then read every reply it completes."""
        if self.closed_by_server:
            return
        with contextlib.suppress(OSError):
            self.writer.write(data)
            async with asyncio.timeout(self.timeout):
                await self.writer.drain()
        self._unread += data
        while (owed := self._next_owed()) is not None:
            mode, unit = owed
            awaited = "the end of data" if mode == "data" else _describe(unit)
            reply = await self.read_reply(awaited)
            if reply is None:
                return
            if reply.code == 334 and mode != "data":
                self._mode = "auth"
            elif mode == "command" and unit.strip().upper() == b"DATA" and reply.code == 354:
                self._mode = "data"
            else:
                self._mode = "command"

    async def start_tls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        async with asyncio.timeout(self.timeout):
            await self.writer.start_tls(context, server_hostname=server_hostname)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(self.timeout):
                await self.writer.wait_closed()


def _insecure_client_context() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


async def play(
    transcript: Transcript,
    host: str,
    port: int,
    *,
    timeout: float = 10.0,
    tls_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
) -> list[list[Reply]]:
    """Play *transcript* against host:port; returns the replies per connection.

    A connection opens at the first write (and at the first write after
    ``X: close``). Once the server closes a connection, later writes for it
    are skipped. *tls_context* (default: no certificate checks) is used by
    ``X: tls-handshake``. A reply that does not arrive within *timeout*
    seconds raises AssertionError naming what was awaited.
    """
    connections: list[list[Reply]] = []
    conn: _Connection | None = None
    try:
        for step in transcript.steps:
            if step[0] == "send":
                if conn is None:
                    conn = await _Connection.open(host, port, len(connections) + 1, timeout)
                    connections.append(conn.replies)
                await conn.send(b"".join(step[1]))
            elif step[0] == "close":
                if conn is not None:
                    await conn.close()
                conn = None
            elif step[0] == "tls":
                if conn is None:
                    raise ValueError("X: tls-handshake with no open connection")
                if not conn.closed_by_server:
                    await conn.start_tls(
                        tls_context or _insecure_client_context(), server_hostname or host
                    )
            elif step[0] == "wait":
                await asyncio.sleep(step[1])
            else:
                raise ValueError(f"unknown step {step!r}")
    finally:
        if conn is not None:
            await conn.close()
    return connections
