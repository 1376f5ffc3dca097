"""[outbound] delivery_process = true: rendering, DKIM and the SMTP client in a child process
(relay/outbound/worker.py). The whole relay runs against the real scripted downstream; the
child is a real process, killed with SIGKILL in the middle of a load to show that nothing
accepted is lost."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiosmtplib
import pytest

from relay.config import ConfigError
from relay.outbound.worker import RemoteDeliverer
from tests.conftest import relay_config, wait_for
from tests.support.dkimverify import dkimpy_results
from tests.support.downstream import Downstream
from tests.test_deliverability_e2e import (  # noqa: F401 - fixtures
    dns,
    header,
    key_files,
    marketing,
    message,
    send,
)

SPLIT = {"outbound": {"delivery_process": True}}


async def test_marketing_mail_through_the_delivery_process(
        marketing, downstream: Downstream, dns) -> None:  # noqa: F811 - fixtures
    relay = await marketing(**SPLIT)
    deliverer = relay.deliverer
    assert isinstance(deliverer, RemoteDeliverer)
    assert deliverer.pid is not None and deliverer.pid != os.getpid()
    await send(relay, ["a@example.net", "b@example.net"], message())
    got = await downstream.wait_messages(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["a@example.net", "b@example.net"]
    for m in got:     # rendered and signed in the child: per-recipient header, both keys
        assert header(m.data, b"List-Unsubscribe-Post") == b"List-Unsubscribe=One-Click"
        assert await dkimpy_results(m.data, dns.port) == [True, True]
    # the queue is settled by the parent: both delivered, message gone
    await wait_for(lambda: relay.metrics.dkim_seconds._sum.get() > 0, what="dkim metric")
    assert await relay.store.counts() == {}


async def test_delivery_process_pipes_are_widened_and_carry_large_jobs(
        marketing, downstream: Downstream, dns) -> None:  # noqa: F811 - fixtures
    """Both pipes get 1 MiB (F_SETPIPE_SZ); a job far larger than that (3 MiB body, three
    copies) still crosses whole, and every copy is signed over its exact bytes."""
    import fcntl

    relay = await marketing(**SPLIT)
    deliverer = relay.deliverer
    assert isinstance(deliverer, RemoteDeliverer) and deliverer._proc is not None
    transports = (deliverer._proc.stdin.transport,     # type: ignore[union-attr]
                  deliverer._proc.stdout._transport)   # type: ignore[union-attr]
    for transport in transports:
        pipe = transport.get_extra_info("pipe")
        assert fcntl.fcntl(pipe.fileno(), fcntl.F_GETPIPE_SZ) == 1024 * 1024
    line = b"0123456789" * 7 + b".tail\r\n"
    body = b"".join(b"." + line if i % 9 == 0 else line for i in range(40_000))
    rcpts = ["a@example.net", "b@example.net", "c@example.net"]
    await send(relay, rcpts, message().replace(b"Hello.\r\n", body))
    got = await downstream.wait_messages(3, timeout=60)
    assert sorted(m.rcpt_tos[0] for m in got) == rcpts
    for m in got:
        assert m.data.endswith(body)   # dot-stuffing undone by the downstream, bytes exact
        assert await dkimpy_results(m.data, dns.port) == [True, True]


async def test_killed_delivery_process_loses_nothing(tmp_path: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    async with Downstream() as ds:
        ds.script("EOD", "stall:0.05", times=None)    # deliveries are in flight at the kill
        from relay.app import Relay

        cfg = relay_config(tmp_path, ds.port, outbound={"delivery_process": True})
        relay = Relay(cfg)
        await relay.start()
        try:
            deliverer = relay.deliverer
            assert isinstance(deliverer, RemoteDeliverer)
            first = deliverer.pid
            host, port = relay.smtp_addresses[0]
            sent = []

            async def client(k: int) -> None:
                async with aiosmtplib.SMTP(hostname=host, port=port) as c:
                    for i in range(15):
                        rcpt = f"r{k}-{i}@example.net"
                        await c.sendmail("app@example.com", [rcpt],
                                         f"From: app@example.com\r\nSubject: {k}-{i}\r\n\r\n"
                                         "x\r\n")
                        sent.append(rcpt)

            load = asyncio.gather(*(client(k) for k in range(4)))
            await wait_for(lambda: len(ds.messages) >= 5, what="first deliveries")
            os.kill(first, signal.SIGKILL)
            await load
            await wait_for(lambda: deliverer.pid not in (None, first), what="a new child")
            assert deliverer.started == 2
            await wait_for(lambda: set(sent) <= {m.rcpt_tos[0] for m in ds.messages},
                           timeout=20, what="every accepted message delivered")
            assert len(sent) == 60
            # Copies the killed child had sent are sent again (at least once): the queue
            # empties when the retries are through.
            for _ in range(200):
                if await relay.store.counts() == {}:
                    break
                await asyncio.sleep(0.05)
            assert await relay.store.counts() == {}
            assert {m.rcpt_tos[0] for m in ds.messages} == set(sent)
        finally:
            await relay.stop(deadline=5.0)
        assert deliverer.pid is None          # drained and gone at stop
        assert f"delivery process {first} exited with status -9" in caplog.text
        # One error line says how many jobs were deferred; each job is deferred like any
        # 4xx (its own status=deferred line), not with a traceback of its own.
        assert "Traceback" not in caplog.text


def test_delivery_process_is_for_the_smarthost_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        relay_config(tmp_path, 2526, outbound={"mode": "mx", "delivery_process": True})
    assert any("outbound.delivery_process" in p for p in info.value.problems)


def _exited(pid: int) -> bool:
    """Gone, or a zombie (after the relay's death it is reaped by whoever adopted it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("stall", ["1.0", "30"])   # a slow next hop, a stalled one
async def test_child_stops_delivering_when_the_relay_is_killed(
        tmp_path: Path, downstream: Downstream, stall: str) -> None:
    """SIGKILL of the relay: the child must not go on delivering the jobs it holds. Nobody
    will record their outcome; the queue still has them leased and the restarted relay sends
    them again, so every copy the orphan sends is a duplicate (and a stalled next hop would
    keep it alive for command_timeout; and a connection cut off in the middle of a
    transaction is closed, not sent a QUIT that a stalled server never answers)."""
    import re

    from tests.test_lifecycle import free_port, write_config
    from tests.test_sigterm_load import start

    downstream.script("EOD", f"stall:{stall}", times=None)    # jobs pile up in the child
    port = free_port()
    cfg = tmp_path / "relay.toml"
    write_config(cfg, port, downstream.port,
                 outbound="max_connections = 4\ndelivery_process = true")
    proc = await start(cfg)
    try:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as c:
            for i in range(40):
                await c.sendmail("a@example.com", [f"r{i}@example.net"],
                                 f"From: a@example.com\r\nSubject: {i}\r\n\r\nx\r\n")
        log = (tmp_path / "var" / "relay.log").read_text()
        m = re.search(r"delivery process started: pid (\d+)", log)
        assert m is not None
        child = int(m.group(1))

        def mails() -> int:
            return sum(1 for _, line in downstream.commands if line.upper().startswith(b"MAIL"))

        await wait_for(lambda: mails() >= 4, what="deliveries in flight")
    finally:
        proc.kill()
        await proc.wait()
    at_kill = mails()
    await wait_for(lambda: _exited(child), timeout=3, what="the orphaned child to exit")
    await asyncio.sleep(0.5)
    # at most the transactions that were being started at the moment of the kill
    assert mails() - at_kill <= 4, f"{mails() - at_kill} transactions started by the orphan"


async def test_a_hung_delivery_process_is_killed_and_replaced(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A child that stops answering (here SIGSTOP: alive, but its loop runs no more) is
    killed after hang_timeout; the mail it would have carried goes out through the next."""
    from relay.app import Relay

    async with Downstream() as ds:
        relay = Relay(relay_config(tmp_path, ds.port, outbound={"delivery_process": True}))
        deliverer = relay.deliverer
        assert isinstance(deliverer, RemoteDeliverer)
        deliverer.ping_every, deliverer.hang_timeout = 0.1, 1.0
        await relay.start()
        try:
            first = deliverer.pid
            assert first is not None
            os.kill(first, signal.SIGSTOP)
            host, port = relay.smtp_addresses[0]
            async with aiosmtplib.SMTP(hostname=host, port=port) as c:
                await c.sendmail("app@example.com", ["r@example.net"],
                                 "From: app@example.com\r\nSubject: hung\r\n\r\nx\r\n")
            await wait_for(lambda: deliverer.pid not in (None, first), timeout=15,
                           what="a new delivery process")
            await ds.wait_messages(1, timeout=15)
            assert ds.messages[0].rcpt_tos == ["r@example.net"]
        finally:
            await relay.stop(deadline=5.0)
        assert f"delivery process {first} has not answered for" in caplog.text
        with pytest.raises(ProcessLookupError):
            os.kill(first, 0)                       # gone, not left stopped
