"""Wiring: every component is built and connected here, in one place (STYLE rule 12).

`Relay` is the running relay: tests start it on port 0 in their own event loop; `serve()`
runs it until SIGTERM/SIGINT and then shuts down in order (STYLE rule 6): stop listening,
421 to new commands, let transactions in flight finish, stop delivery, close the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from typing import Self

from relay.config import Config, ConfigError, default_config_path, load_config
from relay.log import MASTER, ReopenableFileHandler, configure_logging
from relay.outbound import Deliverer
from relay.outbound.smarthost import SmarthostDeliverer
from relay.queue import QueueStore
from relay.queue.pacing import Pacer
from relay.queue.scheduler import Scheduler
from relay.queue.sqlite import SQLiteQueueStore
from relay.server import Edge


class Relay:
    def __init__(self, cfg: Config, *, store: QueueStore | None = None,
                 deliverer: Deliverer | None = None, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None):
        self.cfg = cfg
        self.store: QueueStore = store or SQLiteQueueStore(cfg.queue.path)
        self.deliverer: Deliverer = deliverer or SmarthostDeliverer(cfg.outbound,
                                                                    cfg.server.hostname)
        self.scheduler = Scheduler(
            self.store, self.deliverer, retry=cfg.queue.retry, lifetime=cfg.queue.lifetime,
            concurrency=cfg.outbound.max_connections * 2, clock=clock, rng=rng,
            pacer=Pacer(cfg.outbound.destination_for), hostname=cfg.server.hostname)
        self.edge = Edge(cfg, self.store, self.scheduler.wake)
        self.smtp_addresses: list[tuple[str, int]] = []
        self.running = False

    async def start(self) -> None:
        await self.store.open()
        self.running = True
        recovered = await self.store.recover()
        if recovered:
            MASTER.info("queue: %d recipient(s) of interrupted deliveries returned to the queue",
                        recovered)
        self.scheduler.start()
        self.smtp_addresses = await self.edge.start()
        for host, port in self.smtp_addresses:
            MASTER.info("daemon started: SMTP listening on %s:%d", host, port)

    async def stop(self, deadline: float = 30.0) -> None:
        if not self.running:
            return
        self.running = False
        await self.edge.stop(deadline)
        await self.scheduler.stop(deadline)
        await self.deliverer.close()
        await self.store.close()
        MASTER.info("daemon stopped")

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
        if isinstance(handler, ReopenableFileHandler):
            loop.add_signal_handler(signal.SIGUSR1, handler.reopen)
    relay = Relay(cfg)

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
