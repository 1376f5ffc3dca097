"""SIGTERM in the middle of a load loses no accepted message: restart, then count at the
sink (DESIGN.md invariant 1, the shutdown order of STYLE rule 6)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time

import aiosmtplib

from tests.support.downstream import Downstream
from tests.test_lifecycle import free_port, write_config


async def start(cfg) -> asyncio.subprocess.Process:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(cfg),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    log = cfg.parent / "var" / "relay.log"
    end = time.monotonic() + 20
    while not (log.exists() and log.read_text().count("daemon started") >
               log.read_text().count("daemon stopped")):
        assert time.monotonic() < end and proc.returncode is None, "relay did not start"
        await asyncio.sleep(0.05)
    return proc


async def test_sigterm_mid_load_loses_nothing(tmp_path, downstream: Downstream) -> None:
    downstream.script("EOD", "stall:0.05", times=None)   # keep deliveries in flight
    port = free_port()
    cfg = tmp_path / "relay.toml"
    write_config(cfg, port, downstream.port)
    proc = await start(cfg)
    accepted: list[str] = []
    stop_sending = asyncio.Event()

    async def client(n: int) -> None:
        i = 0
        while not stop_sending.is_set() and i < 200:
            mid = f"<load-{n}-{i}@example.com>"
            data = (f"From: a@example.com\r\nSubject: {i}\r\nMessage-ID: {mid}\r\n\r\n"
                    f"body {i}\r\n").encode()
            try:
                async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=10) as c:
                    await c.sendmail("a@example.com", [f"r{n}@example.net"], data)
                accepted.append(mid)
            except (aiosmtplib.SMTPException, OSError):
                pass      # refused or cut off during shutdown: not accepted, the client retries
            i += 1

    clients = [asyncio.create_task(client(n)) for n in range(5)]
    while len(accepted) < 60:
        await asyncio.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(proc.wait(), 60) == 0
    stop_sending.set()
    await asyncio.gather(*clients)
    proc = await start(cfg)           # the rest of the queue goes out after the restart
    try:
        def arrived() -> set[str]:
            return {m.group(1).decode() for msg in downstream.messages
                    if (m := re.search(rb"Message-ID: (<[^>]+>)", msg.data))}

        end = time.monotonic() + 30
        while not set(accepted) <= arrived():
            assert time.monotonic() < end, f"lost: {sorted(set(accepted) - arrived())[:5]}"
            await asyncio.sleep(0.05)
        print(f"accepted {len(accepted)}, arrived {len(arrived())}, lost 0")
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 60)
