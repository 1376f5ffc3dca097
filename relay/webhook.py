"""Events to each app's webhook: JSON batches, HMAC-signed, retried, in order.

For every `[[app]]` with `webhook_url`, one task reads the app's new event rows (id greater
than the app's cursor) and POSTs them as a JSON list of event objects, at most 100 a batch:

    POST webhook_url
    Content-Type: application/json
    X-Relay-Timestamp: 1764756000                       (Unix time of this attempt)
    X-Relay-Signature: sha256=HEX                       (HMAC-SHA256 of the body, with the
                                                         secret in $webhook_secret_env)
    [{"id": 41, "ts": 1764755999.8, "queue_id": "7F3A9C21D0", "recipient": "a@example.net",
      "event": "delivered", "category": "delivered", "reply": "250 2.0.0 OK",
      "campaign": "spring", "app": "shop"}, ...]

Only a 2xx answer moves the cursor (stored in the queue database's `webhook_cursor` table,
so a restart resumes where the last acknowledged batch ended). Anything else (another
status, a redirect, a time-out, a refused connection) keeps the batch and retries it after
an exponential, capped, jittered delay: one batch at a time per app, so each app's events,
and hence each recipient's, arrive in the order they happened. Delivery is at least once (a
batch whose 2xx was lost is sent again): receivers deduplicate by `id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp

from relay import __version__
from relay.config import Config
from relay.events import Event, EventStore

WEBHOOK = logging.getLogger("relay.webhook")

MAX_BATCH = 100               # events per POST
MAX_BODY = 256 * 1024         # bytes per POST; a batch is cut short to stay under it
MAX_REPLY = 2000              # characters of an event's reply text sent
MAX_ERROR_TEXT = 200          # bytes of a refusing receiver's answer kept for the log


@dataclass(frozen=True)
class Endpoint:
    app: str
    url: str
    secret: bytes = field(repr=False)


def sign(secret: bytes, body: bytes) -> str:
    """The X-Relay-Signature value: "sha256=" and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, signature: str) -> bool:
    """What a receiver does with X-Relay-Signature (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), signature)


def encode_batch(rows: Sequence[Event], max_body: int = MAX_BODY) -> tuple[bytes, int]:
    """The JSON body of the first rows that fit in `max_body` bytes, and how many it holds
    (at least one: a single event is always small, its reply being cut to MAX_REPLY)."""
    parts: list[bytes] = []
    size = 2                                   # the brackets
    for row in rows:
        obj = row.to_json()
        obj["reply"] = obj["reply"][:MAX_REPLY]
        part = json.dumps(obj, separators=(",", ":")).encode("ascii")
        extra = len(part) + (1 if parts else 0)
        if parts and size + extra > max_body:
            break
        parts.append(part)
        size += extra
    return b"[" + b",".join(parts) + b"]", len(parts)


def webhook_endpoints(cfg: Config, environ: Mapping[str, str] | None = None,
                      ) -> list[Endpoint]:
    """One endpoint per [[app]] with a webhook_url whose secret is set (check-config makes
    sure it is; an app whose variable vanished since is skipped with an error)."""
    env = os.environ if environ is None else environ
    out = []
    for app in cfg.apps:
        if app.webhook_url is None or app.webhook_secret_env is None:
            continue
        secret = env.get(app.webhook_secret_env)
        if not secret:
            WEBHOOK.error("%s: webhook of app %s disabled: environment variable %s is not set",
                          _origin(app.webhook_url), app.name, app.webhook_secret_env)
            continue
        out.append(Endpoint(app.name, app.webhook_url, secret.encode("utf-8")))
    return out


class WebhookSender:
    """The background tasks that forward events, one per endpoint (see module docstring).

    `start` needs a running event loop and an open store; `stop` before closing the store."""

    def __init__(self, store: EventStore, endpoints: Sequence[Endpoint], *,
                 batch: int = MAX_BATCH, max_body: int = MAX_BODY, timeout: float = 10.0,
                 poll: float = 1.0, backoff_base: float = 1.0, backoff_cap: float = 300.0,
                 clock: Callable[[], float] = time.time, rng: random.Random | None = None):
        self.store = store
        self.endpoints = list(endpoints)
        self.batch = max(1, min(batch, MAX_BATCH))
        self.max_body = max_body
        self.timeout = timeout
        self.poll = poll
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.clock = clock
        self.rng = rng or random.Random()
        self._stopping = asyncio.Event()
        self._wake: dict[str, asyncio.Event] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    def start(self) -> None:
        if not self.endpoints:
            return
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.timeout),
            connector=aiohttp.TCPConnector(limit=len(self.endpoints) * 2),
            headers={"User-Agent": f"relay/{__version__}"})
        loop = asyncio.get_running_loop()
        for ep in self.endpoints:
            self._wake[ep.app] = asyncio.Event()
            self._tasks.append(loop.create_task(self._run(ep), name=f"webhook:{ep.app}"))

    def wake(self) -> None:
        """New events were written: look for them now rather than at the next poll."""
        for event in self._wake.values():
            event.set()

    async def stop(self, deadline: float = 5.0) -> None:
        """Let a POST in flight finish within `deadline` seconds; one cut off is sent again
        after the next start (its batch was not acknowledged, the cursor did not move)."""
        self._stopping.set()
        self.wake()
        if self._tasks:
            _, late = await asyncio.wait(self._tasks, timeout=deadline)
            for task in late:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            self._tasks.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def delay(self, failures: int) -> float:
        """Wait before the retry after `failures` consecutive failures: doubling from
        backoff_base, capped at backoff_cap, then jittered down to half of that at random
        (so that many relays do not retry a recovering receiver in step)."""
        base = min(self.backoff_cap, self.backoff_base * 2 ** min(failures - 1, 32))
        return base * self.rng.uniform(0.5, 1.0)

    async def _pause(self, app: str, seconds: float) -> None:
        wake = self._wake[app]
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), seconds)
        wake.clear()

    async def _run(self, ep: Endpoint) -> None:
        peer = _origin(ep.url)
        cursor: int | None = None
        failures = 0
        while not self._stopping.is_set():
            try:
                if cursor is None:
                    cursor = await self.store.webhook_cursor(ep.app)
                rows = await self.store.event_rows(since_id=cursor, limit=self.batch,
                                                   app=ep.app)
            except Exception:  # noqa: BLE001 - a store fault must not end the task
                WEBHOOK.exception("%s: webhook of app %s: cannot read events", peer, ep.app)
                await self._pause(ep.app, max(self.poll, 1.0))
                continue
            if not rows:
                await self._pause(ep.app, self.poll)
                continue
            body, count = encode_batch(rows, self.max_body)
            sent = rows[:count]
            error = await self._post(ep, body)
            if error is not None:
                failures += 1
                wait = self.delay(failures)
                WEBHOOK.warning("%s: webhook of app %s: %s; %d event(s) from id %d kept, "
                                "retry %d in %.1fs", peer, ep.app, error, count, sent[0].id,
                                failures, wait)
                if not self._stopping.is_set():
                    await self._pause_for_retry(wait)
                continue
            if failures:
                WEBHOOK.info("%s: webhook of app %s: delivered again after %d failure(s)",
                             peer, ep.app, failures)
            failures = 0
            cursor = sent[-1].id
            WEBHOOK.debug("%s: webhook of app %s: %d event(s) up to id %d", peer, ep.app,
                          count, cursor)
            try:
                await self.store.set_webhook_cursor(ep.app, cursor)
            except Exception:  # noqa: BLE001 - they were delivered; a restart repeats them
                WEBHOOK.exception("%s: webhook of app %s: cannot save the cursor %d", peer,
                                  ep.app, cursor)

    async def _pause_for_retry(self, seconds: float) -> None:
        # Only shutdown cuts a backoff short: new events must not hurry a failing receiver.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _post(self, ep: Endpoint, body: bytes) -> str | None:
        """POST one batch; None if the receiver took it (2xx), else why not."""
        assert self._session is not None
        headers = {"Content-Type": "application/json",
                   "X-Relay-Timestamp": str(int(self.clock())),
                   "X-Relay-Signature": sign(ep.secret, body)}
        try:
            async with self._session.post(ep.url, data=body, headers=headers,
                                          allow_redirects=False) as resp:
                if 200 <= resp.status < 300:
                    return None
                text = await resp.content.read(MAX_ERROR_TEXT)
                said = text.decode("utf-8", "replace").strip()
                return f"HTTP {resp.status}" + (f" ({said})" if said else "")
        except TimeoutError:
            return f"no answer within {self.timeout:g}s"
        except aiohttp.ClientError as exc:
            return f"{type(exc).__name__}: {exc}"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL: its path or query may hold a token, never logged."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"
