#!/usr/bin/env python3
"""Crash test: SIGKILL the relay at chosen moments, restart it, and prove nothing acknowledged
was lost (DESIGN.md invariant 1: a 250 after DATA means the message is durably committed).

    client workers --SMTP--> relay (python -m relay serve) --SMTP--> throttle proxy --> sink.py
                                   ^ SIGKILL, restart, x --kills

One run:

1. A temp dir with `relay.toml` (queue in `var/relay.db`, log in `var/relay.log`), the counting
   sink `bench/sink.py --record-ids` on a free port, and an in-process TCP proxy in front of
   it (the relay's smarthost). In "slow" windows the proxy delays every chunk the relay
   sends, so deliveries are in flight when the kill comes.
2. `--clients` workers (loadgen's SMTP client) send messages with unique Message-IDs
   `<crash-RUNID-SEQ@crash.test>`, 1 KB to 1 MB, the body written in chunks. Every attempt
   gets a fresh ID; a message counts as acknowledged only when the reply to its final dot
   is 250. Sending is paced so that the messages are spread over the kill windows.
3. `--kills` times: after a random pause the killer is armed with one kind of moment and
   fires SIGKILL when it comes (or after 4 s anyway):
   - data:      a client is in the middle of its DATA (part of the body written);
   - commit:    a client has written the final dot and waits for the reply: the kill comes
                after a random delay up to the median time to 250 (if a client still waits
                then), so it falls while the relay reads, checks, commits (fsync) or writes
                its 250;
   - delivery:  the relay is sending a message body to the sink (mid-transfer);
   - after-250: the sink has just accepted a message; the kill comes 0-10 ms after its 250
                was passed to the relay, racing the relay's settle commit;
   - random:    no condition, just a random moment.
   The relay is restarted after each kill (the same port and queue).
4. When all kills are done and every message was attempted, the queue is left to drain,
   the relay is stopped with SIGTERM and the sink with SIGTERM (final stats).
5. Compared: every acknowledged Message-ID reached the sink (lost = 0), duplicates are
   counted, `PRAGMA integrity_check` is "ok", and no recipient is left 'active' (a lease)
   or 'queued'.

Prints messages sent, 250s, kills (per kind), arrived, lost, duplicated. Exit status 1 on
any loss, integrity failure, lease left behind, undrained queue, or fewer kills than asked.

    python bench/crash.py                                # 2000 messages, 20 kills
    python bench/crash.py --messages 300 --kills 5       # the CI form (tests/reliability)
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))   # bench/ is not a package: import its scripts

import loadgen
import run_e2e

KINDS = ("data", "commit", "delivery", "after-250", "random")
ARM_TIMEOUT = 4.0          # an armed kill that found no moment fires anyway
CHUNK = 16 * 1024          # client DATA and proxy chunks
SLOW_DELAY = 0.02          # proxy delay per chunk in slow windows

RELAY_TOML = """\
[server]
hostname = "relay.crash.test"
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
max_message_size = "25MiB"
command_timeout = "30s"
data_timeout = "60s"
[queue]
path = "var/relay.db"
retry = ["500ms", "1s", "2s"]
lifetime = "1h"
[outbound]
mode = "smarthost"
smarthost = "127.0.0.1:{proxy_port}"
tls = "none"
max_connections = 8
idle_timeout = "5s"
connect_timeout = "5s"
command_timeout = "30s"
[http]
listen = ""
[log]
file = "var/relay.log"
"""


class CrashError(Exception):
    pass


@dataclass
class Figures:
    sent: int = 0                      # attempts (each with its own Message-ID)
    acked: set[str] = field(default_factory=set)
    refused: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: int = 0                    # attempts cut off (connection lost, timeout)
    latencies: list[float] = field(default_factory=list)
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    kills_fallback: int = 0            # armed kills that fired after ARM_TIMEOUT
    at_kill: collections.Counter[str] = field(default_factory=collections.Counter)
    restarts: int = 0
    restart_s: list[float] = field(default_factory=list)


class Killer:
    """Holds the relay process; SIGKILLs it when an armed moment comes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.proc: subprocess.Popen[bytes] | None = None
        self.armed: str | None = None
        self.fired = asyncio.Event()
        self.fired_kind = ""
        self.workers_in_data = 0
        self.workers_in_commit = 0
        self.proxy_in_data = 0
        self.figures: Figures | None = None

    def arm(self, kind: str) -> None:
        self.fired.clear()
        self.fired_kind = ""
        self.armed = kind

    def fire(self, kind: str) -> None:
        """SIGKILL now, if `kind` is what is armed (the first trigger wins)."""
        if self.armed != kind or self.proc is None or self.proc.poll() is not None:
            return
        self.armed = None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.fired_kind = kind
        if self.figures is not None:
            # What was in flight at the instant of the kill.
            self.figures.at_kill["clients mid-DATA"] += self.workers_in_data
            self.figures.at_kill["clients awaiting 250"] += self.workers_in_commit
            self.figures.at_kill["deliveries mid-transfer"] += self.proxy_in_data
        self.fired.set()

    def fire_later(self, kind: str, delay: float,
                   condition: Callable[[], bool] | None = None) -> None:
        """Claim the armed moment now, SIGKILL after `delay` seconds if `condition()` still
        holds then (otherwise the kill is armed again for the next such moment)."""
        if self.armed != kind:
            return
        pending = f"{kind}:pending"
        self.armed = pending

        def later() -> None:
            if self.armed != pending:
                return
            if condition is None or condition():
                self.fire(pending)
            else:
                self.armed = kind

        asyncio.get_running_loop().call_later(delay, later)


# ------------------------------------------------------------------ proxy
class Proxy:
    """TCP proxy relay -> sink that sees where each SMTP transaction is (by the sink's
    replies) and can delay the relay's data (slow windows)."""

    def __init__(self, target_port: int, killer: Killer) -> None:
        self.target_port = target_port
        self.killer = killer
        self.slow = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        state = {"in_data": False}
        try:
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                return
            pumps = {asyncio.create_task(self._up(reader, up_w, state)),
                     asyncio.create_task(self._down(up_r, writer, state))}
            try:
                await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pump in pumps:
                    pump.cancel()
                await asyncio.gather(*pumps, return_exceptions=True)
                up_w.close()
        finally:
            if state["in_data"]:
                self.killer.proxy_in_data -= 1
            writer.close()
            self._tasks.discard(task)

    async def _up(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  state: dict[str, bool]) -> None:
        """relay -> sink."""
        while True:
            chunk = await reader.read(CHUNK)
            if not chunk:
                return
            if state["in_data"]:
                self.killer.fire("delivery")   # a body is on its way to the sink
            if self.slow:
                await asyncio.sleep(SLOW_DELAY)
            writer.write(chunk)
            await writer.drain()

    async def _down(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    state: dict[str, bool]) -> None:
        """sink -> relay, reply line by line (the sink may batch pipelined replies)."""
        while True:
            line = await reader.readline()
            if not line:
                return
            accepted = False
            if line.startswith(b"354"):
                state["in_data"] = True
                self.killer.proxy_in_data += 1
            elif state["in_data"] and line[:1] in (b"2", b"4", b"5") and line[3:4] == b" ":
                state["in_data"] = False
                self.killer.proxy_in_data -= 1
                accepted = line.startswith(b"250")
            writer.write(line)
            await writer.drain()
            if accepted:
                # The sink has the message; the relay may or may not settle it in time.
                self.killer.fire_later("after-250", self.killer.rng.uniform(0.0, 0.010))


# ------------------------------------------------------------------ clients
class Plan:
    """Hands out sequence numbers, paced so that every kill window has traffic: at a steady
    rate (all messages over the expected length of the kill phase), and never more than
    the windows so far allow (one window ahead while a kill is armed)."""

    def __init__(self, n: int, kills: int, killer: Killer, window: float = 1.3) -> None:
        self.n = n
        self.kills = kills
        self.killer = killer
        self.rate = n / (kills * window) if kills else 0.0
        self.start = time.monotonic()
        self.next = 0
        self.kills_done = 0
        self.release_all = False

    def allowed(self) -> int:
        if self.release_all or self.kills == 0:
            return self.n
        ahead = 2 if self.killer.armed is not None else 1
        return min(self.n, self.n * (self.kills_done + ahead) // self.kills)

    def due(self) -> float:
        if self.release_all or not self.rate:
            return 0.0
        return self.start + self.next / self.rate

    async def take(self, deadline: float) -> int | None:
        while time.monotonic() < deadline:
            if self.next >= self.n:
                return None
            if self.next < self.allowed() and time.monotonic() >= self.due():
                seq = self.next
                self.next += 1
                return seq
            await asyncio.sleep(0.01)
        return None


def body_size(rng: random.Random) -> int:
    roll = rng.random()
    if roll < 0.70:
        return rng.randint(1_000, 4_000)
    if roll < 0.95:
        return rng.randint(20_000, 100_000)
    return rng.randint(300_000, 1_000_000)


class Bodies:
    """Message bodies by size bucket (built once; dot-stuffed, CRLF, ending in CRLF)."""

    def __init__(self) -> None:
        self._cache: dict[int, bytes] = {}

    def get(self, size: int) -> bytes:
        bucket = max(1_000, size // 1_000 * 1_000)
        if bucket not in self._cache:
            self._cache[bucket] = loadgen.dot_stuff(loadgen.make_body(bucket))
        return self._cache[bucket]


async def send_one(client: loadgen.Client, seq: int, run_id: str, body: bytes,
                   killer: Killer, fig: Figures) -> None:
    """One transaction, one command at a time; DATA written in chunks."""
    mid = f"<crash-{run_id}-{seq}@crash.test>"
    code, _ = await client.command("MAIL FROM:<crash@bench.test>")
    if code != 250:
        fig.refused[f"MAIL {code}"] += 1
        await client.command("RSET")
        return
    code, _ = await client.command(f"RCPT TO:<rcpt{seq % 7}@example.net>")
    if code not in (250, 251):
        fig.refused[f"RCPT {code}"] += 1
        await client.command("RSET")
        return
    code, _ = await client.command("DATA")
    if code != 354:
        fig.refused[f"DATA {code}"] += 1
        return
    head = (f"From: Crash <crash@bench.test>\r\nTo: rcpt{seq % 7}@example.net\r\n"
            f"Subject: crash {run_id} {seq}\r\nMessage-ID: {mid}\r\n\r\n").encode()
    w = client.writer
    killer.workers_in_data += 1
    try:
        w.write(head)
        await w.drain()
        half = len(body) // 2
        for start in range(0, len(body), CHUNK):
            if start >= half:
                killer.fire("data")    # part of the body written, the rest to come
            w.write(body[start:start + CHUNK])
            await w.drain()
        w.write(b".\r\n")
        await w.drain()
    finally:
        killer.workers_in_data -= 1
    t0 = time.perf_counter()
    if killer.armed == "commit":
        typical = statistics.median(fig.latencies[-50:]) if fig.latencies else 0.02
        # Only while some client still waits for its reply: read, check, commit, 250.
        killer.fire_later("commit", killer.rng.uniform(0.0, typical),
                          lambda: killer.workers_in_commit > 0)
    killer.workers_in_commit += 1
    try:
        code, _ = await client.reply()
    finally:
        killer.workers_in_commit -= 1
    if code == 250:
        fig.acked.add(mid)
        fig.latencies.append(time.perf_counter() - t0)
    else:
        fig.refused[f"EOD {code}"] += 1


async def worker(port: int, run_id: str, plan: Plan, bodies: Bodies, killer: Killer,
                 fig: Figures, rng: random.Random, deadline: float) -> None:
    client: loadgen.Client | None = None
    seq: int | None = None
    while time.monotonic() < deadline:
        if client is None:
            try:
                client = await loadgen.Client.connect("127.0.0.1", port, 5.0)
                async with asyncio.timeout(10):
                    await client.hello("crash.bench.test")
            except (TimeoutError, OSError, loadgen.SMTPReplyError):
                if client is not None:
                    client.close()
                client = None
                await asyncio.sleep(0.05)   # the relay is down (killed) or restarting
                continue
        if seq is None:
            seq = await plan.take(deadline)
            if seq is None:
                break
        body = bodies.get(body_size(rng))
        fig.sent += 1
        try:
            async with asyncio.timeout(60):
                await send_one(client, seq, run_id, body, killer, fig)
        except (TimeoutError, OSError, loadgen.SMTPReplyError):
            fig.errors += 1
            client.close()
            client = None
        seq = None   # every attempt has its own Message-ID
    if client is not None:
        await client.quit()


# ------------------------------------------------------------------ processes
def start_sink(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = open(tmp / "sink.log", "wb")  # noqa: SIM115 - closed right after Popen
    proc = subprocess.Popen(
        [sys.executable, str(BENCH_DIR / "sink.py"), "--listen", "127.0.0.1:0",
         "--stats-file", str(tmp / "sink.json"), "--record-ids", "--max-runtime", "3600"],
        stdout=subprocess.PIPE, stderr=log)
    log.close()
    try:
        line = run_e2e.read_line_with_timeout(proc, 15)
    except run_e2e.BenchError:
        run_e2e.stop_process(proc, 2)
        raise
    if not line.startswith("listening "):
        run_e2e.stop_process(proc, 2)
        raise CrashError(f"unexpected sink output {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def start_relay(tmp: Path, cfg: Path) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    with open(tmp / "relay.out", "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                                cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT)


async def relay_up(tmp: Path, cfg: Path, port: int, fig: Figures) -> subprocess.Popen[bytes]:
    t0 = time.monotonic()
    proc = start_relay(tmp, cfg)
    try:
        await asyncio.to_thread(run_e2e.wait_smtp_ready, port, proc, 30.0, tmp / "relay.out")
    except run_e2e.BenchError as exc:
        run_e2e.stop_process(proc, 5)
        raise CrashError(f"relay did not come back: {exc}") from exc
    fig.restart_s.append(time.monotonic() - t0)
    return proc


def db_counts(db: Path) -> dict[str, int]:
    """Recipients per state and the number of messages, read-only (the relay is running)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        out = dict(conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state"))
        out["messages"] = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        return out
    finally:
        conn.close()


def db_final(db: Path) -> dict[str, Any]:
    """After the relay has stopped: integrity, leases, anything left."""
    conn = sqlite3.connect(db, timeout=5)
    try:
        integrity = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        states = dict(conn.execute("SELECT state, COUNT(*) FROM recipients GROUP BY state"))
        messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
        events = dict(conn.execute("SELECT event, COUNT(*) FROM events GROUP BY event"))
    finally:
        conn.close()
    return {"integrity": integrity, "states": states, "messages": messages, "events": events}


async def wait_drained(db: Path, relay: subprocess.Popen[bytes], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if relay.poll() is not None:
            return False
        try:
            counts = await asyncio.to_thread(db_counts, db)
        except sqlite3.Error:
            counts = {"messages": -1}
        if counts.get("messages") == 0 and not counts.get("queued") and not counts.get("active"):
            return True
        await asyncio.sleep(0.25)
    return False


_RECOVERED = re.compile(r"queue: (\d+) recipient\(s\) of interrupted deliveries returned")


# ------------------------------------------------------------------ the run
async def crash_run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rng = random.Random(args.seed)
    run_id = secrets.token_hex(4)
    fig = Figures()
    killer = Killer(rng)
    killer.figures = fig
    (tmp / "var").mkdir()
    sink, sink_port = start_sink(tmp)
    proxy = Proxy(sink_port, killer)
    relay: subprocess.Popen[bytes] | None = None
    tasks: list[asyncio.Task[None]] = []
    result: dict[str, Any] = {"tmp": str(tmp), "run_id": run_id}
    try:
        await proxy.start()
        port = run_e2e.free_port()
        cfg = tmp / "relay.toml"
        cfg.write_text(RELAY_TOML.format(port=port, proxy_port=proxy.port))
        relay = await relay_up(tmp, cfg, port, fig)
        killer.proc = relay

        start = time.monotonic()
        deadline = start + args.seconds
        plan = Plan(args.messages, args.kills, killer)
        bodies = Bodies()
        tasks = [asyncio.create_task(worker(port, run_id, plan, bodies, killer, fig,
                                            random.Random(rng.random()), deadline))
                 for _ in range(args.clients)]

        kinds: list[str] = []
        for _ in range(args.kills):
            if not kinds:
                kinds = list(KINDS)
                rng.shuffle(kinds)
            kind = kinds.pop()
            if time.monotonic() > deadline:
                break
            proxy.slow = rng.random() < 0.5 or kind == "delivery"
            await asyncio.sleep(rng.uniform(0.2, 1.0))
            killer.arm(kind)
            if kind == "random":
                killer.fire("random")
            try:
                await asyncio.wait_for(killer.fired.wait(), ARM_TIMEOUT)
            except TimeoutError:
                fig.kills_fallback += 1
                killer.armed = "fallback"
                killer.fire("fallback")
            fig.kills[killer.fired_kind.removesuffix(":pending")] += 1
            await asyncio.to_thread(relay.wait, 10)
            plan.kills_done += 1
            relay = await relay_up(tmp, cfg, port, fig)
            killer.proc = relay
            fig.restarts += 1
        plan.release_all = True
        proxy.slow = False
        killed_at = time.monotonic()
        await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()) + 70)
        result["send_s"] = round(time.monotonic() - start, 1)
        result["after_last_kill_s"] = round(time.monotonic() - killed_at, 1)

        db = tmp / "var" / "relay.db"
        drained = await wait_drained(db, relay, args.drain_timeout)
        result["drained"] = drained
        rc, _ = await asyncio.to_thread(run_e2e.stop_process, relay, 20)
        result["relay_exit"] = rc
        await asyncio.sleep(0.6)   # the sink writes its stats every 0.5 s
        await asyncio.to_thread(run_e2e.stop_process, sink, 5)
        result["db"] = db_final(db)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await proxy.stop()
        if relay is not None and relay.poll() is None:
            run_e2e.stop_process(relay, 5)
        if sink.poll() is None:
            run_e2e.stop_process(sink, 5)

    stats = run_e2e.read_json(tmp / "sink.json") or {}
    prefix = f"<crash-{run_id}-"
    arrivals = collections.Counter(i for i in stats.get("message_ids", []) if i.startswith(prefix))
    log_text = ""
    for name in ("var/relay.log", "relay.out"):
        with contextlib.suppress(OSError):
            log_text += (tmp / name).read_text("utf-8", "replace")
    lost = sorted(fig.acked - set(arrivals))
    result.update({
        "sent": fig.sent,
        "acked": len(fig.acked),
        "refused": dict(fig.refused),
        "cut_off": fig.errors,
        "kills": sum(fig.kills.values()),
        "kills_by_kind": dict(fig.kills),
        "kills_fallback": fig.kills_fallback,
        "in_flight_at_kills": dict(fig.at_kill),
        "restart_s_median": round(statistics.median(fig.restart_s), 2) if fig.restart_s else None,
        "arrived": len(arrivals),
        "arrivals_total": sum(arrivals.values()),
        "lost": len(lost),
        "lost_ids": lost[:20],
        "duplicated": sum(1 for c in arrivals.values() if c > 1),
        "duplicate_copies": sum(c - 1 for c in arrivals.values() if c > 1),
        "arrived_without_250": len(set(arrivals) - fig.acked),
        "leases_recovered": sum(int(n) for n in _RECOVERED.findall(log_text)),
        "tracebacks_logged": log_text.count("Traceback"),
        "sink_missing_ids": stats.get("missing_ids", 0),
    })
    return result


def verdict(r: dict[str, Any], args: argparse.Namespace) -> list[str]:
    problems = []
    if r["lost"]:
        problems.append(f"{r['lost']} acknowledged message(s) lost: {r['lost_ids']}")
    if r["db"]["integrity"] != ["ok"]:
        problems.append(f"integrity_check: {r['db']['integrity'][:5]}")
    states = r["db"]["states"]
    if states.get("active"):
        problems.append(f"{states['active']} recipient(s) left 'active' (lease left behind)")
    if states.get("queued") or r["db"]["messages"] or not r["drained"]:
        problems.append(f"queue not drained: states {states}, messages {r['db']['messages']}")
    if r["kills"] < args.kills:
        problems.append(f"only {r['kills']} of {args.kills} kills within --seconds")
    if not r["acked"]:
        problems.append("no message was acknowledged at all")
    return problems


def report(r: dict[str, Any]) -> None:
    print(f"messages sent        {r['sent']}  (250s: {r['acked']}, refused: "
          f"{r['refused'] or 0}, cut off by a kill: {r['cut_off']})")
    print(f"250s                 {r['acked']}")
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["kills_by_kind"].items()))
    print(f"kills                {r['kills']}  ({kinds}; fell back to a plain kill after "
          f"{ARM_TIMEOUT:g}s: {r['kills_fallback']}); median restart {r['restart_s_median']} s")
    print(f"in flight at kills   {r['in_flight_at_kills']}; leases recovered at restart: "
          f"{r['leases_recovered']}")
    print(f"arrived              {r['arrived']}  (copies in all: {r['arrivals_total']}; arrived "
          f"without a 250: {r['arrived_without_250']})")
    print(f"lost                 {r['lost']}")
    print(f"duplicated           {r['duplicated']}  (extra copies: {r['duplicate_copies']})")
    db = r["db"]
    print(f"queue db             integrity_check {','.join(db['integrity'][:3])}; states left "
          f"{db['states'] or '{}'}; messages left {db['messages']}; events {db['events']}")
    print(f"tracebacks in log    {r['tracebacks_logged']}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="SIGKILL the relay repeatedly; check nothing "
                                "acknowledged is lost")
    p.add_argument("--messages", type=int, default=2000, help="messages to attempt")
    p.add_argument("--kills", type=int, default=20, help="SIGKILLs (each followed by a restart)")
    p.add_argument("--seconds", type=float, default=150.0,
                   help="bound on the sending and killing phase")
    p.add_argument("--drain-timeout", type=float, default=90.0)
    p.add_argument("--clients", type=int, default=8, help="concurrent SMTP clients")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json", action="store_true", help="also print one JSON object")
    args = p.parse_args(argv)
    if args.messages < 1 or args.kills < 0 or args.clients < 1 or args.seconds <= 0:
        p.error("need --messages >= 1, --kills >= 0, --clients >= 1, --seconds > 0")
    if args.seed is None:
        args.seed = secrets.randbelow(2**32)
    tmp = Path(tempfile.mkdtemp(prefix="relay-crash-"))
    print(f"crash run: messages={args.messages} kills={args.kills} clients={args.clients} "
          f"seed={args.seed} dir={tmp}", flush=True)
    ok = False
    try:
        try:
            r = asyncio.run(crash_run(args, tmp))
        except (CrashError, run_e2e.BenchError) as exc:
            print(f"FAILED: {exc}")
            return 1
        report(r)
        problems = verdict(r, args)
        if args.json:
            print(json.dumps({k: v for k, v in r.items()}, default=str))
        for problem in problems:
            print(f"FAIL: {problem}")
        ok = not problems
        print("OK: nothing acknowledged was lost" if ok else "FAILED")
        return 0 if ok else 1
    finally:
        if args.keep or not ok:
            print(f"run dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
