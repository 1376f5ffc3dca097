"""Webhooks: a real aiohttp receiver on 127.0.0.1 port 0, scripted to fail, a real SQLite
queue store, and the sender between them."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import pytest_asyncio
from aiohttp import web

from relay.config import ConfigError, parse_config
from relay.events import Event
from relay.policy.access import hash_password
from relay.queue.sqlite import SQLiteQueueStore
from relay.webhook import (
    MAX_BATCH,
    Endpoint,
    WebhookSender,
    encode_batch,
    sign,
    verify,
    webhook_endpoints,
)
from tests.support.downstream import Downstream

SECRET = b"webhook-test-secret"


@dataclass
class Post:
    headers: dict[str, str]
    body: bytes
    status: int

    @property
    def events(self) -> list[dict[str, Any]]:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP endpoint that answers each POST with the next scripted status (then 200)."""

    script: list[int | str] = field(default_factory=list)   # a status, or "stall"
    posts: list[Post] = field(default_factory=list)
    port: int = 0
    runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook/s3cr3t-path?token=x"

    @property
    def accepted(self) -> list[dict[str, Any]]:
        return [e for p in self.posts if 200 <= p.status < 300 for e in p.events]

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        action = self.script.pop(0) if self.script else 200
        if action == "stall":
            self.posts.append(Post(dict(request.headers), body, 0))
            await asyncio.sleep(5)
            return web.Response(status=200)
        status = int(action)
        self.posts.append(Post(dict(request.headers), body, status))
        if status in (301, 302):
            raise web.HTTPFound("/elsewhere")
        return web.Response(status=status, text="not now" if status >= 400 else "ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook/{rest:.*}", self.handle)
        app.router.add_post("/elsewhere", self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest_asyncio.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    await r.start()
    yield r
    await r.stop()


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteQueueStore]:
    s = SQLiteQueueStore(tmp_path / "q.db")
    await s.open()
    yield s
    await s.close()


def events(n: int, *, app: str = "shop", start: int = 0) -> list[Event]:
    return [Event(ts=1_700_000_000.0 + i, queue_id=f"Q{i}", recipient=f"r{i}@example.net",
                  event="delivered", category="delivered", reply="250 2.0.0 ok",
                  campaign="spring", app=app) for i in range(start, start + n)]


def sender(store: SQLiteQueueStore, *endpoints: Endpoint, **kw: Any) -> WebhookSender:
    kw.setdefault("poll", 0.02)
    kw.setdefault("backoff_base", 0.01)
    kw.setdefault("backoff_cap", 0.05)
    kw.setdefault("timeout", 2.0)
    return WebhookSender(store, endpoints, rng=random.Random(7), **kw)


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_retries_in_order_signed_and_resumes_after_a_restart(
        tmp_path: Path, receiver: Receiver) -> None:
    receiver.script = [500, 503]
    path = tmp_path / "q.db"
    store = SQLiteQueueStore(path)
    await store.open()
    ids = await store.record_events(events(3) + events(2, app="other") + events(2, start=3))
    shop_ids = ids[:3] + ids[5:]
    hook = sender(store, Endpoint("shop", receiver.url, SECRET))
    hook.start()
    await until(lambda: receiver.accepted, "an accepted batch")
    await hook.stop()
    assert [p.status for p in receiver.posts] == [500, 503, 200]
    # a refused batch is sent again unchanged: the cursor did not move
    assert receiver.posts[0].body == receiver.posts[1].body == receiver.posts[2].body
    assert [e["id"] for e in receiver.accepted] == shop_ids       # in order, only shop's
    assert [e["recipient"] for e in receiver.accepted] == [f"r{i}@example.net"
                                                          for i in range(5)]
    first = receiver.accepted[0]
    assert first == {"id": shop_ids[0], "ts": 1_700_000_000.0, "queue_id": "Q0",
                     "recipient": "r0@example.net", "event": "delivered",
                     "category": "delivered", "reply": "250 2.0.0 ok", "campaign": "spring",
                     "app": "shop"}
    for post in receiver.posts:
        assert post.headers["Content-Type"] == "application/json"
        assert verify(SECRET, post.body, post.headers["X-Relay-Signature"])
        assert not verify(b"another secret", post.body, post.headers["X-Relay-Signature"])
        assert abs(int(post.headers["X-Relay-Timestamp"]) - time.time()) < 60
    assert await store.webhook_cursor("shop") == shop_ids[-1]
    assert await store.webhook_cursor("other") == 0
    await store.close()

    # A restart: the cursor comes back from the file; only new events are sent.
    store = SQLiteQueueStore(path)
    await store.open()
    try:
        new = await store.record_events(events(2, start=5))
        hook = sender(store, Endpoint("shop", receiver.url, SECRET))
        hook.start()
        await until(lambda: len(receiver.accepted) == 7, "the new events")
        await asyncio.sleep(0.1)                    # a few more polls: nothing is repeated
        await hook.stop()
    finally:
        await store.close()
    assert [e["id"] for e in receiver.accepted] == shop_ids + new
    assert len(receiver.posts) == 4


async def test_batches_of_at_most_100_and_bounded_bodies(store: SQLiteQueueStore,
                                                          receiver: Receiver) -> None:
    ids = await store.record_events(events(250))
    hook = sender(store, Endpoint("shop", receiver.url, SECRET))
    hook.start()
    await until(lambda: len(receiver.accepted) == 250, "250 events")
    await hook.stop()
    assert [len(p.events) for p in receiver.posts] == [MAX_BATCH, MAX_BATCH, 50]
    assert [e["id"] for e in receiver.accepted] == ids

    receiver.posts.clear()
    more = await store.record_events(events(30, start=250))
    hook = sender(store, Endpoint("shop", receiver.url, SECRET), max_body=2000)
    hook.start()
    await until(lambda: len(receiver.accepted) == 30, "30 more events")
    await hook.stop()
    assert all(len(p.body) <= 2000 for p in receiver.posts)
    assert len(receiver.posts) > 1
    assert [e["id"] for e in receiver.accepted] == more


def test_encode_batch_cuts_long_replies_and_keeps_one_event() -> None:
    long = Event(ts=1.0, queue_id="Q", recipient="r@example.net", event="bounced",
                 category="unknown", reply="550 " + "x" * 10_000)
    body, n = encode_batch([long, long], max_body=100)
    assert n == 1
    (obj,) = json.loads(body)
    assert len(obj["reply"]) == 2000
    assert encode_batch([], 100) == (b"[]", 0)


async def test_timeouts_redirects_and_refused_connections_are_failures(
        store: SQLiteQueueStore, receiver: Receiver, caplog: pytest.LogCaptureFixture,
        ) -> None:
    caplog.set_level(logging.INFO, logger="relay.webhook")
    receiver.script = ["stall", 302]
    ids = await store.record_events(events(2))
    dead = Receiver()
    await dead.start()
    dead_url = dead.url
    await dead.stop()                                  # nothing listens there any more
    hook = sender(store, Endpoint("shop", receiver.url, SECRET),
                  Endpoint("other", dead_url, SECRET), timeout=0.3)
    await store.record_events(events(1, app="other"))
    hook.start()
    await until(lambda: receiver.accepted, "the batch after a time-out and a redirect")
    await asyncio.sleep(0.1)
    await hook.stop()
    assert [p.status for p in receiver.posts] == [0, 302, 200]   # 0: the stalled one
    assert [e["id"] for e in receiver.accepted] == ids
    assert await store.webhook_cursor("shop") == ids[-1]
    assert await store.webhook_cursor("other") == 0            # it never got through
    text = caplog.text
    assert "no answer within 0.3s" in text
    assert "HTTP 302" in text
    assert "webhook of app other" in text and "Connect" in text
    assert "delivered again after 2 failure(s)" in text
    assert "s3cr3t-path" not in text and "token=x" not in text   # only the origin is logged


async def test_a_failing_app_does_not_hold_up_another(store: SQLiteQueueStore,
                                                      receiver: Receiver) -> None:
    failing = Receiver(script=[500] * 1000)
    await failing.start()
    try:
        await store.record_events(events(3, app="other") + events(3))
        hook = sender(store, Endpoint("shop", receiver.url, SECRET),
                      Endpoint("other", failing.url, SECRET))
        hook.start()
        await until(lambda: len(receiver.accepted) == 3, "shop's events")
        await until(lambda: len(failing.posts) >= 3, "other's retries")
        await hook.stop()
    finally:
        await failing.stop()
    assert {e["app"] for e in receiver.accepted} == {"shop"}
    assert await store.webhook_cursor("other") == 0


def test_backoff_doubles_is_capped_and_jittered() -> None:
    hook = WebhookSender(None, [], backoff_base=1.0, backoff_cap=60.0,  # type: ignore[arg-type]
                         rng=random.Random(1))
    for failures, ceiling in [(1, 1), (2, 2), (3, 4), (6, 32), (7, 60), (50, 60), (500, 60)]:
        delays = [hook.delay(failures) for _ in range(50)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 1                    # jittered


def test_signature() -> None:
    body = b'[{"id":1}]'
    assert sign(b"k", body) == (
        "sha256=" + __import__("hmac").new(b"k", body, "sha256").hexdigest())
    assert verify(b"k", body, sign(b"k", body))
    assert not verify(b"k", body + b" ", sign(b"k", body))


# --- configuration and wiring -----------------------------------------------------------------

def app_config(**extra: Any) -> dict[str, Any]:
    return {"outbound": {"smarthost": "127.0.0.1:9"},
            "app": [{"name": "shop", "password_hash": hash_password("pw", iterations=1000),
                     **extra}]}


def test_config_webhook_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", "hunter2-secret")
    cfg = parse_config(app_config(webhook_url="https://hooks.example.com/relay",
                                  webhook_secret_env="TEST_HOOK_SECRET"))
    (app,) = cfg.apps
    assert (app.webhook_url, app.webhook_secret_env) == ("https://hooks.example.com/relay",
                                                         "TEST_HOOK_SECRET")
    (endpoint,) = webhook_endpoints(cfg)
    assert endpoint == Endpoint("shop", "https://hooks.example.com/relay", b"hunter2-secret")
    assert "hunter2" not in repr(endpoint)
    # the variable vanished after check-config: that app's webhook is off, the relay runs
    assert webhook_endpoints(cfg, environ={}) == []


@pytest.mark.parametrize(("extra", "problem"), [
    ({"webhook_url": "https://h.example.com/x"},
     "app[0].webhook_secret_env: webhook_url and webhook_secret_env go together"),
    ({"webhook_secret_env": "TEST_HOOK_SECRET"},
     "app[0].webhook_url: webhook_url and webhook_secret_env go together"),
    ({"webhook_url": "ftp://h.example.com/x", "webhook_secret_env": "TEST_HOOK_SECRET"},
     "app[0].webhook_url: 'ftp://h.example.com/x' is not an http(s) URL"),
    ({"webhook_url": "https://h.example.com/x", "webhook_secret_env": "TEST_HOOK_UNSET"},
     "app[0].webhook_secret_env: environment variable TEST_HOOK_UNSET is not set"),
    ({"webhook_url": "https://h.example.com/x", "webhook_secret_env": "not a name"},
     "app[0].webhook_secret_env: 'not a name' is not an environment variable name"),
])
def test_config_webhook_problems(monkeypatch: pytest.MonkeyPatch, extra: dict[str, str],
                                 problem: str) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", "s")
    monkeypatch.delenv("TEST_HOOK_UNSET", raising=False)
    with pytest.raises(ConfigError) as err:
        parse_config(app_config(**extra))
    assert [p.split(": ", 1)[1] for p in err.value.problems] == [problem]


async def test_the_relay_posts_its_delivery_events(
        downstream: Downstream, start_relay: Any, receiver: Receiver,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_HOOK_SECRET", SECRET.decode())
    relay = await start_relay(
        downstream.port,
        server={"mynetworks": ["192.0.2.0/24"], "auth_require_tls": False},
        app=[{"name": "shop", "password_hash": hash_password("pw", iterations=1000),
              "from_domains": ["example.com"], "webhook_url": receiver.url,
              "webhook_secret_env": "TEST_HOOK_SECRET"}])
    relay.webhooks.poll = 0.02
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as c:
        await c.login("shop", "pw")
        await c.sendmail("news@example.com", ["a@example.net", "b@example.net"],
                         b"From: news@example.com\r\nTo: a@example.net\r\nSubject: s\r\n"
                         b"X-Relay-Campaign: spring\r\n\r\nhi\r\n")
    await until(lambda: len(receiver.accepted) == 2, "two delivered events")
    assert sorted((e["recipient"], e["event"], e["category"], e["campaign"], e["app"])
                  for e in receiver.accepted) == [
        ("a@example.net", "delivered", "delivered", "spring", "shop"),
        ("b@example.net", "delivered", "delivered", "spring", "shop")]
    assert all(verify(SECRET, p.body, p.headers["X-Relay-Signature"]) for p in receiver.posts)
    await relay.stop(deadline=2.0)
    assert relay.webhooks._tasks == [] and relay.webhooks._session is None
