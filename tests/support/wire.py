"""A raw SMTP client for tests that need exact bytes and exact replies."""

from __future__ import annotations

import asyncio

from tests.support.transcript import Reply


class Wire:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self.greeting: Reply | None = None

    @classmethod
    async def open(cls, host: str, port: int, timeout: float = 10.0) -> Wire:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        wire = cls(reader, writer)
        wire.greeting = await wire.reply()
        return wire

    async def reply(self, timeout: float = 10.0) -> Reply:
        """Read one whole (possibly multi-line) reply."""
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), timeout)
            if not raw:
                raise ConnectionError(f"connection closed; reply so far: {lines}")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return Reply.from_lines(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> Reply:
        """Send one command line (CRLF added) and read its reply."""
        data = line.encode("utf-8") if isinstance(line, str) else line
        await self.send(data + b"\r\n")
        return await self.reply()

    async def closed(self, timeout: float = 5.0) -> bool:
        """True once the server has closed the connection."""
        try:
            return await asyncio.wait_for(self.reader.read(), timeout) == b""
        except (TimeoutError, ConnectionError):
            return False

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
