"""The scheduler: takes due recipients from the store, delivers them, writes the outcome.

Transient failures go back to the queue on the [queue].retry schedule (last step repeats,
with jitter) until [queue].lifetime has passed since the message arrived, then expire;
permanent ones bounce. An unexpected error in delivery is treated as transient
(the slimta rule): mail is never dropped because of a bug in a deliverer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable

from relay import replies
from relay.address import canonical, domain_of
from relay.events import Outcome
from relay.log import BOUNCE, QMGR, SMTP
from relay.metrics import Metrics
from relay.outbound import Deliverer, RcptResult
from relay.outbound.classify import Action, Category, Rules, SmtpReply, classify, from_catalogue
from relay.outbound.dsn import FailedRecipient, build_dsn
from relay.queue import Job, NewMessage, QueueStore, Settlement, State, new_queue_id
from relay.queue.pacing import Paced, Pacer
from relay.suppression import GLOBAL, Reason, Suppression, SuppressionStore

# Jobs taken in one claim: each claim is one piece of the store's writer work, and reads the
# bodies it hands out (32 x 50 KB is ~3 ms); a longer claim would hold new messages' commits.
CLAIM_BATCH = 32


def backoff(attempts: int, steps: tuple[float, ...], rng: random.Random) -> float:
    """Delay before the next attempt after `attempts` failed ones (jitter +-20 %)."""
    base = steps[min(max(attempts, 1), len(steps)) - 1]
    return base * rng.uniform(0.8, 1.2)


def _duration(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


class Scheduler:
    def __init__(self, store: QueueStore, deliverer: Deliverer, *,
                 retry: tuple[float, ...], lifetime: float, concurrency: int,
                 max_rcpts: int = 100, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None, idle_poll: float = 5.0,
                 pacer: Pacer | None = None, hostname: str = "localhost",
                 suppressions: SuppressionStore | None = None, rules: Rules | None = None,
                 soft_limit: int = 5, soft_days: float = 3 * 86400.0):
        self.store = store
        self.deliverer = deliverer
        self.retry = retry
        self.lifetime = lifetime
        self.concurrency = concurrency
        self.max_rcpts = max_rcpts
        self.clock = clock
        self.rng = rng or random.Random()
        self.idle_poll = idle_poll
        self.pacer = pacer or Pacer(lambda domain: None)
        self.hostname = hostname
        self.suppressions = suppressions
        self.rules = rules
        self.soft_limit = soft_limit
        self.soft_days = soft_days
        self.metrics: Metrics | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._inflight: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    def wake(self) -> None:
        """New mail was queued (or flushed): look for due work now."""
        self._wake.set()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="scheduler")

    async def stop(self, deadline: float = 30.0) -> None:
        """Stop claiming; let deliveries in flight finish within `deadline` seconds.

        Deliveries cut off by the deadline keep their lease; `recover` at the next start
        returns them to the queue (at-least-once)."""
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._inflight:
            _, late = await asyncio.wait(set(self._inflight), timeout=deadline)
            for task in late:
                task.cancel()
            if late:
                await asyncio.gather(*late, return_exceptions=True)

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self.concurrency - len(self._inflight)
            want = min(free, CLAIM_BATCH)
            jobs: list[Job] = []
            if free > 0:
                try:
                    jobs = await self.store.claim(self.clock(), want, self.max_rcpts)
                except Exception:  # noqa: BLE001 - a store fault must not stop the scheduler
                    QMGR.exception("queue: cannot claim due mail; retrying in 1s")
                    await asyncio.sleep(1.0)
                    continue
                now = self.clock()
                for claimed in jobs:
                    for job in self.pacer.split(claimed):
                        paced = self.pacer.plan(job, now)
                        if paced.requeue:
                            await self._requeue(paced.job, paced.start_at)
                            continue
                        task = asyncio.get_running_loop().create_task(self._attempt(paced))
                        self._inflight.add(task)
                        task.add_done_callback(self._done)
            if jobs and len(jobs) == want:
                continue   # there may be more due work; loop until claims come back short
            await self._sleep_until_due(free)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self._wake.set()

    async def _sleep_until_due(self, free: int) -> None:
        timeout = self.idle_poll
        if free > 0:
            try:
                nxt = await self.store.next_due()
            except Exception:  # noqa: BLE001 - then poll again later
                nxt = None
            if nxt is not None:
                timeout = min(timeout, max(nxt - self.clock(), 0.0))
        if timeout <= 0:
            return
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

    async def _requeue(self, job: Job, due: float) -> None:
        """Back to the queue until its paced slot; not an attempt, no event."""
        try:
            await self.store.settle(job.queue_id, [
                Settlement(r.id, State.QUEUED, due, None, counts=False) for r in job.recipients])
        except Exception:  # noqa: BLE001 - the lease stays; recover() at start retries
            QMGR.exception("%s: cannot requeue paced recipients", job.queue_id)

    async def _attempt(self, paced: Paced) -> None:
        job = paced.job
        delay = paced.start_at - self.clock()
        if delay > 0:
            await asyncio.sleep(delay)
        job = await self._drop_suppressed(job)
        if not job.recipients:
            return
        slots = paced.lane.slots if paced.lane else None
        try:
            if slots is not None:
                async with slots:
                    results = await self.deliverer.deliver(job)
            else:
                results = await self.deliverer.deliver(job)
        except Exception as exc:  # noqa: BLE001 - an unexpected error is transient (slimta)
            SMTP.exception("%s: delivery failed unexpectedly", job.queue_id)
            reply = from_catalogue(replies.R451_DELIVERY_ERROR, detail=type(exc).__name__)
            results = [RcptResult(r, reply) for r in job.recipients]
        missing = {r.id for r in job.recipients} - {res.recipient.id for res in results}
        if missing:  # a deliverer must answer for every recipient; never lose one
            reply = from_catalogue(replies.R451_DELIVERY_ERROR, detail="no result")
            results += [RcptResult(r, reply) for r in job.recipients if r.id in missing]
        await self._settle(job, results)

    async def _drop_suppressed(self, job: Job) -> Job:
        """Invariant 3: a recipient suppressed at the moment of sending is not sent to, even
        if it was accepted before the suppression arrived. It ends as "suppressed"."""
        if self.suppressions is None:
            return job
        scopes = suppression_scopes(job.sender)
        hits = [(r, s) for r in job.recipients
                if (s := self.suppressions.check(r.address, scopes)) is not None]
        if not hits:
            return job
        now = self.clock()
        try:
            removed = await self.store.settle(
                job.queue_id,
                [Settlement(r.id, State.SUPPRESSED, now, f"suppressed: {s.reason}")
                 for r, s in hits],
                [Outcome(r.address, "suppressed", f"{s.reason} ({s.scope})") for r, s in hits],
                app=job.app, campaign=job.meta.get("campaign"))
        except Exception:  # noqa: BLE001 - the lease stays; recover() at start retries
            QMGR.exception("%s: cannot record suppressed recipients", job.queue_id)
            return dataclasses.replace(job, recipients=[])
        if self.metrics is not None:
            for _ in hits:
                self.metrics.outcome("suppressed")
        for r, s in hits:
            SMTP.info("%s: to=<%s>, relay=none, delay=%.2f, dsn=5.7.1, status=suppressed "
                      "(%s, scope %s)", job.queue_id, r.address, now - job.received_at,
                      s.reason, s.scope)
        if removed:
            QMGR.info("%s: removed", job.queue_id)
        hit_ids = {r.id for r, _ in hits}
        return dataclasses.replace(job, recipients=[r for r in job.recipients
                                                    if r.id not in hit_ids])

    async def _suppress(self, address: str, reply: SmtpReply, now: float) -> None:
        """A reply really about the recipient (invariant 5) suppresses it at once."""
        if self.suppressions is None:
            return
        entry = Suppression(canonical(address), GLOBAL, Reason.HARD_BOUNCE, str(reply), now)
        try:
            await asyncio.to_thread(self.suppressions.add, entry)
        except Exception:  # noqa: BLE001 - delivery outcome is already durable
            QMGR.exception("cannot record suppression of %s", address)

    async def _soft_bounces(self, soft: list[tuple[str, SmtpReply]], delivered: list[str],
                            now: float) -> None:
        """Soft bounces add up: `soft_limit` in a row over at least `soft_days` suppress
        (reason soft-bounce-limit); a delivery starts the count again."""
        store = self.suppressions
        if store is None or not (soft or delivered):
            return
        try:
            for address in delivered:
                if store.soft_bounces(address) is not None:   # a read first: rarely a write
                    await asyncio.to_thread(store.clear_soft_bounces, address)
            for address, reply in soft:
                count, first = await asyncio.to_thread(store.record_soft_bounce, address, now)
                if count >= self.soft_limit and now - first >= self.soft_days:
                    await asyncio.to_thread(store.add, Suppression(
                        canonical(address), GLOBAL, Reason.SOFT_BOUNCE_LIMIT,
                        f"{count} soft bounces since {_duration(now - first)} ago; last: "
                        f"{reply}", now))
                    QMGR.info("to=<%s>: suppressed after %d soft bounces", address, count)
        except Exception:  # noqa: BLE001 - delivery outcome is already durable
            QMGR.exception("cannot record soft bounces")

    async def _settle(self, job: Job, results: list[RcptResult]) -> None:
        now = self.clock()
        settlements: list[Settlement] = []
        events: list[Outcome] = []
        lines: list[tuple[int, str]] = []
        failed: list[FailedRecipient] = []
        to_suppress: list[tuple[str, SmtpReply]] = []
        soft: list[tuple[str, SmtpReply]] = []
        delivered: list[str] = []
        throttle: SmtpReply | None = None
        for res in results:
            rcpt, reply = res.recipient, res.reply
            verdict = classify(reply, self.rules)
            if verdict.throttle and throttle is None:
                throttle = reply
            if verdict.category is Category.SOFT:
                soft.append((rcpt.address, reply))
            elif verdict.category in _WARN and verdict.action is Action.BOUNCE:
                # Block, content and our own faults are for the admin, never the recipient's.
                warning = (f"{job.queue_id}: to=<{rcpt.address}>: {verdict.category} refusal, "
                           f"not suppressed: {reply}")
                lines.append((logging.WARNING, warning))
            delay = now - job.received_at
            head = (f"{job.queue_id}: to=<{rcpt.address}>, relay={res.relay}, "
                    f"delay={delay:.2f}, dsn={reply.enhanced or _dsn(reply.code)}")
            # After the reply, where pflogsumm's "status=(\S+)(.*)" does not mind it.
            tls = f", tls={res.tls}" if res.tls else ""
            if verdict.action is Action.DELIVERED:
                settlements.append(Settlement(rcpt.id, State.DELIVERED, now, str(reply)))
                events.append(Outcome(rcpt.address, "delivered", str(reply),
                                      str(verdict.category)))
                delivered.append(rcpt.address)
                lines.append((logging.INFO, f"{head}, status=sent ({reply}){tls}"))
            elif verdict.action is Action.BOUNCE:
                settlements.append(Settlement(rcpt.id, State.BOUNCED, now, str(reply)))
                events.append(Outcome(rcpt.address, "bounced", str(reply),
                                      str(verdict.category)))
                lines.append((logging.INFO, f"{head}, status=bounced ({reply})"))
                failed.append(_failed(rcpt.address, reply, res.relay, now, "5.0.0"))
                if verdict.suppress:
                    to_suppress.append((rcpt.address, reply))
            elif now - job.received_at >= self.lifetime:
                why = from_catalogue(replies.R4XX_EXPIRED, lifetime=_duration(self.lifetime),
                                     last=str(reply))
                settlements.append(Settlement(rcpt.id, State.EXPIRED, now, str(reply),
                                              res.counts))
                events.append(Outcome(rcpt.address, "expired", str(reply),
                                      str(verdict.category)))
                lines.append((logging.INFO, f"{head}, status=expired ({why.text})"))
                failed.append(_failed(rcpt.address, reply, res.relay, now, "4.4.7"))
            else:
                attempts = rcpt.attempts + (1 if res.counts else 0)
                # An attempt that does not count (our side's fault) is retried soon, not at once.
                nxt = now + (backoff(attempts, self.retry, self.rng) if res.counts else 1.0)
                settlements.append(Settlement(rcpt.id, State.QUEUED, nxt, str(reply),
                                              res.counts))
                events.append(Outcome(rcpt.address, "deferred", str(reply),
                                      str(verdict.category)))
                lines.append((logging.INFO, f"{head}, status=deferred ({reply})"))
        hook = getattr(self.deliverer, "throttled", None)
        if throttle is not None and hook is not None:
            hook(job, throttle)   # the classifier's rate-limited signal, to the destination
        notice = self._notice(job, failed, now) if failed else None
        # The outcome is known: a store fault (locked, full) is retried with backoff rather
        # than leaving the lease, which would hold the message until the next start and
        # deliver it a second time then.
        delay, give_up = 0.25, time.monotonic() + 600.0
        while True:
            try:
                removed = await self.store.settle(
                    job.queue_id, settlements, events, notice,
                    app=job.app, campaign=job.meta.get("campaign"))
                break
            except Exception:  # noqa: BLE001 - retried; the lease stays meanwhile
                QMGR.exception("%s: cannot record delivery outcome; retrying in %.2fs",
                               job.queue_id, delay)
                if self._stopping or time.monotonic() + delay > give_up:
                    return   # the lease stays; recover() at the next start retries
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
        for level, line in lines:
            SMTP.log(level, line)
        if self.metrics is not None:
            for outcome in events:
                self.metrics.outcome(outcome.event, outcome.category)
                if outcome.event == "delivered":
                    self.metrics.delivery_latency.observe(now - job.received_at)
        for address, reply in to_suppress:
            await self._suppress(address, reply, now)
        await self._soft_bounces(soft, delivered, now)
        if notice is not None:
            BOUNCE.info("%s: sender non-delivery notification: %s", job.queue_id,
                        notice.queue_id)
            QMGR.info("%s: from=<>, size=%d, nrcpt=1 (queue active)", notice.queue_id,
                      len(notice.body))
            self.wake()
        if removed:
            QMGR.info("%s: removed", job.queue_id)


    def _notice(self, job: Job, failed: list[FailedRecipient], now: float) -> NewMessage | None:
        """The non-delivery notification to the envelope sender (RFC 3464), if any."""
        body = build_dsn(queue_id=job.queue_id, original_sender=job.sender, recipients=failed,
                         original_message=job.body, reporting_mta=self.hostname,
                         arrival_date=job.received_at, now=now, rng=self.rng)
        if body is None:   # RFC 5321 6.1: never about a message with a null reverse-path
            return None
        return NewMessage(queue_id=new_queue_id(), sender="", recipients=[job.sender],
                          body=body, received_at=now, smtputf8=not job.sender.isascii(),
                          eightbit=not body.isascii(), client="bounce", app=job.app,
                          stream="transactional", meta={"notice_for": job.queue_id})


_WARN = (Category.BLOCK, Category.CONTENT, Category.RELAY_SIDE)


def suppression_scopes(sender: str) -> tuple[str, ...]:
    """The scopes that apply to mail from `sender`: global, and its sending domain."""
    domain = domain_of(sender) if sender else ""
    return (GLOBAL, domain) if domain else (GLOBAL,)


def _failed(address: str, reply: SmtpReply, relay: str, now: float,
            default_status: str) -> FailedRecipient:
    status = reply.enhanced or default_status
    if default_status.startswith("4") and not status.startswith("4"):
        status = default_status   # an expiry reports the transient status it gave up on
    return FailedRecipient(address=address, status=status, diagnostic=str(reply),
                           remote_mta=None if relay == "none" else relay, last_attempt=now)


def _dsn(code: int) -> str:
    return f"{code // 100}.0.0"
