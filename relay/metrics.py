"""Prometheus metrics (prometheus-client), served at /metrics on the HTTP listener.

One registry per relay (not the library's global one), so several relays in one process
(tests) do not collide. Counters are bumped where things happen; gauges that describe
state (queue size, pool connections, sessions) are read when /metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _StateCollector(Collector):
    """Gauges computed at scrape time from callables."""

    def __init__(self, sessions: Callable[[], int], pool: Callable[[], dict[str, int]],
                 queue: Callable[[], dict[str, int]]):
        self.sessions, self.pool, self.queue = sessions, pool, queue

    def collect(self) -> Iterable[GaugeMetricFamily]:
        g = GaugeMetricFamily("relay_smtp_sessions", "SMTP sessions open now")
        g.add_metric([], self.sessions())
        yield g
        g = GaugeMetricFamily("relay_pool_connections", "Open outbound connections",
                              labels=["destination"])
        for dest, n in self.pool().items():
            g.add_metric([dest], n)
        yield g
        g = GaugeMetricFamily("relay_queue_recipients", "Recipients in the queue by state",
                              labels=["state"])
        counts = self.queue()
        for state in ("queued", "active"):
            g.add_metric([state], counts.get(state, 0))
        yield g


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.accepted = Counter("relay_messages_accepted", "Messages accepted (250 sent)",
                                registry=r)
        self.recipients = Counter("relay_recipients", "Recipient outcomes",
                                  ["outcome", "category"], registry=r)
        self.sessions_total = Counter("relay_smtp_sessions_opened", "SMTP sessions opened",
                                      registry=r)
        self.delivery_latency = Histogram(
            "relay_delivery_latency_seconds", "From accept to delivered",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400),
            registry=r)
        self.dkim_seconds = Histogram(
            "relay_dkim_sign_seconds", "Time to DKIM-sign one message copy",
            buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
            registry=r)
        self.queue_counts: dict[str, int] = {}

    def watch(self, *, sessions: Callable[[], int], pool: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_StateCollector(sessions, pool, lambda: self.queue_counts))

    def outcome(self, outcome: str, category: str = "") -> None:
        self.recipients.labels(outcome=outcome, category=category or outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
