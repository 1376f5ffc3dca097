#!/usr/bin/env python3
"""asyncio SMTP load generator.

Opens ``-c`` connections and sends ``-n`` messages in total over them,
reusing each connection (MAIL/RCPT/DATA repeated). Uses its own minimal
SMTP client over ``asyncio.StreamReader``/``StreamWriter``. When the server
advertises PIPELINING, MAIL, all RCPTs and DATA are sent in one write
(RFC 2920); otherwise each command waits for its reply.

Each message has From/To/Subject/Date/Message-ID headers, the Message-ID
being ``<bench-RUNID-SEQ@bench.test>`` (SEQ = 0..n-1), and a body of exactly
``--size`` bytes made of 76-character lines with CRLF endings.

Latency is measured per message from writing the final ``.`` to receiving
the reply to it. Replies other than 250 are counted by code.

    python bench/loadgen.py --host 127.0.0.1 --port 2525 -n 10000 -c 10 \\
        --size 5120 --rcpts 1 [--rcpt-domain example.net] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import secrets
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

LINE_LEN = 76


class SMTPReplyError(Exception):
    """Protocol-level failure (malformed reply, unexpected close, ...)."""


@dataclass
class Results:
    accepted: int = 0
    accepted_rcpts: int = 0  # recipients accepted (250/251) in accepted messages
    refused: int = 0  # messages that did not get a final 250
    refused_by_code: Counter[str] = field(default_factory=Counter)
    rcpt_refused_by_code: Counter[str] = field(default_factory=Counter)
    errors: int = 0  # messages lost to connection/protocol errors/timeouts
    error_kinds: Counter[str] = field(default_factory=Counter)
    not_sent: int = 0
    latencies: list[float] = field(default_factory=list)  # seconds
    latency_at: list[float] = field(default_factory=list)  # perf_counter at each final dot
    accepted_ids: list[str] = field(default_factory=list)
    first_send_ts: float | None = None  # wall clock
    last_reply_ts: float | None = None  # wall clock
    connections_opened: int = 0
    pipelining_used: int = 0  # connections on which PIPELINING was used


class Plan:
    """Hands out message sequence numbers to the connection workers."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.next = 0

    def take(self) -> int | None:
        if self.next >= self.n:
            return None
        seq = self.next
        self.next += 1
        return seq


def make_body(size: int) -> bytes:
    """A body of exactly ``size`` bytes (``size`` >= 2): lines of 76 chars + CRLF.

    The last line is shorter; if only one byte would be left over, the line
    before it is shortened by one so that the body still ends in CRLF.
    No line starts with ".", so no dot-stuffing is needed (it is applied
    anyway for correctness).
    """
    size = max(2, size)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    lengths: list[int] = []  # text length of each line (without CRLF)
    remaining = size
    while remaining >= LINE_LEN + 2:
        lengths.append(LINE_LEN)
        remaining -= LINE_LEN + 2
    if remaining == 1:
        if lengths:
            lengths[-1] -= 1
            lengths.append(0)
        else:  # cannot happen as size >= 2
            lengths.append(0)
    elif remaining >= 2:
        lengths.append(remaining - 2)
    lines = [(f"L{i:06d} " + alphabet * 2)[:n].encode() + b"\r\n" for i, n in enumerate(lengths)]
    return b"".join(lines)


def dot_stuff(data: bytes) -> bytes:
    if data.startswith(b"."):
        data = b"." + data
    return data.replace(b"\r\n.", b"\r\n..")


class Message:
    """Pre-rendered message template; only headers change per message."""

    def __init__(self, args: argparse.Namespace, run_id: str) -> None:
        self.run_id = run_id
        self.mail_from = args.mail_from
        self.rcpts = [f"rcpt{j}@{args.rcpt_domain}" for j in range(max(1, args.rcpts))]
        self.to_header = ", ".join(self.rcpts)
        body = dot_stuff(make_body(args.size))
        if not body.endswith(b"\r\n"):
            body += b"\r\n"
        self.body_and_dot = body + b".\r\n"
        # Every message gets a body of its own: the first line carries its sequence
        # number (same length), so nothing that remembers a body helps across messages.
        first = body.find(b"\r\n")
        self._first_len = first if first >= 24 else 0
        self._rest_and_dot = self.body_and_dot[first:] if self._first_len else b""
        self._date = ""
        self._date_at = 0.0

    def date(self) -> str:
        now = time.time()
        if now - self._date_at >= 1.0:
            self._date = formatdate(now, localtime=False)
            self._date_at = now
        return self._date

    def body_and_dot_for(self, seq: int) -> bytes:
        """The body (with the final dot) of message `seq`: unique per message."""
        if not self._first_len:
            return self.body_and_dot
        line = f"bench {self.run_id} {seq} ".encode().ljust(self._first_len, b"-")
        return line[:self._first_len] + self._rest_and_dot

    def message_id(self, seq: int) -> str:
        return f"<bench-{self.run_id}-{seq}@bench.test>"

    def headers(self, seq: int) -> bytes:
        return (
            f"From: Bench <{self.mail_from}>\r\n"
            f"To: {self.to_header}\r\n"
            f"Subject: bench {self.run_id} {seq}\r\n"
            f"Date: {self.date()}\r\n"
            f"Message-ID: {self.message_id(seq)}\r\n"
            "\r\n"
        ).encode()


class Client:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.extensions: dict[str, str] = {}

    @classmethod
    async def connect(cls, host: str, port: int, timeout: float) -> Client:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, port, limit=1 << 20), timeout
        )
        return cls(reader, writer, timeout)

    async def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        for _ in range(1000):  # bounded multi-line reply
            # Callers bound the whole exchange with asyncio.timeout(); a
            # wait_for() per line costs noticeable CPU at high rates.
            raw = await self.reader.readline()
            if not raw:
                raise SMTPReplyError("connection closed by server")
            if len(raw) < 4 or not raw[:3].isdigit():
                raise SMTPReplyError(f"malformed reply {raw[:80]!r}")
            lines.append(raw[4:].rstrip(b"\r\n").decode("utf-8", "replace"))
            if raw[3:4] != b"-":
                return int(raw[:3]), lines
        raise SMTPReplyError("reply too long")

    async def command(self, line: str) -> tuple[int, list[str]]:
        self.writer.write(line.encode() + b"\r\n")
        return await self.reply()

    async def hello(self, name: str) -> None:
        code, _ = await self.reply()
        if code != 220:
            raise SMTPReplyError(f"greeting {code}")
        code, lines = await self.command(f"EHLO {name}")
        if code == 250:
            for ext in lines[1:]:
                key, _, val = ext.partition(" ")
                self.extensions[key.upper()] = val
            return
        code, _ = await self.command(f"HELO {name}")
        if code != 250:
            raise SMTPReplyError(f"HELO {code}")

    async def quit(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.readline(), 2.0)
        except (TimeoutError, OSError, SMTPReplyError):
            pass
        self.close()

    def close(self) -> None:
        try:
            self.writer.close()
        except OSError:
            pass


async def send_one(
    client: Client,
    msg: Message,
    seq: int,
    res: Results,
    pipelining: bool,
) -> None:
    """Send one message on an established connection and record the outcome."""
    w = client.writer
    mail = f"MAIL FROM:<{msg.mail_from}>".encode()
    if "SIZE" in client.extensions:
        mail += f" SIZE={len(msg.body_and_dot) + 200}".encode()
    rcpt_lines = [f"RCPT TO:<{r}>\r\n".encode() for r in msg.rcpts]
    ok_rcpts = 0
    first_bad_rcpt: str | None = None

    if res.first_send_ts is None:
        res.first_send_ts = time.time()

    if pipelining:
        w.write(mail + b"\r\n" + b"".join(rcpt_lines) + b"DATA\r\n")
        mail_code, _ = await client.reply()
        for _ in rcpt_lines:
            code, _ = await client.reply()
            if code in (250, 251):
                ok_rcpts += 1
            else:
                res.rcpt_refused_by_code[str(code)] += 1
                first_bad_rcpt = first_bad_rcpt or str(code)
        data_code, _ = await client.reply()
        if mail_code != 250:
            res.refused += 1
            res.refused_by_code[f"MAIL {mail_code}"] += 1
            if data_code == 354:  # misbehaving server: close the transaction
                w.write(b".\r\n")
                await client.reply()
            return
    else:
        mail_code, _ = await client.command(mail.decode())
        if mail_code != 250:
            res.refused += 1
            res.refused_by_code[f"MAIL {mail_code}"] += 1
            return
        for line in rcpt_lines:
            w.write(line)
            code, _ = await client.reply()
            if code in (250, 251):
                ok_rcpts += 1
            else:
                res.rcpt_refused_by_code[str(code)] += 1
                first_bad_rcpt = first_bad_rcpt or str(code)
        if ok_rcpts == 0:
            res.refused += 1
            res.refused_by_code[f"RCPT {first_bad_rcpt}"] += 1
            await client.command("RSET")
            return
        data_code, _ = await client.command("DATA")

    if data_code != 354:
        res.refused += 1
        if ok_rcpts == 0:
            res.refused_by_code[f"RCPT {first_bad_rcpt}"] += 1
        else:
            res.refused_by_code[f"DATA {data_code}"] += 1
        if not pipelining:
            await client.command("RSET")
        return
    if ok_rcpts == 0:
        # RFC 2920: DATA accepted without valid recipients -> send "." only.
        w.write(b".\r\n")
        await client.reply()
        res.refused += 1
        res.refused_by_code[f"RCPT {first_bad_rcpt}"] += 1
        return

    w.write(msg.headers(seq) + msg.body_and_dot_for(seq))
    t0 = time.perf_counter()
    await w.drain()
    code, _ = await client.reply()
    t1 = time.perf_counter()
    if code == 250:
        res.accepted += 1
        res.accepted_rcpts += ok_rcpts
        res.latencies.append(t1 - t0)
        res.latency_at.append(t0)
        res.accepted_ids.append(msg.message_id(seq))
        res.last_reply_ts = time.time()
    else:
        res.refused += 1
        res.refused_by_code[f"EOD {code}"] += 1


async def worker(
    wid: int,
    args: argparse.Namespace,
    plan: Plan,
    msg: Message,
    res: Results,
    deadline: float,
) -> None:
    failures = 0
    client: Client | None = None
    while time.monotonic() < deadline:
        if client is None:
            try:
                client = await Client.connect(args.host, args.port, args.timeout)
                res.connections_opened += 1
                async with asyncio.timeout(args.timeout):
                    await client.hello(args.helo)
            except (TimeoutError, OSError, SMTPReplyError) as exc:
                if client is not None:
                    client.close()
                    client = None
                failures += 1
                res.error_kinds[f"connect: {type(exc).__name__}: {exc}"[:120]] += 1
                if failures >= args.max_failures:
                    return
                await asyncio.sleep(min(0.05 * failures, 1.0))
                continue
            pipelining = "PIPELINING" in client.extensions and not args.no_pipelining
            if pipelining:
                res.pipelining_used += 1
        seq = plan.take()
        if seq is None:
            break
        try:
            async with asyncio.timeout(args.timeout):
                await send_one(client, msg, seq, res, pipelining)
            failures = 0
        except (TimeoutError, OSError, SMTPReplyError) as exc:
            res.errors += 1
            res.error_kinds[f"{type(exc).__name__}: {exc}"[:120]] += 1
            client.close()
            client = None
            failures += 1
            if failures >= args.max_failures:
                return
    if client is not None:
        await client.quit()


def percentile(sorted_vals: list[float], q: float) -> float | None:
    if not sorted_vals:
        return None
    k = math.ceil(q / 100.0 * len(sorted_vals)) - 1  # nearest-rank
    return sorted_vals[max(0, min(len(sorted_vals) - 1, k))]


async def run(args: argparse.Namespace) -> dict[str, Any]:
    run_id = args.run_id or secrets.token_hex(4)
    msg = Message(args, run_id)
    plan = Plan(args.n)
    res = Results()
    start = time.perf_counter()
    deadline = time.monotonic() + args.max_duration
    tasks = [
        asyncio.create_task(worker(i, args, plan, msg, res, deadline))
        for i in range(max(1, min(args.c, args.n) if args.n > 0 else 1))
    ]
    await asyncio.wait(tasks, timeout=args.max_duration + args.timeout + 5)
    for t in tasks:
        if not t.done():
            t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.perf_counter() - start
    res.not_sent = args.n - plan.next

    lat = sorted(res.latencies)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000.0, 3)

    out: dict[str, Any] = {
        "run_id": run_id,
        "host": args.host,
        "port": args.port,
        "n": args.n,
        "c": args.c,
        "size": args.size,
        "rcpts": args.rcpts,
        "accepted": res.accepted,
        "accepted_rcpts": res.accepted_rcpts,
        "refused": res.refused,
        "refused_by_code": dict(res.refused_by_code),
        "rcpt_refused_by_code": dict(res.rcpt_refused_by_code),
        "errors": res.errors,
        "error_kinds": dict(res.error_kinds),
        "not_sent": res.not_sent,
        "elapsed_s": round(elapsed, 4),
        "accepted_per_s": round(res.accepted / elapsed, 1) if elapsed > 0 else None,
        "latency_ms": {
            "p50": ms(percentile(lat, 50)),
            "p90": ms(percentile(lat, 90)),
            "p99": ms(percentile(lat, 99)),
            "max": ms(lat[-1] if lat else None),
            "mean": ms(sum(lat) / len(lat) if lat else None),
        },
        "first_send_ts": res.first_send_ts,
        "last_reply_ts": res.last_reply_ts,
        "connections_opened": res.connections_opened,
        "pipelining_connections": res.pipelining_used,
        "message_bytes": len(msg.headers(0)) + len(msg.body_and_dot) - 3,
    }
    if args.ids_out:
        out["_accepted_ids"] = res.accepted_ids
    if args.latency_out:
        first = min(res.latency_at, default=0.0)
        out["_latencies"] = [(at - first, lat) for at, lat in
                             zip(res.latency_at, res.latencies, strict=True)]
    return out


def print_human(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    print(f"target          {r['host']}:{r['port']}  (run id {r['run_id']})")
    print(
        f"load            n={r['n']} c={r['c']} size={r['size']} rcpts={r['rcpts']}"
        f"  message ~{r['message_bytes']} B  pipelining on "
        f"{r['pipelining_connections']}/{r['connections_opened']} connections"
    )
    print(f"accepted        {r['accepted']}")
    print(f"refused         {r['refused']}  {r['refused_by_code'] or ''}")
    if r["rcpt_refused_by_code"]:
        print(f"rcpt refused    {r['rcpt_refused_by_code']}")
    if r["errors"] or r["error_kinds"]:
        print(f"errors          {r['errors']}  {r['error_kinds']}")
    if r["not_sent"]:
        print(f"not sent        {r['not_sent']}")
    print(f"elapsed         {r['elapsed_s']:.3f} s")
    print(f"accepted/s      {r['accepted_per_s']}")
    print(f"latency to 250  p50 {lat['p50']} ms  p99 {lat['p99']} ms  max {lat['max']} ms")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="asyncio SMTP load generator")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=2525)
    p.add_argument("-n", type=int, default=10000, help="messages in total")
    p.add_argument("-c", type=int, default=10, help="concurrent connections")
    p.add_argument("--size", type=int, default=5120, help="body size in bytes")
    p.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    p.add_argument("--rcpt-domain", default="example.net")
    p.add_argument("--mail-from", default="bench@bench.test")
    p.add_argument("--helo", default="loadgen.bench.test")
    p.add_argument("--run-id", default=None, help="RUNID used in Message-IDs")
    p.add_argument("--no-pipelining", action="store_true", help="never pipeline")
    p.add_argument("--timeout", type=float, default=60.0, help="timeout per transaction (s)")
    p.add_argument("--max-duration", type=float, default=3600.0, help="stop sending after this (s)")
    p.add_argument(
        "--max-failures",
        type=int,
        default=5,
        help="consecutive failures after which a connection worker gives up",
    )
    p.add_argument("--ids-out", default=None, help="write accepted Message-IDs here")
    p.add_argument("--latency-out", default=None,
                   help="write one line per accepted message: seconds since the first final "
                        "dot, then ms to its 250 (where in the run the slow ones fall)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        p.error("loadgen only targets loopback")
    if args.n < 0 or args.c < 1 or args.size < 0 or args.rcpts < 1:
        p.error("need -n >= 0, -c >= 1, --size >= 0, --rcpts >= 1")
    r = asyncio.run(run(args))
    ids: list[str] = r.pop("_accepted_ids", [])
    latencies: list[tuple[float, float]] = r.pop("_latencies", [])
    if args.latency_out:
        with open(args.latency_out, "w", encoding="utf-8") as fh:
            fh.writelines(f"{at:.4f} {lat * 1000:.2f}\n" for at, lat in latencies)
    if args.ids_out:
        with open(args.ids_out, "w", encoding="utf-8") as fh:
            fh.writelines(i + "\n" for i in ids)
    if args.json:
        print(json.dumps(r))
    else:
        print_human(r)
    return 0 if r["accepted"] == args.n else 1


if __name__ == "__main__":
    sys.exit(main())
