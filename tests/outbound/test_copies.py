"""Per-recipient copies (List-Unsubscribe per recipient) of one message go out side by side
over the smarthost pool, at most PARALLEL_COPIES at once, one at a time for a big body
(relay/outbound/smarthost.py `SmarthostDeliverer.deliver`). Real scripted downstream."""

from __future__ import annotations

import time
from pathlib import Path

from relay.outbound.render import Renderer, UnsubscribeSettings
from relay.outbound.smarthost import PARALLEL_COPIES, PARALLEL_COPIES_MAX_BODY, SmarthostDeliverer
from relay.policy.unsubscribe import Tokens
from relay.queue import Job, Recipient
from tests.conftest import relay_config
from tests.support.downstream import Downstream

BODY = b"From: news@example.com\r\nSubject: copies\r\n\r\nhello\r\n"


def renderer() -> Renderer:
    return Renderer(unsubscribe=UnsubscribeSettings(
        tokens=Tokens(b"k" * 32, lifetime=86400), public_url="https://relay.test",
        mail_domain="relay.test"))


def marketing(n: int, body: bytes = BODY) -> Job:
    return Job("Q1", "news@example.com", body, time.time(), False, False,
               [Recipient(i, f"r{i}@example.net") for i in range(1, n + 1)],
               stream="marketing")


async def deliver(tmp_path: Path, ds: Downstream, job: Job) -> dict[str, str]:
    cfg = relay_config(tmp_path, ds.port, outbound={"max_connections": 10})
    deliverer = SmarthostDeliverer(cfg.outbound, "relay.test", renderer=renderer())
    try:
        results = await deliverer.deliver(job)
    finally:
        await deliverer.close()
    return {r.recipient.address: f"{r.reply.code}" for r in results}


async def test_copies_go_side_by_side_each_with_its_own_headers(tmp_path: Path) -> None:
    async with Downstream() as ds:
        ds.script("EOD", "stall:0.3", times=None)   # every copy is still in flight
        got = await deliver(tmp_path, ds, marketing(8))
        assert got == {f"r{i}@example.net": "250" for i in range(1, 9)}
        assert ds.max_concurrent == PARALLEL_COPIES
        assert len(ds.messages) == 8
        for msg in ds.messages:
            assert len(msg.rcpt_tos) == 1
            head = msg.data.split(b"\r\n\r\n", 1)[0]
            assert head.count(b"List-Unsubscribe: ") == 1
            assert b"List-Unsubscribe-Post: List-Unsubscribe=One-Click" in head
        urls = {m.data.split(b"List-Unsubscribe: ", 1)[1].split(b"\r\n", 1)[0]
                for m in ds.messages}
        assert len(urls) == 8       # one token per recipient


async def test_a_big_body_goes_one_copy_at_a_time(tmp_path: Path) -> None:
    big = BODY + (b"x" * 76 + b"\r\n") * (PARALLEL_COPIES_MAX_BODY // 78 + 1)
    async with Downstream() as ds:
        ds.script("EOD", "stall:0.1", times=None)
        got = await deliver(tmp_path, ds, marketing(3, big))
        assert got == {f"r{i}@example.net": "250" for i in range(1, 4)}
        assert ds.max_concurrent == 1
        assert len(ds.messages) == 3
