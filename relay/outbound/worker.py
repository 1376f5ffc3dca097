"""Delivery in a second process ([outbound] delivery_process = true).

The relay's own process keeps the SMTP edge, the queue (the only SQLite writer) and the
scheduler; this child renders each copy (List-Unsubscribe, DKIM) and runs the pooled SMTP
client. On a busy relay each process then has a core of its own: Python runs one thread
at a time, and the edge and the delivery side each took about half of it (bench/README.md).

The seam is the `Deliverer` interface: the scheduler hands `RemoteDeliverer.deliver` a job
and gets one `RcptResult` per recipient back, as from the in-process deliverer. Jobs and
results cross a pipe pair (the child's stdin and stdout) as length-prefixed pickles: both
ends are this program, started by the relay itself, nothing else writes to the pipe.

Failure: if the child dies, every job it held fails with `DeliveryProcessLost`; the
scheduler defers those recipients (451 4.3.0, like any unexpected delivery error) and a new
child is started. A copy the child had already sent may then go out twice: at least once,
never lost, the same as after a crash of a single-process relay. A child that answers no
ping (every 5 s) for 60 s is killed and handled the same way. The child ignores SIGTERM,
SIGINT and SIGHUP (the parent drains it by closing its stdin) and reopens its log file on
SIGUSR1, which the parent forwards. At the end of its stdin (the parent stopped, or died) it
drops the jobs it still holds and exits: no one would record their outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import signal
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from relay import replies
from relay.config import Config
from relay.log import MASTER, SMTP
from relay.outbound import RcptResult
from relay.outbound.classify import from_catalogue
from relay.queue import Job

_LEN = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024   # a job carries its body: max_message_size is far below


class DeliveryProcessLost(RuntimeError):
    """The delivery process ended while it held the job."""


def _frame(obj: object) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    """The next object, or None at a clean end of the stream."""
    try:
        head = await reader.readexactly(_LEN.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    (size,) = _LEN.unpack(head)
    if size > MAX_FRAME:
        raise ValueError(f"delivery process frame of {size} bytes")
    return pickle.loads(await reader.readexactly(size))  # our own child and parent only


PIPE_SIZE = 1024 * 1024   # Linux's default pipe-max-size for an unprivileged process


def _widen_pipes(proc: asyncio.subprocess.Process) -> None:
    """Give both pipes 1 MiB instead of 64 KiB (Linux F_SETPIPE_SZ): a burst of jobs then
    goes into the pipe in one write, instead of the loop registering for writability, and
    unregistering, every 64 KiB (3 % of the relay's main thread at 10 copies a message)."""
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is None:
        return
    for stream in (proc.stdin, proc.stdout):
        transport = getattr(stream, "transport", None) or getattr(stream, "_transport", None)
        pipe = transport.get_extra_info("pipe") if transport is not None else None
        with contextlib.suppress(OSError, ValueError, AttributeError):
            fcntl.fcntl(pipe.fileno(), setsize, PIPE_SIZE)


class _DkimTimes:
    """Stands in for the Metrics object in the child: collects the DKIM signing times,
    which travel back with the results and are observed by the parent's /metrics."""

    def __init__(self) -> None:
        self.dkim_seconds = self
        self.pending: list[float] = []

    def observe(self, value: float) -> None:
        self.pending.append(value)

    def drain(self) -> list[float]:
        out, self.pending = self.pending, []
        return out


class RemoteDeliverer:
    """A `Deliverer` whose work is done by a child process (see the module docstring)."""

    def __init__(self, cfg: Config, *, restart_delay: float = 1.0,
                 on_dkim_seconds: Callable[[float], None] | None = None,
                 ping_every: float = 5.0, hang_timeout: float = 60.0) -> None:
        self.cfg = cfg
        self.restart_delay = restart_delay
        # A child that answers no ping for hang_timeout (stopped, deadlocked, its loop
        # blocked) is killed; its jobs are deferred like a crash's and a new one starts.
        self.ping_every = ping_every
        self.hang_timeout = hang_timeout
        self._last_pong = 0.0
        self._watch: asyncio.Task[None] | None = None
        self.on_dkim_seconds = on_dkim_seconds
        self.pool_open = 0                     # the child's open connections, last reported
        self.started = 0                       # children started so far
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[list[RcptResult]]] = {}
        self._seq = 0
        self._closing = False
        self._alive = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def open_connections(self) -> dict[str, int]:
        return {"smarthost": self.pool_open}

    async def start(self) -> None:
        """Start the child and wait until it has built its deliverer (keys loaded)."""
        await self._spawn()

    async def _spawn(self) -> None:
        env = dict(os.environ)
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay.outbound.worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            limit=2 ** 20)
        assert proc.stdin is not None and proc.stdout is not None
        _widen_pipes(proc)
        proc.stdin.write(_frame(self.cfg))
        await proc.stdin.drain()
        hello = await _read_frame(proc.stdout)
        if hello != ("ready", proc.pid):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise RuntimeError(f"delivery process did not start: {hello!r}")
        self._proc = proc
        self._alive.set()
        self.started += 1
        self._last_pong = time.monotonic()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read(proc))
        if self._watch is not None:
            self._watch.cancel()
        self._watch = loop.create_task(self._watchdog(proc))
        MASTER.info("delivery process started: pid %d", proc.pid)

    async def _watchdog(self, proc: asyncio.subprocess.Process) -> None:
        seq = 0
        while proc.returncode is None and not self._closing:
            await asyncio.sleep(self.ping_every)
            silent = time.monotonic() - self._last_pong
            if silent > self.hang_timeout and proc.returncode is None:
                MASTER.error("delivery process %d has not answered for %.0fs; killing it",
                             proc.pid, silent)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                return
            seq -= 1                     # pings count down, jobs up: never the same number
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.write(_frame(("ping", seq, None)))

    async def _read(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        why = "exited"
        try:
            while (msg := await _read_frame(proc.stdout)) is not None:
                kind, seq, payload, pool_open, dkim = msg
                self.pool_open = pool_open
                self._last_pong = time.monotonic()     # any frame shows the child alive
                if self.on_dkim_seconds is not None:
                    for value in dkim:
                        self.on_dkim_seconds(value)
                fut = self._pending.pop(seq, None)
                if fut is None or fut.done():
                    continue
                if kind == "results":
                    fut.set_result(payload)
                else:
                    fut.set_exception(RuntimeError(f"delivery process: {payload}"))
        except (asyncio.IncompleteReadError, ValueError, pickle.UnpicklingError) as exc:
            why = f"broken pipe protocol ({exc!r})"
        code = await proc.wait()
        lost = list(self._pending.values())
        self._pending.clear()
        for fut in lost:
            if not fut.done():
                fut.set_exception(DeliveryProcessLost(f"delivery process {why}, status {code}"))
        if self._proc is proc:
            self._proc = None
            self.pool_open = 0
            self._alive.clear()
        if self._closing:
            return
        MASTER.error("delivery process %d %s with status %s; %d job(s) deferred; starting a "
                     "new one", proc.pid, why, code, len(lost))
        self._starting = asyncio.get_running_loop().create_task(self._respawn())

    async def _respawn(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.restart_delay)
            try:
                await self._spawn()
                return
            except Exception:  # noqa: BLE001 - keep trying; jobs defer meanwhile
                MASTER.exception("cannot start the delivery process; trying again")

    async def deliver(self, job: Job) -> list[RcptResult]:
        try:
            return await self._deliver(job)
        except DeliveryProcessLost as exc:
            # Deferred like any unexpected delivery error, but the lost child is said once
            # in the log (_read: "N job(s) deferred"), not with a traceback for every job.
            reply = from_catalogue(replies.R451_DELIVERY_ERROR, detail=type(exc).__name__)
            return [RcptResult(r, reply) for r in job.recipients]

    async def _deliver(self, job: Job) -> list[RcptResult]:
        proc = self._proc
        if (proc is None or proc.returncode is not None) and not self._closing:
            # A new child is on its way (restart_delay): wait a little for it rather than
            # defer the job at once.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._alive.wait(), self.restart_delay + 10.0)
            proc = self._proc
        if proc is None or proc.stdin is None or proc.returncode is not None:
            raise DeliveryProcessLost("no delivery process running")
        self._seq += 1
        seq = self._seq
        fut: asyncio.Future[list[RcptResult]] = asyncio.get_running_loop().create_future()
        self._pending[seq] = fut
        try:
            proc.stdin.write(_frame(("deliver", seq, job)))
            await proc.stdin.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(seq, None)
            raise DeliveryProcessLost(f"delivery process pipe: {exc!r}") from None
        return await fut

    def reopen_log(self) -> None:
        """SIGUSR1 (log rotation) reaches the child too."""
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGUSR1)

    async def close(self, timeout: float = 30.0) -> None:
        """No new jobs: the child drops what it still holds (the scheduler has already
        waited for its jobs or given up on them), closes its connections and exits."""
        self._closing = True
        for task in (self._starting, self._watch):
            if task is not None:
                task.cancel()
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(ConnectionError, RuntimeError):
                proc.stdin.close()
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except TimeoutError:
                MASTER.warning("delivery process %d did not exit in %.0fs; killed",
                               proc.pid, timeout)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader


# --- the child ------------------------------------------------------------------------------

async def _child(cfg: Config, out_fd: int) -> None:
    from relay.outbound.build import make_deliverer, make_renderer, make_tokens, make_verp

    loop = asyncio.get_running_loop()
    renderer = make_renderer(cfg, make_tokens(cfg), make_verp(cfg))
    times = _DkimTimes()
    renderer.metrics = times  # type: ignore[assignment]
    deliverer = make_deliverer(cfg, renderer)
    reader = asyncio.StreamReader(limit=2 ** 20, loop=loop)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                 os.fdopen(0, "rb", buffering=0))
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, os.fdopen(out_fd, "wb", buffering=0))
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    pool = getattr(deliverer, "pool", None)

    def send(kind: str, seq: int, payload: object) -> None:
        writer.write(_frame((kind, seq, payload, getattr(pool, "open_now", 0), times.drain())))

    async def one(seq: int, job: Job) -> None:
        try:
            results = await deliverer.deliver(job)
        except Exception as exc:  # noqa: BLE001 - reported to the scheduler, which defers
            SMTP.exception("%s: delivery failed unexpectedly", job.queue_id)
            send("error", seq, f"{type(exc).__name__}: {exc}")
            return
        send("results", seq, results)

    writer.write(_frame(("ready", os.getpid())))
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (msg := await _read_frame(reader)) is not None:
            kind, seq, job = msg
            if kind == "ping":
                send("pong", seq, None)
                continue
            task = loop.create_task(one(seq, job))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # End of input: the relay has stopped (its scheduler has finished every job it sent
        # or given up on it at its deadline) or it has died. No one will record an outcome
        # now, and the queue keeps those recipients leased for the next start: a copy sent
        # from here on would only go out twice (and a stalled next hop would keep an orphan
        # alive for command_timeout). Stop at once.
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        with contextlib.suppress(ConnectionError):   # the relay is gone
            await writer.drain()
    finally:
        await deliverer.close()


def _read_exact(fd: int, size: int) -> bytes:
    """`size` bytes from `fd` (unbuffered: nothing read past the frame), fewer at EOF."""
    data = b""
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            break
        data += chunk
    return data


def main() -> int:
    from relay.log import ReopenableFileHandler, configure_logging

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    # The pipe to the parent gets a private descriptor; fd 1 becomes stderr, so that
    # nothing printed by accident can break the framing.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    head = _read_exact(0, _LEN.size)
    if len(head) != _LEN.size:
        return 2
    cfg = pickle.loads(_read_exact(0, _LEN.unpack(head)[0]))  # from the parent
    handler = configure_logging(cfg.log, cfg.server.hostname)
    if isinstance(handler, ReopenableFileHandler):
        signal.signal(signal.SIGUSR1, lambda *_: handler.reopen())
    started = time.monotonic()
    try:
        asyncio.run(_child(cfg, out_fd))
    except Exception:  # noqa: BLE001 - said in the log; the parent starts a new one
        MASTER.exception("delivery process failed after %.0fs", time.monotonic() - started)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
