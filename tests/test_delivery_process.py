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


def test_delivery_process_is_for_the_smarthost_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        relay_config(tmp_path, 2526, outbound={"mode": "mx", "delivery_process": True})
    assert any("outbound.delivery_process" in p for p in info.value.problems)
