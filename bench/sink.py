#!/usr/bin/env python3
"""Fast counting SMTP sink for benchmarks.

A deliberately minimal SMTP server built directly on ``asyncio.Protocol``
(no aiosmtpd) so that it is never the bottleneck of a benchmark:

* EHLO advertises PIPELINING, 8BITMIME, SMTPUTF8 and SIZE;
* every command is answered 250 (DATA gets 354, QUIT gets 221);
* message data is scanned for the CRLF.CRLF terminator without being
  stored (only the header block is kept when ``--record-ids`` is given);
* pipelined commands are handled: all replies generated from one received
  chunk are written back in a single ``write()``.

Counters (messages, recipients, first/last arrival wall-clock timestamps and
optionally the Message-ID of every message) are written as JSON to
``--stats-file`` every 0.5 s (when changed) and on SIGTERM/SIGINT.

    python bench/sink.py --listen 127.0.0.1:2526 --stats-file /tmp/sink.json

With port 0 an ephemeral port is chosen; the first line printed on stdout is
always ``listening HOST:PORT`` (flushed) so a parent process can read it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

MAX_LINE = 8192  # longest command line we buffer before answering 500
MAX_HEADER_BYTES = 65536  # header bytes kept per message for Message-ID
IDLE_TIMEOUT = 300.0  # seconds without any input before a client is dropped
STATS_INTERVAL = 0.5

EHLO_REPLY_TMPL = (
    "250-{host}\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE {size}\r\n"
)


@dataclass
class Stats:
    count: int = 0  # messages (completed DATA)
    rcpts: int = 0  # recipients of completed messages
    bytes: int = 0  # message bytes (as received, dot-stuffed, incl. terminator)
    connections: int = 0  # connections accepted in total
    active: int = 0  # currently open connections
    peak_active: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    message_ids: list[str] = field(default_factory=list)
    missing_ids: int = 0
    started_ts: float = field(default_factory=time.time)
    version: int = 0  # bumped on every change, to skip idle rewrites

    def as_dict(self, record_ids: bool) -> dict[str, Any]:
        d: dict[str, Any] = {
            "count": self.count,
            "rcpts": self.rcpts,
            "bytes": self.bytes,
            "connections": self.connections,
            "active": self.active,
            "peak_active": self.peak_active,
            "first_ts": self.first_ts,
            "last_ts": self.last_ts,
            "started_ts": self.started_ts,
            "written_ts": time.time(),
            "pid": os.getpid(),
        }
        if record_ids:
            d["message_ids"] = self.message_ids
            d["missing_ids"] = self.missing_ids
        return d


def extract_message_id(header_block: bytes) -> str | None:
    """Return the Message-ID value from a raw header block (handles folding)."""
    lines = header_block.split(b"\r\n")
    for i, line in enumerate(lines):
        if line[:11].lower() == b"message-id:":
            value = line[11:]
            j = i + 1
            while j < len(lines) and lines[j][:1] in (b" ", b"\t"):
                value += lines[j]
                j += 1
            return value.strip().decode("utf-8", "replace")
    return None


class SinkProtocol(asyncio.Protocol):
    __slots__ = (
        "buf",
        "closing",
        "hdr",
        "hdr_done",
        "in_data",
        "last_activity",
        "msg_bytes",
        "rcpts",
        "server",
        "tail",
        "transport",
    )

    def __init__(self, server: SinkServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.tail = b""
        self.hdr = bytearray()
        self.hdr_done = False
        self.msg_bytes = 0
        self.rcpts = 0
        self.last_activity = time.monotonic()
        self.closing = False

    # -- connection lifecycle -------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        st = self.server.stats
        st.connections += 1
        st.active += 1
        st.peak_active = max(st.peak_active, st.active)
        st.version += 1
        self.server.conns.add(self)
        transport.write(self.server.greeting)

    def connection_lost(self, exc: Exception | None) -> None:
        st = self.server.stats
        st.active -= 1
        st.version += 1
        self.server.conns.discard(self)
        self.transport = None

    # -- input ------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closing or self.transport is None:
            return
        self.last_activity = time.monotonic()
        out: list[bytes] = []
        chunk: bytes = data
        # Loop alternates between DATA-mode scanning and command parsing
        # because a single chunk may hold the end of a message followed by
        # pipelined commands for the next transaction.
        for _ in range(1_000_000):  # bounded; each pass consumes input
            if self.in_data:
                rest = self._consume_data(chunk, out)
                if rest is None:
                    break
                chunk = rest
            else:
                self.buf += chunk
                chunk = b""
                rest = self._consume_commands(out)
                if rest is None:
                    break
                chunk = rest
        if out and self.transport is not None:
            self.transport.write(b"".join(out))
        if self.closing and self.transport is not None:
            self.transport.close()

    def _consume_data(self, chunk: bytes, out: list[bytes]) -> bytes | None:
        """Scan DATA payload; return the remainder after CRLF.CRLF or None."""
        search = self.tail + chunk
        idx = search.find(b"\r\n.\r\n")
        if idx < 0:
            self.msg_bytes += len(chunk)
            if self.server.record_ids and not self.hdr_done:
                self._collect_header(chunk)
            self.tail = search[-4:]
            return None
        end = idx + 5 - len(self.tail)  # offset in chunk just past ".\r\n"
        part = chunk[:end]
        self.msg_bytes += len(part)
        if self.server.record_ids and not self.hdr_done:
            self._collect_header(part)
        self._message_done()
        out.append(b"250 2.0.0 Ok: queued\r\n")
        return chunk[end:]

    def _collect_header(self, part: bytes) -> None:
        self.hdr += part
        # The DATA payload is treated as if preceded by CRLF, so an empty
        # header block (payload starting with CRLF) is also recognised.
        pos = (b"\r\n" + bytes(self.hdr)).find(b"\r\n\r\n")
        if pos >= 0:
            del self.hdr[pos:]
            self.hdr_done = True
        elif len(self.hdr) > MAX_HEADER_BYTES:
            self.hdr_done = True

    def _message_done(self) -> None:
        st = self.server.stats
        now = time.time()
        st.count += 1
        st.rcpts += self.rcpts
        st.bytes += self.msg_bytes
        if st.first_ts is None:
            st.first_ts = now
        st.last_ts = now
        st.version += 1
        if self.server.record_ids:
            mid = extract_message_id(bytes(self.hdr))
            if mid is None:
                st.missing_ids += 1
            else:
                st.message_ids.append(mid)
        self.in_data = False
        self.tail = b""
        self.hdr = bytearray()
        self.hdr_done = False
        self.msg_bytes = 0
        self.rcpts = 0

    def _consume_commands(self, out: list[bytes]) -> bytes | None:
        """Answer complete command lines in self.buf.

        Returns the unconsumed bytes if DATA mode was entered (the caller then
        scans them as message data), else None.
        """
        buf = self.buf
        start = 0
        for _ in range(1_000_000):
            nl = buf.find(b"\n", start)
            if nl < 0:
                break
            line = bytes(buf[start:nl]).rstrip(b"\r")
            start = nl + 1
            reply, enter_data = self._command(line)
            out.append(reply)
            if self.closing:
                del buf[:]
                return None
            if enter_data:
                rest = bytes(buf[start:])
                del buf[:]
                return rest
        del buf[:start]
        if len(buf) > MAX_LINE:
            del buf[:]
            out.append(b"500 5.5.6 Line too long\r\n")
        return None

    def _command(self, line: bytes) -> tuple[bytes, bool]:
        verb = line[:4].upper()
        if verb == b"MAIL":
            self.rcpts = 0
            return b"250 2.1.0 Ok\r\n", False
        if verb == b"RCPT":
            self.rcpts += 1
            return b"250 2.1.5 Ok\r\n", False
        if verb == b"DATA":
            self.in_data = True
            self.tail = b"\r\n"  # so an immediate ".\r\n" ends the message
            self.hdr = bytearray()
            self.hdr_done = False
            self.msg_bytes = 0
            return b"354 End data with <CR><LF>.<CR><LF>\r\n", True
        if verb == b"EHLO":
            return self.server.ehlo_reply, False
        if verb == b"HELO":
            return b"250 " + self.server.hostname.encode() + b"\r\n", False
        if verb == b"RSET":
            self.rcpts = 0
            return b"250 2.0.0 Ok\r\n", False
        if verb == b"QUIT":
            self.closing = True
            return b"221 2.0.0 Bye\r\n", False
        if verb == b"STAR":  # STARTTLS: not offered
            return b"454 4.7.0 TLS not available\r\n", False
        if verb == b"BDAT":  # CHUNKING: not offered
            return b"502 5.5.1 BDAT not supported\r\n", False
        return b"250 2.0.0 Ok\r\n", False


class SinkServer:
    def __init__(self, hostname: str, record_ids: bool, max_size: int) -> None:
        self.hostname = hostname
        self.record_ids = record_ids
        self.stats = Stats()
        self.conns: set[SinkProtocol] = set()
        self.greeting = f"220 {hostname} ESMTP bench sink\r\n".encode()
        self.ehlo_reply = EHLO_REPLY_TMPL.format(host=hostname, size=max_size).encode()

    def protocol(self) -> SinkProtocol:
        return SinkProtocol(self)

    def drop_idle(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            if now - conn.last_activity > IDLE_TIMEOUT and conn.transport is not None:
                conn.transport.write(b"421 4.4.2 Idle timeout\r\n")
                conn.transport.close()


def write_stats(path: str, server: SinkServer) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(server.stats.as_dict(server.record_ids), fh)
    os.replace(tmp, path)


def parse_hostport(s: str) -> tuple[str, int]:
    host, sep, port = s.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {s!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


async def amain(args: argparse.Namespace) -> int:
    host, port = args.listen
    server = SinkServer(args.hostname, args.record_ids, args.max_size)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(server.protocol, host, port, backlog=1024, reuse_address=True)
    sock_host, sock_port = srv.sockets[0].getsockname()[:2]
    print(f"listening {sock_host}:{sock_port}", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    deadline = time.monotonic() + args.max_runtime if args.max_runtime > 0 else None
    written_version = -1
    ticks = 0
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), STATS_INTERVAL)
        except TimeoutError:
            pass
        ticks += 1
        if args.stats_file and server.stats.version != written_version:
            written_version = server.stats.version
            write_stats(args.stats_file, server)
        if ticks % 10 == 0:
            server.drop_idle()
        if deadline is not None and time.monotonic() > deadline:
            print("sink: --max-runtime reached, exiting", file=sys.stderr)
            break

    srv.close()
    for conn in list(server.conns):
        if conn.transport is not None:
            conn.transport.abort()
    if args.stats_file:
        write_stats(args.stats_file, server)
    st = server.stats
    print(
        f"sink: {st.count} messages, {st.rcpts} recipients, {st.connections} connections",
        file=sys.stderr,
        flush=True,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fast counting SMTP sink")
    p.add_argument(
        "--listen",
        type=parse_hostport,
        default=("127.0.0.1", 2526),
        help="HOST:PORT to listen on (port 0 = ephemeral; default 127.0.0.1:2526)",
    )
    p.add_argument("--stats-file", default=None, help="write stats JSON here")
    p.add_argument(
        "--record-ids",
        action="store_true",
        help="extract the Message-ID of every message into the stats file",
    )
    p.add_argument("--hostname", default="sink.bench.test")
    p.add_argument("--max-size", type=int, default=52428800, help="SIZE to advertise")
    p.add_argument(
        "--max-runtime",
        type=float,
        default=6 * 3600,
        help="exit after this many seconds (0 = never; default 6h)",
    )
    args = p.parse_args(argv)
    if args.listen[0] not in ("127.0.0.1", "::1", "localhost"):
        p.error("the sink only listens on loopback")
    return asyncio.run(amain(args))


if __name__ == "__main__":
    sys.exit(main())
