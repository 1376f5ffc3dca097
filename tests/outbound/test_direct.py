"""Direct delivery to MX hosts (mode = "mx"): routing, per-destination pools, pacing,
throttling, the circuit breaker, TLS policy and MTA-STS.

Real servers only: a DNS server on 127.0.0.1 (LoopbackDNS) and scripted SMTP servers, each
on its own loopback address (127.0.0.2, 127.0.0.3, ...) and all on one port number, which
the relay is told with [outbound].mx_port (port 25 needs root).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay.app import Relay
from relay.config import DestinationConfig, parse_config
from relay.outbound import RcptResult
from relay.outbound.direct import DirectDeliverer
from relay.outbound.mtasts import MtaSts
from relay.outbound.mx import MxResolver, make_async_resolver
from relay.outbound.render import Renderer
from relay.outbound.verp import Verp
from relay.queue import Job, Recipient
from relay.queue.pacing import Pacer, describe_states, state_path
from relay.suppression import GLOBAL
from tests.conftest import relay_config, wait_events, wait_for
from tests.support.dns import LoopbackDNS, Records
from tests.support.downstream import Downstream, _ScriptedSMTP, self_signed_contexts

MESSAGE = b"From: a@example.com\r\nSubject: direct\r\n\r\nhello\r\n"
POLICY = "version: STSv1\nmode: {mode}\nmx: {mx}\nmax_age: 86400\n"
ROOT = Path(__file__).resolve().parents[2]


# --- scripted MX hosts on 127.0.0.x, one port -------------------------------------------

class Gauge:
    """Connections open at once across several sinks, and the most ever."""

    def __init__(self) -> None:
        self.now = 0
        self.max = 0


class Sink(Downstream):
    """A Downstream on a chosen port of its own loopback address."""

    def __init__(self, host: str, port: int, gauge: Gauge | None = None, **kw: Any):
        super().__init__(host=host, **kw)
        self.wanted_port = port
        self.gauge = gauge

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ScriptedSMTP(self, loop), self.host, self.wanted_port,
            ssl=self.tls_context)
        self.port = self._server.sockets[0].getsockname()[1]

    def register(self, proto: _ScriptedSMTP) -> int:
        if self.gauge is not None:
            self.gauge.now += 1
            self.gauge.max = max(self.gauge.max, self.gauge.now)
        return super().register(proto)

    def unregister(self, proto: _ScriptedSMTP) -> None:
        if self.gauge is not None and proto.connection_id in self._live:
            self.gauge.now -= 1
        super().unregister(proto)


@contextlib.asynccontextmanager
async def sinks(*specs: str | tuple[str, dict[str, Any]],
                gauge: Gauge | None = None) -> AsyncIterator[tuple[int, list[Sink]]]:
    """Start a sink on each address, all on one free port; yields (port, sinks)."""
    hosts = [(s, {}) if isinstance(s, str) else s for s in specs]
    for _ in range(20):
        started: list[Sink] = []
        port = 0
        try:
            for host, kw in hosts:
                sink = Sink(host, port, gauge, **kw)
                await sink.start()
                started.append(sink)
                port = sink.port
        except OSError:   # that port is taken on one of the addresses: another one
            for sink in started:
                await sink.stop()
            continue
        if not started:   # no sink at all: a port nothing listens on, for refusals
            probe = Sink("127.0.0.2", 0)
            await probe.start()
            port = probe.port
            await probe.stop()
        try:
            yield port, started
        finally:
            for sink in started:
                await sink.stop()
        return
    raise OSError("no common free port on the loopback addresses")


def mx(domain: str, *hosts: tuple[int, str, str]) -> Records:
    """MX records of `domain` and the A records of its hosts: (preference, name, address)."""
    records: Records = {(f"{domain}.", "MX"): [(p, f"{n}.") for p, n, _ in hosts]}
    for _, name, address in hosts:
        records[(f"{name}.", "A")] = [address]
    return records


def deliverer(dns: LoopbackDNS, port: int, outbound: dict[str, Any] | None = None,
              **kw: Any) -> DirectDeliverer:
    cfg = parse_config({"outbound": {"mode": "mx", "mx_port": port, "connect_timeout": "2s",
                                     "command_timeout": "5s", **(outbound or {})}}).outbound
    rng = kw.pop("rng", None)
    resolver = MxResolver(make_async_resolver([("127.0.0.1", dns.port)], lifetime=2.0),
                          rng=rng)
    return DirectDeliverer(cfg, "relay.test", resolver=resolver, **kw)


def job(*rcpts: str, queue_id: str = "Q1", sender: str = "a@example.com") -> Job:
    return Job(queue_id, sender, MESSAGE, time.time(), False, False,
               [Recipient(i, r) for i, r in enumerate(rcpts, start=1)])


def codes(results: list[RcptResult]) -> list[str]:
    return [f"{r.reply.code} {r.reply.enhanced}" for r in results]


def nameservers(dns: LoopbackDNS) -> dict[str, Any]:
    return {"nameservers": [f"127.0.0.1:{dns.port}"]}


async def send(relay: Relay, rcpts: list[str], count: int = 1) -> None:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as client:
        for _ in range(count):
            await client.sendmail("a@example.com", rcpts, MESSAGE)


def ca_file(tmp_path: Path, client_ctx: ssl.SSLContext) -> str:
    der = client_ctx.get_ca_certs(binary_form=True)[0]
    path = tmp_path / "ca.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return str(path)


# --- routing ------------------------------------------------------------------------------

async def test_first_host_refusing_connections_hands_over_to_the_next() -> None:
    async with sinks("127.0.0.3") as (port, [second]):
        records = mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"),
                     (20, "mx2.pref.test", "127.0.0.3"))
        async with LoopbackDNS(records) as dns:
            d = deliverer(dns, port)
            try:
                [res] = await d.deliver(job("r@pref.test"))
            finally:
                await d.close()
    assert res.reply.code == 250
    assert res.relay == f"mx2.pref.test[127.0.0.3]:{port}"
    assert [m.rcpt_tos for m in second.messages] == [["r@pref.test"]]


@pytest.mark.parametrize("greeting", ["421 4.3.2 Service not available",
                                      "450 4.7.1 Come back later",
                                      "554 5.3.2 No SMTP service here"])
async def test_a_refusing_greeting_hands_over_to_the_next_host(greeting: str) -> None:
    async with sinks("127.0.0.2", "127.0.0.3") as (port, [first, second]):
        first.script("CONNECT", greeting, times=None)
        records = mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"),
                     (20, "mx2.pref.test", "127.0.0.3"))
        async with LoopbackDNS(records) as dns:
            d = deliverer(dns, port)
            try:
                [res] = await d.deliver(job("r@pref.test"))
            finally:
                await d.close()
        assert res.reply.code == 250 and first.messages == []
        assert first.connections_opened == 1 and len(second.messages) == 1


async def test_when_no_host_answers_the_recipients_are_deferred() -> None:
    async with sinks() as (port, _):
        records = mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"),
                     (20, "mx2.pref.test", "127.0.0.3"))
        async with LoopbackDNS(records) as dns:
            d = deliverer(dns, port)
            try:
                results = await d.deliver(job("r1@pref.test", "r2@pref.test"))
            finally:
                await d.close()
    assert codes(results) == ["451 4.4.1", "451 4.4.1"]
    assert results[0].relay == f"mx2.pref.test[127.0.0.3]:{port}"   # the last one tried


async def test_equal_preferences_share_the_load_as_the_seed_says() -> None:
    async def run(dns: LoopbackDNS, port: int, sinks_: list[Sink]) -> list[str]:
        d = deliverer(dns, port, {"max_messages_per_connection": 1}, rng=random.Random(7))
        before = [len(s.messages) for s in sinks_]
        order = []
        try:
            for i in range(12):
                await d.deliver(job(f"r{i}@equal.test"))
                got = [len(s.messages) for s in sinks_]
                order.append(next(s.host for s, b, g in zip(sinks_, before, got, strict=True)
                                  if g > b))
                before = got
        finally:
            await d.close()
        return order

    async with sinks("127.0.0.2", "127.0.0.3") as (port, both):
        records = mx("equal.test", (10, "a.equal.test", "127.0.0.2"),
                     (10, "b.equal.test", "127.0.0.3"))
        async with LoopbackDNS(records) as dns:
            first = await run(dns, port, both)
            again = await run(dns, port, both)
    assert set(first) == {"127.0.0.2", "127.0.0.3"}
    assert again == first


async def test_a_domain_without_mx_gets_mail_at_its_own_address() -> None:
    async with sinks("127.0.0.4") as (port, [sink]), \
            LoopbackDNS({("nomx.test.", "A"): ["127.0.0.4"]}) as dns:
        d = deliverer(dns, port)
        try:
            [res] = await d.deliver(job("r@nomx.test"))
        finally:
            await d.close()
    assert res.reply.code == 250 and res.relay == f"nomx.test[127.0.0.4]:{port}"
    assert len(sink.messages) == 1


async def test_null_mx_bounces_5_1_10_and_suppresses(start_relay) -> None:
    records: Records = {("nullmx.test.", "MX"): [(0, ".")]}
    async with sinks() as (port, _), LoopbackDNS(records) as dns:
        relay = await start_relay(port, dns=nameservers(dns),
                                  outbound={"mode": "mx", "mx_port": port})
        await send(relay, ["someone@nullmx.test"])
        await wait_for(lambda: relay.suppressions.check("someone@nullmx.test", (GLOBAL,))
                       is not None, what="suppression")
        events = await relay.store.events()
        [bounce] = [e for e in events if e[1] == "someone@nullmx.test"]
        assert bounce[2] == "bounced" and "5.1.10" in bounce[3]


# --- destinations: pools, groups, transactions ---------------------------------------

GROUP = mx("a.test", (10, "mx.a.google.test", "127.0.0.2")) | mx(
    "b.test", (10, "mx.b.google.test", "127.0.0.3"))


async def test_a_provider_group_shares_one_pool_and_its_connection_cap() -> None:
    gauge = Gauge()
    async with sinks("127.0.0.2", "127.0.0.3", gauge=gauge) as (port, [a, b]):
        for sink in (a, b):
            sink.script("EOD", "stall:0.05", times=None)   # keep connections busy
        async with LoopbackDNS(GROUP) as dns:
            d = deliverer(dns, port, {"destination": {"google": {
                "mx_suffixes": ["google.test"], "max_connections": 2}}})
            try:
                jobs = [job(f"r{i}@{'ab'[i % 2]}.test", queue_id=f"Q{i}") for i in range(12)]
                results = await asyncio.gather(*(d.deliver(j) for j in jobs))
            finally:
                await d.close()
    assert all(r.reply.code == 250 for rs in results for r in rs)
    assert list(d.pools) == ["google"]
    assert len(a.messages) + len(b.messages) == 12
    assert gauge.max == 2   # reached, never passed
    # Without the group, each domain has its own destination (its MX host set).
    assert d.pacer.destination_for("a.test").name == "google"


async def test_recipients_of_one_domain_share_transactions_of_max_recipients() -> None:
    async with sinks("127.0.0.2") as (port, [sink]), \
            LoopbackDNS(mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"))) as dns:
        d = deliverer(dns, port, {"max_recipients": 2})
        try:
            results = await d.deliver(job(*(f"r{i}@pref.test" for i in range(5)),
                                          "x@other.test"))
        finally:
            await d.close()
    assert [len(m.rcpt_tos) for m in sink.messages] == [2, 2, 1]
    assert codes(results)[:5] == ["250 2.0.0"] * 5
    assert results[5].reply.enhanced == "5.1.2"   # other.test does not exist


async def test_a_copy_per_recipient_when_the_renderer_says_so() -> None:
    renderer = Renderer(verp=Verp(b"0123456789abcdef", domain="bounces.test"))
    async with sinks("127.0.0.2") as (port, [sink]), \
            LoopbackDNS(mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"))) as dns:
        d = deliverer(dns, port, renderer=renderer)
        try:
            results = await d.deliver(job("r1@pref.test", "r2@pref.test"))
        finally:
            await d.close()
    assert codes(results) == ["250 2.0.0"] * 2
    assert [m.rcpt_tos for m in sink.messages] == [["r1@pref.test"], ["r2@pref.test"]]
    senders = [m.mail_from for m in sink.messages]
    assert all(s.endswith("@bounces.test") for s in senders) and senders[0] != senders[1]
    assert sink.connections_opened == 1   # one connection, two transactions


async def test_a_pooled_connection_is_not_reused_below_another_domains_tls_policy() -> None:
    """In a provider group, a connection opened for a domain without a policy (here in
    plaintext) must not carry mail for a domain whose MTA-STS policy demands verified TLS."""
    server_ctx, client_ctx = self_signed_contexts("mx.b.google.test")
    records = GROUP | {("_mta-sts.b.test.", "TXT"): ["v=STSv1; id=1;"]}

    async def fetch(domain: str) -> str:
        return POLICY.format(mode="enforce", mx="*.b.google.test")

    async with sinks("127.0.0.2", ("127.0.0.3", {"starttls_context": server_ctx})) as (
            port, [a, b]), LoopbackDNS(records) as dns:
        resolver = MxResolver(make_async_resolver([("127.0.0.1", dns.port)]))
        cfg = parse_config({"outbound": {"mode": "mx", "mx_port": port, "mta_sts": True,
                                         "destination": {"google": {
                                             "mx_suffixes": ["google.test"]}}}}).outbound
        d = DirectDeliverer(cfg, "relay.test", resolver=resolver,
                            mta_sts=MtaSts(resolver, fetch=fetch), verify_context=client_ctx)
        try:
            assert codes(await d.deliver(job("r@a.test"))) == ["250 2.0.0"]
            assert d.pools["google"].open_now == 1      # idle, in plaintext, to a's host
            [res] = await d.deliver(job("r@b.test"))
        finally:
            await d.close()
    assert res.reply.code == 250 and res.tls
    assert [m.rcpt_tos for m in a.messages] == [["r@a.test"]]
    assert [(m.rcpt_tos, m.tls) for m in b.messages] == [(["r@b.test"], True)]


async def test_source_address_and_ehlo_name_per_destination() -> None:
    async with sinks("127.0.0.2") as (port, [sink]), \
            LoopbackDNS(mx("pref.test", (10, "mx1.pref.test", "127.0.0.2"))) as dns:
        d = deliverer(dns, port, {"destination": {"pref.test": {
            "source_address": "127.0.0.9", "helo_name": "out9.relay.test"}}})
        try:
            await d.deliver(job("r@pref.test"))
        finally:
            await d.close()
    [msg] = sink.messages
    assert msg.peer[0] == "127.0.0.9"
    assert any(line.startswith(b"EHLO out9.relay.test") for _, line in sink.commands)


async def test_rate_of_a_group_is_measured_at_the_sink(start_relay) -> None:
    async with sinks("127.0.0.2", "127.0.0.3") as (port, [a, b]), LoopbackDNS(GROUP) as dns:
        relay = await start_relay(port, dns=nameservers(dns), outbound={
            "mode": "mx", "mx_port": port, "destination": {"google": {
                "mx_suffixes": ["google.test"], "rate": "10/s", "max_connections": 2}}})
        arrivals: list[float] = []

        def count() -> bool:
            while len(arrivals) < len(a.messages) + len(b.messages):
                arrivals.append(time.monotonic())
            return len(arrivals) >= 16

        host, smtp_port = relay.smtp_addresses[0]
        async with aiosmtplib.SMTP(hostname=host, port=smtp_port) as client:
            for i in range(16):
                await client.sendmail("a@example.com", [f"r{i}@{'ab'[i % 2]}.test"], MESSAGE)
        await wait_for(count, timeout=15, what="16 deliveries")
    # 16 at 10/s across both domains of the group: 1.5 s from the first to the last start
    # (unpaced, they take a few ms); arrivals jitter, so the bounds leave some room.
    assert arrivals[-1] - arrivals[0] >= 1.0
    for i in range(len(arrivals) - 12):
        assert arrivals[i + 12] - arrivals[i] >= 0.8   # 1.2 s at the rate
    # One pool: a connection opened for one domain of the group carries the other's mail.
    assert {r.rpartition("@")[2] for m in a.messages + b.messages for r in m.rcpt_tos} == {
        "a.test", "b.test"}


# --- throttling and the circuit breaker -----------------------------------------------------

class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_throttling_halves_rate_and_connections_then_recovers_step_by_step(
        tmp_path: Path) -> None:
    dest = DestinationConfig("google", rate=(20.0, 1.0), max_connections=4)
    state = tmp_path / "relay.db.destinations.json"
    pacer = Pacer(lambda d: dest, cooldown=60.0, state_file=state)
    lane = pacer.lane(dest)
    assert pacer.throttle(dest, 1000.0, "421 4.7.0 Try again later")
    assert (lane.rate(), lane.slots.limit) == ((10.0, 1.0), 2)
    assert not pacer.throttle(dest, 1001.0, "421 4.7.0 Try again later")   # same burst
    assert pacer.throttle(dest, 1010.0, "421 4.7.0 Try again later")
    assert (lane.rate(), lane.slots.limit) == ((5.0, 1.0), 1)
    [line] = describe_states(state, now=1011.0)
    assert line == ("google: throttled, rate 5/s, 1 of 4 connections, 1/4 of normal "
                    "(421 4.7.0 Try again later)")
    one = Job("Q", "", b"", 0.0, False, False, [Recipient(1, "r@gmail.com")])
    pacer.plan(one, 1069.0)
    assert lane.level == 2                      # a cool-down after the last signal ...
    pacer.plan(one, 1070.0)
    assert (lane.rate(), lane.slots.limit) == ((10.0, 1.0), 2)     # ... one step up
    assert describe_states(state, now=1070.0)[0].startswith("google: throttled, rate 10/s")
    pacer.plan(one, 1130.0)
    assert (lane.rate(), lane.slots.limit) == ((20.0, 1.0), 4)     # and the next
    assert describe_states(state, now=1130.0) == []


def test_an_unrated_destination_is_throttled_from_its_observed_rate() -> None:
    dest = DestinationConfig("mx.example.test", max_connections=10)
    pacer = Pacer(lambda d: dest, cooldown=60.0)
    for i in range(40):   # 4/s over the last 10 s
        pacer.plan(Job(f"Q{i}", "", b"", 0.0, False, False, [Recipient(i, "r@x.test")]),
                   1000.0 + i / 4)
    lane = pacer.lane(dest)
    assert lane.rate() is None
    pacer.throttle(dest, 1010.0, "451 4.7.1 slow down")
    assert lane.rate() == (20.0, 10.0)          # 2/s: half the 4/s it was sending
    assert lane.slots.limit == 5
    pacer.plan(Job("Q", "", b"", 0.0, False, False, [Recipient(1, "r@x.test")]), 1070.0)
    assert lane.rate() is None and lane.slots.limit == 10   # recovered: unlimited again


async def test_scripted_421_throttles_the_destination_and_it_recovers(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    shift = [0.0]   # the relay's clock runs ahead by this much: a cool-down without waiting
    async with sinks("127.0.0.2") as (port, [sink]), \
            LoopbackDNS(mx("t.test", (10, "mx.t.test", "127.0.0.2"))) as dns:
        sink.script("MAIL", "421 4.7.0 Try again later")
        cfg = relay_config(tmp_path, port, dns=nameservers(dns), outbound={
            "mode": "mx", "mx_port": port, "throttle_cooldown": "1m",
            "destination": {"t.test": {"rate": "20/s", "max_connections": 4}}})
        relay = Relay(cfg, clock=lambda: time.time() + shift[0])
        await relay.start()
        try:
            d = relay.deliverer
            assert isinstance(d, DirectDeliverer)
            await send(relay, ["first@t.test"])
            dest = d.destination_for("t.test")
            lane = d.pacer.lane(dest)
            await wait_for(lambda: lane.level == 1, what="the throttle")
            assert (lane.rate(), lane.slots.limit) == ((10.0, 1.0), 2)
            assert "t.test: destination throttled (421 4.7.0 Try again later): rate 20/s " \
                   "-> 10/s, connections 4 -> 2" in caplog.text
            listing = await queue_list(tmp_path, relay)
            assert "-- destination t.test: throttled, rate 10/s, 2 of 4 connections" in listing

            # At half the rate, 8 more are 0.7 s apart from first to last (0.35 s at 20/s).
            await sink.wait_messages(1)   # the deferred one, retried
            start = len(sink.messages)
            await send(relay, ["again@t.test"], count=8)
            times: list[float] = []

            def arrived() -> bool:
                while len(times) < len(sink.messages) - start:
                    times.append(time.monotonic())
                return len(times) >= 8

            await wait_for(arrived, what="8 deliveries")
            assert times[-1] - times[0] >= 0.5
            # One cool-down later it is back to the configured rate and connections.
            shift[0] += 60
            await send(relay, ["later@t.test"])
            await wait_for(lambda: lane.level == 0, what="recovery")
            assert (lane.rate(), lane.slots.limit) == ((20.0, 1.0), 4)
            assert "t.test: destination recovered: rate 20/s, connections 4" in caplog.text
            assert "throttled" not in await queue_list(tmp_path, relay)
        finally:
            await relay.stop(deadline=2.0)


async def queue_list(tmp_path: Path, relay: Relay) -> str:
    """`relay queue list` run for real, on the relay's queue."""
    config = tmp_path / "cli.toml"
    config.write_text(f'[queue]\npath = "{relay.cfg.queue.path}"\n'
                      '[outbound]\nsmarthost = "127.0.0.1:9"\n[http]\nlisten = ""\n')
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "relay", "queue", "--config", str(config),
                         "list"], capture_output=True, text=True, timeout=60, check=False,
        cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_connection_failures_pause_the_destination_then_a_probe_resumes_it(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    async with sinks("127.0.0.2") as (port, [sink]):
        sink.script("CONNECT", "421 4.3.2 Service not available", times=3)
        async with LoopbackDNS(mx("p.test", (10, "mx.p.test", "127.0.0.2"))) as dns:
            d = deliverer(dns, port, {"pause_after": 3, "pause_for": "1s"})
            try:
                for i in range(3):
                    assert codes(await d.deliver(job(f"r{i}@p.test"))) == ["451 4.4.1"]
                dest = d.destination_for("p.test")
                assert d.pacer.paused_until(dest, time.time()) > 0
                assert "destination paused for 1s after 3 connection failures" in caplog.text
                # Paused: no connection at all, and not counted as the recipient's attempt.
                [res] = await d.deliver(job("r3@p.test"))
                assert (res.reply.code, res.reply.enhanced, res.counts) == (451, "4.4.1", False)
                assert "temporarily suspended" in res.reply.text
                assert sink.connections_opened == 3
                plan = d.pacer.plan(job("r4@p.test"), time.time())
                assert plan.requeue and plan.start_at > time.time()
                await asyncio.sleep(1.05)
                # Half-open: one connection probes, it works, the destination resumes.
                assert d.pacer.lane(dest).slots.limit == 1
                assert codes(await d.deliver(job("r5@p.test"))) == ["250 2.0.0"]
                assert "p.test: destination resumed" in caplog.text
                assert d.pacer.lane(dest).slots.limit == dest.max_connections
            finally:
                await d.close()


async def test_a_paused_destination_shows_in_the_queue_list_and_gets_no_attempts(
        start_relay, tmp_path: Path) -> None:
    async with sinks() as (port, _), \
            LoopbackDNS(mx("down.test", (10, "mx.down.test", "127.0.0.2"))) as dns:
        relay = await start_relay(port, dns=nameservers(dns), outbound={
            "mode": "mx", "mx_port": port, "pause_after": 2, "pause_for": "1m"})
        await send(relay, ["r@down.test"])
        await wait_events(relay, 2)
        await asyncio.sleep(0.8)   # retry is 200ms: no attempt while paused
        events = await relay.store.events()
        assert [e[2] for e in events] == ["deferred", "deferred"]
        listing = await queue_list(tmp_path, relay)
        assert "-- destination mx.down.test: paused until " in listing
        assert "after 2 connection failures" in listing
        assert state_path(relay.cfg.queue.path).exists()
    await relay.stop()
    assert not state_path(relay.cfg.queue.path).exists()


# --- TLS ------------------------------------------------------------------------------------

async def test_required_tls_never_sends_mail_in_plaintext() -> None:
    async with sinks("127.0.0.2") as (port, [sink]), \
            LoopbackDNS(mx("s.test", (10, "mx.s.test", "127.0.0.2"))) as dns:   # offers no STARTTLS
        d = deliverer(dns, port, {"destination": {"s.test": {"tls": "required"}}})
        try:
            [res] = await d.deliver(job("r@s.test"))
        finally:
            await d.close()
    assert (res.reply.code, res.reply.enhanced) == (451, "4.7.5")
    assert "STARTTLS" in res.reply.text
    assert not any(line.upper().startswith(b"MAIL") for _, line in sink.commands)


@pytest.mark.parametrize(("cert_name", "delivered"), [("mx.s.test", True),
                                                      ("other.test", False)])
async def test_required_tls_verifies_the_certificate_for_the_mx_name(
        cert_name: str, delivered: bool) -> None:
    server_ctx, client_ctx = self_signed_contexts(cert_name)
    async with sinks(("127.0.0.2", {"starttls_context": server_ctx})) as (port, [sink]), \
            LoopbackDNS(mx("s.test", (10, "mx.s.test", "127.0.0.2"))) as dns:
        d = deliverer(dns, port, {"destination": {"s.test": {"tls": "required"}}},
                      verify_context=client_ctx)
        try:
            [res] = await d.deliver(job("r@s.test"))
        finally:
            await d.close()
        # Let the sink see a refused handshake end before it stops.
        await sink.wait_until(lambda: sink.open_connections == 0, what="hang-up")
    if delivered:
        assert res.reply.code == 250 and sink.messages[0].tls
        assert res.tls.startswith("TLSv1.")
    else:
        assert (res.reply.code, res.reply.enhanced) == (451, "4.7.5")
        assert not any(line.upper().startswith(b"MAIL") for _, line in sink.commands)


async def test_opportunistic_tls_and_its_version_and_cipher_in_the_log_line(
        start_relay, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay.smtp")
    server_ctx, _ = self_signed_contexts("self-signed.invalid")   # unverifiable: fine here
    async with sinks(("127.0.0.2", {"starttls_context": server_ctx})) as (port, [sink]), \
            LoopbackDNS(mx("o.test", (10, "mx.o.test", "127.0.0.2"))) as dns:
        relay = await start_relay(port, dns=nameservers(dns),
                                  outbound={"mode": "mx", "mx_port": port})
        await send(relay, ["r@o.test"])
        await wait_events(relay, 1)
        assert sink.messages[0].tls
    [line] = [r.getMessage() for r in caplog.records if "status=sent" in r.getMessage()]
    assert f"relay=mx.o.test[127.0.0.2]:{port}, " in line
    assert ", status=sent (250 2.0.0 OK queued), tls=TLSv1." in line
    tls = line.rpartition(", tls=")[2]
    version, _, cipher = tls.partition(":")
    assert version in ("TLSv1.2", "TLSv1.3") and cipher.isupper() and "_" in cipher


# --- MTA-STS ----------------------------------------------------------------------------------

async def sts_delivery(mode: str, pattern: str, caplog: pytest.LogCaptureFixture,
                       ) -> tuple[RcptResult, Sink]:
    caplog.set_level(logging.INFO, logger="relay")
    server_ctx, client_ctx = self_signed_contexts("mx.sts.test")
    records = mx("sts.test", (10, "mx.sts.test", "127.0.0.2"))
    records[("_mta-sts.sts.test.", "TXT")] = ["v=STSv1; id=1;"]

    async def fetch(domain: str) -> str:
        assert domain == "sts.test"
        return POLICY.format(mode=mode, mx=pattern)

    async with sinks(("127.0.0.2", {"starttls_context": server_ctx})) as (port, [sink]), \
            LoopbackDNS(records) as dns:
        resolver = MxResolver(make_async_resolver([("127.0.0.1", dns.port)]))
        cfg = parse_config({"outbound": {"mode": "mx", "mx_port": port,
                                         "mta_sts": True}}).outbound
        d = DirectDeliverer(cfg, "relay.test", resolver=resolver,
                            mta_sts=MtaSts(resolver, fetch=fetch),
                            verify_context=client_ctx)
        try:
            [res] = await d.deliver(job("r@sts.test"))
        finally:
            await d.close()
    return res, sink


async def test_mta_sts_enforce_delivers_over_verified_tls_to_a_listed_host(caplog) -> None:
    res, sink = await sts_delivery("enforce", "*.sts.test", caplog)
    assert res.reply.code == 250 and sink.messages[0].tls


async def test_mta_sts_enforce_refuses_hosts_the_policy_does_not_list(caplog) -> None:
    res, sink = await sts_delivery("enforce", "mx.elsewhere.test", caplog)
    assert (res.reply.code, res.reply.enhanced) == (451, "4.7.5")
    assert sink.connections_opened == 0
    assert "allows none of its MX hosts" in caplog.text


async def test_mta_sts_testing_only_logs(caplog) -> None:
    res, sink = await sts_delivery("testing", "mx.elsewhere.test", caplog)
    assert res.reply.code == 250 and len(sink.messages) == 1
    assert "(testing) does not allow MX host(s) mx.sts.test; delivering anyway" in caplog.text
