"""A bounded pool of outbound SMTP connections to one next hop.

At most `max_connections` are open at once (idle ones count); a connection carries at most
`max_messages` transactions and is closed (QUIT) after `idle_timeout` without use. A
connection that the server closed while it sat idle is noticed at acquire time and dropped;
one that turns out stale at its first command is the caller's to report (see smarthost.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiosmtplib

Connect = Callable[[], Awaitable[aiosmtplib.SMTP]]


@dataclass
class Connection:
    smtp: aiosmtplib.SMTP
    opened_at: float
    transactions: int = 0
    idle_since: float = 0.0
    reused: bool = False
    peer: str = field(default="")


class ConnectionPool:
    def __init__(self, connect: Connect, *, max_connections: int, max_messages: int,
                 idle_timeout: float, clock: Callable[[], float] = time.monotonic):
        self._connect = connect
        self.max_connections = max_connections
        self.max_messages = max_messages
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[Connection] = []
        self._reaper: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self.opened = 0          # connections opened over the pool's life
        self.open_now = 0        # connections open at this moment (in use or idle)

    async def acquire(self) -> Connection:
        """A connection for one transaction; raises what connecting raised."""
        await self._slots.acquire()
        try:
            while self._idle:
                conn = self._idle.pop()
                if conn.smtp.is_connected:
                    conn.reused = True
                    return conn
                self._discard(conn)
            smtp = await self._connect()
        except BaseException:
            self._slots.release()
            raise
        self.opened += 1
        self.open_now += 1
        self._start_reaper()
        return Connection(smtp, self._clock())

    def release(self, conn: Connection, *, reusable: bool, abort: bool = False) -> None:
        """Give a connection back after a transaction (counted here). `abort`: the
        transaction was cut off (cancelled, an unexpected error) in an unknown state, maybe
        in the middle of DATA, where a QUIT is only more message text that no one answers:
        the connection is closed without one."""
        conn.transactions += 1
        if abort:
            self.open_now -= 1
            conn.smtp.close()
        elif reusable and conn.smtp.is_connected and conn.transactions < self.max_messages:
            conn.idle_since = self._clock()
            self._idle.append(conn)
        else:
            self._discard(conn)
        self._slots.release()

    def _discard(self, conn: Connection) -> None:
        self.open_now -= 1
        task = asyncio.get_running_loop().create_task(self._quit(conn.smtp))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @staticmethod
    async def _quit(smtp: aiosmtplib.SMTP) -> None:
        if smtp.is_connected:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(smtp.quit(), 5)
        smtp.close()

    def _start_reaper(self) -> None:
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while self._idle or self.open_now:
            await asyncio.sleep(max(min(self.idle_timeout / 4, 5.0), 0.05))
            now = self._clock()
            keep = []
            for conn in self._idle:
                if now - conn.idle_since >= self.idle_timeout or not conn.smtp.is_connected:
                    self._discard(conn)
                else:
                    keep.append(conn)
            self._idle = keep

    async def close(self) -> None:
        for conn in self._idle:
            self._discard(conn)
        self._idle = []
        if self._reaper is not None:
            self._reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reaper
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
