"""The queue database locked, full, over a file-size limit, or read-only: a commit that fails
never gets a 250 (DESIGN.md invariant 1); the client gets `451 4.3.0` and retries; the relay
takes mail again as soon as the condition clears.

How each condition is made, and why so:

- locked: a second SQLite connection holds the write lock (BEGIN EXCLUSIVE) for longer than
  the relay's busy timeout (5 s, relay/queue/sqlite.py, no knob), so the relay's
  BEGIN IMMEDIATE fails with "database is locked". Released, the next message gets 250.
- disk full: the queue lives on a 4 MiB tmpfs (mounted by the test: needs root); a filler
  file takes the rest of the space, and a 1 MiB message cannot grow the WAL (SQLITE_FULL).
  The filler is deleted: the next 1 MiB message gets 250.
- file-size limit: `prlimit` gives the running relay process RLIMIT_FSIZE = 1 MiB (no root
  needed; Python ignores SIGXFSZ, so the write fails with EFBIG), and lifts it again while
  the relay runs: the same message then gets 250.
- corrupt: the queue file is not an SQLite database (a disk fault, a wrong path): the relay
  must refuse to start with one clear line naming the file, not a traceback.
- read-only: Linux refuses to remount a filesystem read-only while a file on it is open for
  writing (EBUSY), and a chmod does not affect an open descriptor (nor root), so the running
  relay's queue cannot become read-only under it. What can happen is a relay (re)started
  on a queue that is read-only, e.g. after a crash left its -wal and -shm files: it must
  refuse to start with one clear line, and start and deliver the queued mail once the
  filesystem is writable again.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from tests.conftest import StartRelay
from tests.reliability.proc import RelayProcess, write_config
from tests.support.downstream import Downstream

LOCK_HOLD = 11.0     # > 2 x the relay's 5 s busy timeout: a commit queued behind another
                     # stuck one still fails while the lock is held


def message(tag: str, size: int = 0) -> bytes:
    body = (b"x" * 76 + b"\r\n") * (size // 78 + 1) if size else b"body\r\n"
    return (f"From: a@example.com\r\nTo: r@example.net\r\nSubject: {tag}\r\n"
            f"Message-ID: <{tag}@example.com>\r\n\r\n").encode() + body


async def send(port: int, tag: str, size: int = 0) -> tuple[int, str, float]:
    """(code, text, monotonic time of the reply) for one message; 0 if cut off."""
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=60) as client:
            _errors, text = await client.sendmail("a@example.com", ["r@example.net"],
                                                 message(tag, size))
            return 250, text, time.monotonic()
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code, exc.message, time.monotonic()
    except (aiosmtplib.SMTPException, OSError) as exc:
        return 0, str(exc), time.monotonic()


def delivered_tags(ds: Downstream) -> list[str]:
    out = []
    for m in ds.messages:
        for line in m.data.split(b"\r\n"):
            if line.startswith(b"Subject: "):
                out.append(line[9:].decode())
    return out


def assert_451(result: tuple[int, str, float], what: str) -> None:
    code, text, _ = result
    assert code == 451 and text.startswith("4.3.0"), (what, code, text)


# --- locked ------------------------------------------------------------------------------

async def test_locked_database_gets_451_then_250_when_released(
        tmp_path: Path, start_relay: StartRelay) -> None:
    async with Downstream() as ds:
        relay: Relay = await start_relay(ds.port)
        port = relay.smtp_addresses[0][1]
        # "in-flight" is being delivered when the lock is taken (the downstream takes 0.5 s
        # over its final dot), so its outcome has to be written while the lock is held.
        ds.script("EOD", "stall:0.5", times=1)
        assert (await send(port, "in-flight"))[0] == 250
        await ds.wait_until(lambda: any(line.startswith(b"DATA") for _, line in ds.commands),
                            what="the delivery of in-flight")

        lock = sqlite3.connect(relay.cfg.queue.path, timeout=10, isolation_level=None)
        try:
            lock.execute("BEGIN EXCLUSIVE")
            locked_at = time.monotonic()
            first = asyncio.create_task(send(port, "locked-1"))
            await asyncio.sleep(2.0)
            second = asyncio.create_task(send(port, "locked-2"))
            await asyncio.sleep(LOCK_HOLD - (time.monotonic() - locked_at))
        finally:
            lock.execute("ROLLBACK")
            released_at = time.monotonic()
            lock.close()
        results = {"locked-1": await first, "locked-2": await second}
        # While the lock was held, nothing got a 250; a reply that came after the release
        # may be a 250 (its commit then really happened).
        for tag, (code, text, at) in results.items():
            if at < released_at:
                assert_451((code, text, at), tag)
            else:
                assert code in (250, 451), (tag, code, text)
        assert_451(results["locked-1"], "locked-1")

        after = await send(port, "after")
        assert after[0] == 250 and after[2] - released_at < 5, after
        expected = {"in-flight", "after"} | {t for t, r in results.items() if r[0] == 250}
        await ds.wait_until(lambda: set(delivered_tags(ds)) >= expected, timeout=15,
                            what=f"delivery of {expected}")
        # Nothing stuck once the lock is gone: in particular in-flight's lease, whose outcome
        # could not be written while the database was locked, is settled (or released).
        end = time.monotonic() + 15
        while (left := await relay.store.list()) and time.monotonic() < end:
            await asyncio.sleep(0.1)
        assert left == [], f"left in the queue after the lock was released: {left}"
        assert await relay.store.counts() == {}
        tags = delivered_tags(ds)
        assert set(tags) == expected
        print(f"\nlocked: replies while locked {[(t, r[0]) for t, r in results.items()]}, "
              f"after release {after[0]}; copies of in-flight delivered: "
              f"{tags.count('in-flight')}")


# --- disk full (tmpfs) ---------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                           str(path)], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); "
                    "test_file_size_limit covers a failing write without root")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(path)], check=True)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with open(filler, "wb", buffering=0) as fh:
        for _ in range(100_000):      # bounded: 6 GB at most, a tmpfs is far smaller
            try:
                fh.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                break
        with contextlib.suppress(OSError):
            os.fsync(fh.fileno())
    return filler


async def test_disk_full_gets_451_then_250_when_space_returns(
        tmp_path: Path, start_relay: StartRelay) -> None:
    with tmpfs(tmp_path / "qfs", "4m") as qfs:
        async with Downstream() as ds:
            relay = await start_relay(ds.port, queue={"path": str(qfs / "relay.db"),
                                                      "retry": ["200ms"], "lifetime": "1h"})
            port = relay.smtp_addresses[0][1]
            assert (await send(port, "before"))[0] == 250
            filler = await asyncio.to_thread(fill, qfs)
            full = await send(port, "full", 1024 * 1024)
            assert_451(full, "disk full")
            again = await send(port, "full-again", 1024 * 1024)
            assert_451(again, "disk still full")
            filler.unlink()
            after = await send(port, "after", 1024 * 1024)
            assert after[0] == 250, after
            await ds.wait_until(lambda: set(delivered_tags(ds)) >= {"before", "after"},
                                timeout=15, what="delivery")
            await asyncio.sleep(0.5)
            assert sorted(delivered_tags(ds)) == ["after", "before"]
            await relay.stop(deadline=2.0)
        check = sqlite3.connect(qfs / "relay.db")
        try:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        finally:
            check.close()
        print(f"\ndisk full: replies {full[0]} {full[1]!r}, {again[0]}; after space returned "
              f"{after[0]}")


# --- a file-size limit (RLIMIT_FSIZE), lifted from outside ---------------------------------

async def test_file_size_limit_gets_451_then_250_when_lifted(tmp_path: Path) -> None:
    limit = 1024 * 1024
    async with Downstream() as ds:
        cfg, port = write_config(tmp_path, ds.port)
        relay = RelayProcess(cfg)
        try:
            await asyncio.to_thread(relay.wait_started, port)
            assert (await send(port, "before"))[0] == 250
            # From now on no file of the relay may grow past 1 MiB (EFBIG; Python ignores
            # SIGXFSZ). Lowering a soft limit of another process of ours needs no privilege.
            resource.prlimit(relay.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
            big = await send(port, "too-big-for-the-limit", 2 * limit)
            assert_451(big, "file size limit")
            resource.prlimit(relay.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            after = await send(port, "after", 2 * limit)
            assert after[0] == 250, after
            await ds.wait_until(lambda: set(delivered_tags(ds)) >= {"before", "after"},
                                timeout=15, what="delivery")
            await asyncio.sleep(0.5)
            assert sorted(delivered_tags(ds)) == ["after", "before"]
            assert relay.proc.poll() is None
        finally:
            await asyncio.to_thread(relay.stop)
        assert relay.proc.returncode == 0, relay.output()[-2000:]
        check = sqlite3.connect(tmp_path / "var" / "relay.db")
        try:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert check.execute("SELECT COUNT(*) FROM messages").fetchone() == (0,)
        finally:
            check.close()
        print(f"\nfile size limit: reply {big[0]} {big[1]!r}; after prlimit lifted it "
              f"{after[0]}")


# --- read-only at start ----------------------------------------------------------------------

async def test_read_only_queue_refuses_to_start_cleanly_then_resumes(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "qfs", "8m") as qfs:
        async with Downstream() as ds:
            ds.script("RCPT", "451 4.3.0 not yet", times=1)
            cfg, port = write_config(tmp_path, ds.port, queue=str(qfs / "relay.db"))
            cfg.write_text(cfg.read_text().replace('retry = ["1s"]', 'retry = ["3s"]'))
            first = RelayProcess(cfg)
            try:
                await asyncio.to_thread(first.wait_started, port)
                assert (await send(port, "queued"))[0] == 250
                await ds.wait_until(lambda: any(b"RCPT" in c for _, c in ds.commands),
                                    what="the first attempt")
                await asyncio.sleep(0.2)
            finally:
                first.kill()            # a crash: -wal and -shm stay behind
            assert ds.messages == []
            await asyncio.to_thread(remount, qfs, "ro")
            try:
                refused = RelayProcess(cfg)
                try:
                    rc = await asyncio.to_thread(refused.proc.wait, 20)
                finally:
                    refused.kill()
                out = refused.out.read_text("utf-8", "replace")
            finally:
                await asyncio.to_thread(remount, qfs, "rw")
            assert rc != 0
            assert "Traceback" not in out, out
            assert "relay: fatal:" in out and "relay.db" in out, out
            assert len(out.strip().splitlines()) <= 3, out

            with contextlib.ExitStack() as stack:
                again = RelayProcess(cfg)
                stack.callback(again.stop)
                await asyncio.to_thread(again.wait_started, port)
                await ds.wait_messages(1, timeout=15)
            assert delivered_tags(ds) == ["queued"]
        print(f"\nread-only queue: relay exit {rc}: {out.strip()!r}; after remount rw the "
              "queued message was delivered")


# --- corrupt at start --------------------------------------------------------------------------

async def test_corrupt_queue_refuses_to_start_cleanly(tmp_path: Path) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "relay.db").write_bytes(b"this is not an SQLite database\n" * 256)
    cfg, _port = write_config(tmp_path, 9)
    relay = RelayProcess(cfg)
    try:
        rc = await asyncio.to_thread(relay.proc.wait, 20)
    finally:
        relay.kill()
    out = relay.out.read_text("utf-8", "replace")
    print(f"\ncorrupt queue: relay exit {rc}: {out.strip()[-300:]!r}")
    assert rc != 0
    assert "Traceback" not in out, out
    assert "relay: fatal:" in out and "relay.db" in out, out
    assert len(out.strip().splitlines()) <= 3, out
