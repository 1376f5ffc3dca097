"""Wiring: every component is built and connected here, in one place (STYLE rule 12).

`Relay` is the running relay: tests start it on port 0 in their own event loop; `serve()`
runs it until SIGTERM/SIGINT and then shuts down in order (STYLE rule 6): stop listening,
421 to new commands, let transactions in flight finish, stop delivery, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Self

from relay.config import Config, ConfigError, default_config_path, load_config
from relay.events import EventKind, record
from relay.log import MASTER, ReopenableFileHandler, configure_logging
from relay.metrics import Metrics
from relay.outbound import Deliverer
from relay.outbound.build import make_deliverer, make_renderer, make_tokens, make_verp
from relay.outbound.classify import Rules
from relay.outbound.worker import RemoteDeliverer
from relay.policy.unsubscribe import TokenData
from relay.queue import QueueStore
from relay.queue.pacing import Pacer
from relay.queue.scheduler import Scheduler
from relay.queue.sqlite import SQLiteQueueStore
from relay.server import Edge
from relay.suppression import SuppressionStore
from relay.suppression.ingest import Ingestor
from relay.suppression.store import SQLiteSuppressionStore
from relay.web import HttpListener, make_app
from relay.webhook import WebhookSender, webhook_endpoints


class QueueLockedError(RuntimeError):
    """Another relay process holds the queue's lock."""


class Relay:
    def __init__(self, cfg: Config, *, store: QueueStore | None = None,
                 deliverer: Deliverer | None = None,
                 suppressions: SuppressionStore | None = None,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.cfg = cfg
        self.store: QueueStore = store or SQLiteQueueStore(
            cfg.queue.path, group_commit_window=cfg.queue.group_commit_window)
        self.suppressions: SuppressionStore = suppressions or SQLiteSuppressionStore(
            cfg.suppression.path)
        self.tokens = make_tokens(cfg)
        self.verp = make_verp(cfg)
        self.renderer = make_renderer(cfg, self.tokens, self.verp)
        if deliverer is None and cfg.outbound.delivery_process:
            deliverer = RemoteDeliverer(cfg)
        self.deliverer: Deliverer = deliverer or make_deliverer(
            cfg, self.renderer, clock=clock, rng=rng)
        # Direct delivery paces by destination itself (MX hosts, throttling): its pacer.
        pacer = getattr(self.deliverer, "pacer", None)
        self.scheduler = Scheduler(
            self.store, self.deliverer, retry=cfg.queue.retry, lifetime=cfg.queue.lifetime,
            concurrency=cfg.outbound.max_connections * (
                8 if isinstance(self.deliverer, RemoteDeliverer) else 2),
            clock=clock, rng=rng,
            pacer=pacer if isinstance(pacer, Pacer) else Pacer(cfg.outbound.destination_for),
            hostname=cfg.server.hostname,
            suppressions=self.suppressions, rules=Rules.load(cfg.bounces.rules),
            soft_limit=cfg.bounces.soft_limit, soft_days=cfg.bounces.soft_days)
        ingestor = None
        if cfg.bounces.domain is not None:
            ingestor = Ingestor(queue=self.store, suppressions=self.suppressions, verp=self.verp,
                                hostname=cfg.server.hostname, report_dir=cfg.bounces.report_dir,
                                nameservers=list(cfg.dns.nameservers) or None)
        self.edge = Edge(cfg, self.store, self.scheduler.wake, suppressions=self.suppressions,
                         tokens=self.tokens, signer=self.renderer.signer, ingestor=ingestor)
        self.webhooks = WebhookSender(self.store, webhook_endpoints(cfg))
        self.metrics = Metrics()
        self.metrics.watch(sessions=lambda: len(self.edge.sessions), pool=self._pool_gauge)
        self.scheduler.metrics = self.edge.metrics = self.renderer.metrics = self.metrics
        if isinstance(self.deliverer, RemoteDeliverer):
            self.deliverer.on_dkim_seconds = self.metrics.dkim_seconds.observe
        self.http: HttpListener | None = None
        if cfg.http.listen is not None:
            app = make_app(tokens=self.tokens, store=self.suppressions,
                           max_body=cfg.http.max_body, metrics=self.metrics,
                           on_unsubscribe=self._unsubscribed)
            self.http = HttpListener(app, *cfg.http.listen)
        self._gauges: asyncio.Task[None] | None = None
        self._lock_fd: int | None = None
        self._background: set[asyncio.Task[int]] = set()
        self.smtp_addresses: list[tuple[str, int]] = []
        self.http_address: tuple[str, int] | None = None
        self.running = False

    def _lock(self) -> None:
        """One relay process per queue: a second one would deliver every message twice."""
        path = Path(f"{self.cfg.queue.path}.lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QueueLockedError(
                f"another relay process is using the queue {self.cfg.queue.path} "
                f"(lock {path} is held)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)   # releases the flock
            self._lock_fd = None

    async def start(self) -> None:
        if isinstance(self.store, SQLiteQueueStore):
            self._lock()
        await self.store.open()
        self.running = True
        recovered = await self.store.recover()
        if recovered:
            MASTER.info("queue: %d recipient(s) of interrupted deliveries returned to the queue",
                        recovered)
        if isinstance(self.deliverer, RemoteDeliverer):
            await self.deliverer.start()
        self.scheduler.start()
        self._gauges = asyncio.get_running_loop().create_task(self._refresh_gauges())
        self.webhooks.start()
        self.smtp_addresses = await self.edge.start()
        if self.http is not None:
            self.http_address = await self.http.start()
            MASTER.info("HTTP listening on %s:%d", *self.http_address)
        for host, port in self.smtp_addresses:
            MASTER.info("daemon started: SMTP listening on %s:%d", host, port)

    async def stop(self, deadline: float = 30.0) -> None:
        if not self.running:
            return
        self.running = False
        await self.edge.stop(deadline)
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
        if self.http is not None:
            await self.http.stop()
        await self.scheduler.stop(deadline)
        await self.webhooks.stop(min(deadline, 5.0))
        await self.deliverer.close()
        await self.store.close()
        self.suppressions.close()
        self._unlock()
        MASTER.info("daemon stopped")

    def _pool_gauge(self) -> dict[str, int]:
        per_destination = getattr(self.deliverer, "open_connections", None)
        if per_destination is not None:
            return per_destination()
        return {"smarthost": getattr(getattr(self.deliverer, "pool", None), "open_now", 0)}

    def _unsubscribed(self, data: TokenData) -> None:
        """A one-click unsubscribe is an event too (stats, webhooks)."""
        task = asyncio.get_running_loop().create_task(record(
            self.store, EventKind.UNSUBSCRIBE, data.recipient, queue_id=data.queue_id,
            category="unsubscribe", reply="one-click"))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_gauges(self, every: float = 5.0) -> None:
        """Queue size by state for /metrics, read off the store now and then."""
        while True:
            with contextlib.suppress(Exception):
                self.metrics.queue_counts = await self.store.counts()
            await asyncio.sleep(every)

    def reload(self, cfg: Config) -> None:
        """Apply a new configuration: new SMTP sessions get the new policy at once.

        Listeners, the queue and the outbound pool are kept; changes to them need a restart
        and are logged as such."""
        for section in ("queue", "outbound"):
            if getattr(cfg, section) != getattr(self.cfg, section):
                MASTER.warning("reload: changes to [%s] take effect after a restart", section)
        old = self.cfg.server
        if (cfg.server.listen, cfg.server.listen_tls, cfg.server.tls_cert, cfg.server.tls_key) \
                != (old.listen, old.listen_tls, old.tls_cert, old.tls_key):
            MASTER.warning("reload: changes to listeners or TLS files take effect after a restart")
        self.edge.reload(cfg)
        self.cfg = cfg
        MASTER.info("reload: configuration reloaded from %s", cfg.path)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(deadline=5.0)


async def serve(cfg: Config, *, stop: asyncio.Event | None = None) -> None:
    """Run until `stop` is set (SIGTERM/SIGINT set it), then drain and exit."""
    handler = configure_logging(cfg.log, cfg.server.hostname)
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    relay = Relay(cfg)
    with contextlib.suppress(NotImplementedError):
        if isinstance(handler, ReopenableFileHandler):
            def reopen() -> None:
                handler.reopen()
                if isinstance(relay.deliverer, RemoteDeliverer):
                    relay.deliverer.reopen_log()

            loop.add_signal_handler(signal.SIGUSR1, reopen)

    def reload() -> None:
        # SIGHUP: reload atomically; a bad file keeps the old policy and says why.
        try:
            new = load_config(cfg.path or default_config_path())
        except ConfigError as exc:
            for problem in exc.problems:
                MASTER.error("reload: %s", problem)
            MASTER.error("reload: configuration has errors; keeping the running one")
            return
        relay.reload(new)

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGHUP, reload)
    await relay.start()
    try:
        await stop.wait()
        MASTER.info("shutdown requested: draining")
    finally:
        await relay.stop()
        logging.getLogger("relay").handlers[0].flush()
