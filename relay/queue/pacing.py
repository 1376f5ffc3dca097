"""Outbound pacing per destination ([outbound.destination."gmail.com"]), and its adaptation.

A burst for a paced destination is queued and spread out, never refused: each job gets the
next free slot of its destination's rate. A job whose slot is close waits in memory; one
whose slot is further off goes back to the queue, due at its slot, without counting as an
attempt. At most `max_connections` deliveries to one destination run at once.

Direct delivery (mode = "mx") adapts these limits to what the destination says:

- Throttling. A reply the classifier calls rate-limited halves the destination's rate and
  its connections; after each `cooldown` without a new signal they double again, one step
  at a time, back to the configured values. A destination without a configured rate gets
  the rate observed just before the first signal as its starting point.
- Circuit breaker. `pause_after` connection failures in a row (every MX host refused or
  greeted with 4xx) pause the destination for `pause_for` (doubling, up to 8 times, while
  it stays dead): its mail waits in the queue, not counted as attempts, instead of
  hammering a host that is down. After the pause a single connection probes it; one that
  works resumes full service, one that fails pauses it again.

Throttled and paused destinations are logged, and written to a small JSON file beside the
queue (`state_path`) that `relay queue list` reads (`describe_states`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from relay.address import domain_of
from relay.config import DestinationConfig
from relay.log import QMGR
from relay.queue import Job


class _Pending:
    def __repr__(self) -> str:
        return "PENDING"


Pending = _Pending
PENDING: Final = _Pending()
"""What a `destination_for` returns while it cannot tell yet (the domain's MX lookup is in
flight): the job goes back to the queue for a moment, not counted as an attempt."""

DestinationFor = Callable[[str], DestinationConfig | _Pending | None]

MAX_LEVEL = 6              # throttled at most to 1/64 of the configured rate
LEARN_WINDOW = 10.0        # seconds of recent starts that give an unrated destination a rate


class Slots:
    """A semaphore whose limit may change while it is held (`async with slots:`).

    Lowering the limit never interrupts a delivery in flight; it only makes the next ones
    wait until fewer than the new limit run."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.used = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def set_limit(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._wake()

    def _wake(self) -> None:
        free = self.limit - self.used
        for waiter in list(self._waiters):
            if free <= 0:
                break
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    async def __aenter__(self) -> None:
        while self.used >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter.done() and not waiter.cancelled():
                    self._wake()   # pass the wake-up on to the next waiter
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        self.used += 1

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.used -= 1
        self._wake()


@dataclass
class _Lane:
    dest: DestinationConfig
    next_slot: float = 0.0
    slots: Slots | None = None
    # adaptation (direct delivery)
    level: int = 0                       # rate and connections divided by 2**level
    next_step: float = 0.0               # when the level goes down by one
    last_throttle: float = -math.inf
    learned: tuple[float, float] | None = None   # the starting rate of an unrated destination
    failures: int = 0                    # connection failures in a row
    pauses: int = 0                      # pauses in a row (each one twice as long)
    paused_until: float = 0.0
    reason: str = ""
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=256))

    def rate(self) -> tuple[float, float] | None:
        """The rate now: configured (or learned) and divided by 2**level."""
        base = self.dest.rate or self.learned
        if base is None:
            return None
        count, period = base
        return count / (2 ** self.level), period

    def connections(self, pause_after: int) -> int | None:
        if self.dest.max_connections is None:
            return None
        if self.failures >= pause_after:
            return 1   # half-open: one probe at a time after a pause
        return max(1, self.dest.max_connections >> self.level)


@dataclass
class Paced:
    job: Job
    lane: _Lane | None = None
    start_at: float = 0.0                 # when the delivery may start
    requeue: bool = False                 # too far off: back to the queue, due at start_at
    extra: list[Job] = field(default_factory=list)


class Pacer:
    def __init__(self, destination_for: DestinationFor, *, hold: float = 1.0,
                 split_by_domain: bool = False, cooldown: float = 300.0,
                 pause_after: int = 5, pause_for: float = 300.0,
                 pending_delay: float = 0.1, state_file: Path | None = None):
        self.destination_for = destination_for
        self.hold = hold                  # wait in memory for slots at most this far off
        self.split_by_domain = split_by_domain
        self.cooldown = cooldown
        self.pause_after = pause_after
        self.pause_for = pause_for
        self.pending_delay = pending_delay
        self.state_file = state_file
        # Signals within this long of a halving come from deliveries that started at the
        # old rate: they are the same signal, not a new one.
        self.settle = min(2.0, cooldown / 2)
        self._lanes: dict[str, _Lane] = {}

    def lane(self, dest: DestinationConfig) -> _Lane:
        """The lane of a destination (made on first use; a changed entry starts afresh)."""
        lane = self._lanes.get(dest.name)
        if lane is None or lane.dest != dest:
            slots = Slots(dest.max_connections) if dest.max_connections else None
            lane = _Lane(dest, slots=slots)
            self._lanes[dest.name] = lane
        return lane

    def split(self, job: Job) -> list[Job]:
        """One job per paced destination among its recipients; the unpaced ones together.
        With `split_by_domain` (direct delivery), one job per recipient domain: each domain
        has its own MX hosts, so its own transaction."""
        groups: dict[str | None, list] = {}
        for rcpt in job.recipients:
            domain = domain_of(rcpt.address)
            if self.split_by_domain:
                key: str | None = domain.lower()
            else:
                dest = self.destination_for(domain)
                key = dest.name if isinstance(dest, DestinationConfig) else None
            groups.setdefault(key, []).append(rcpt)
        if len(groups) == 1:
            return [job]
        return [Job(job.queue_id, job.sender, job.body, job.received_at, job.smtputf8,
                    job.eightbit, rcpts, job.app, job.stream, job.meta)
                for rcpts in groups.values()]

    def plan(self, job: Job, now: float) -> Paced:
        """Give a single-destination job its slot."""
        dest = self.destination_for(domain_of(job.recipients[0].address))
        if dest is PENDING:
            return Paced(job, None, now + self.pending_delay, requeue=True)
        if not isinstance(dest, DestinationConfig) or (
                dest.rate is None and dest.max_connections is None):
            return Paced(job)
        lane = self.lane(dest)
        self._recover(lane, now)
        if lane.paused_until > now:
            # The circuit is open: wait in the queue, not counted as an attempt.
            return Paced(job, lane, lane.paused_until, requeue=True)
        lane.recent.append(now)
        rate = lane.rate()
        if rate is None:
            return Paced(job, lane, now)
        count, period = rate
        start = max(now, lane.next_slot)
        if start - now > self.hold:
            # Keep the slot for it, so requeued jobs come back spread out at the rate.
            lane.next_slot = start + len(job.recipients) * period / count
            return Paced(job, lane, start, requeue=True)
        lane.next_slot = start + len(job.recipients) * period / count
        return Paced(job, lane, start)

    # -- adaptation --------------------------------------------------------------------

    def throttle(self, dest: DestinationConfig, now: float, reason: str) -> bool:
        """A rate-limited reply from `dest`: halve its rate and connections. False when the
        signal is folded into the last one (or the floor is reached)."""
        lane = self.lane(dest)
        self._recover(lane, now)
        if now - lane.last_throttle < self.settle:
            return False
        lane.last_throttle = now
        lane.next_step = now + self.cooldown
        if lane.level >= MAX_LEVEL:
            return False
        before_rate, before_conns = lane.rate(), lane.connections(self.pause_after)
        if lane.level == 0 and dest.rate is None:
            recent = [t for t in lane.recent if now - t <= LEARN_WINDOW]
            lane.learned = (float(max(len(recent), 1)), LEARN_WINDOW)
        lane.level += 1
        lane.reason = reason
        # The next slot was given at the old rate; the new one starts from now.
        lane.next_slot = max(lane.next_slot, now)
        self._apply(lane)
        QMGR.warning("%s: destination throttled (%s): rate %s -> %s, connections %s -> %s, "
                     "one step back up every %s", dest.name, reason, _rate_text(before_rate),
                     _rate_text(lane.rate()), before_conns or "-",
                     lane.connections(self.pause_after) or "-", _duration(self.cooldown))
        self._save(now)
        return True

    def connection_failed(self, dest: DestinationConfig, now: float, reason: str) -> None:
        """Every host of `dest` failed to give us a session (refused, timed out, 4xx
        greeting): count it; `pause_after` in a row open the circuit."""
        lane = self.lane(dest)
        lane.failures += 1
        lane.reason = reason
        if lane.failures < self.pause_after or lane.paused_until > now:
            return
        lane.pauses += 1
        pause = self.pause_for * 2 ** min(lane.pauses - 1, 3)
        lane.paused_until = now + pause
        self._apply(lane)
        QMGR.warning("%s: destination paused for %s after %d connection failures in a row "
                     "(%s)", dest.name, _duration(pause), lane.failures, reason)
        self._save(now)

    def connection_ok(self, dest: DestinationConfig, now: float) -> None:
        """A session with `dest` was opened: the circuit closes."""
        lane = self._lanes.get(dest.name)
        if lane is None or not (lane.failures or lane.pauses):
            return
        was_paused = lane.pauses > 0
        lane.failures = lane.pauses = 0
        lane.paused_until = 0.0
        self._apply(lane)
        if was_paused:
            QMGR.info("%s: destination resumed: a connection succeeded", dest.name)
            self._save(now)

    def paused_until(self, dest: DestinationConfig, now: float) -> float:
        """When the pause of `dest` ends, or 0.0 if it is not paused."""
        lane = self._lanes.get(dest.name)
        if lane is None or lane.paused_until <= now:
            return 0.0
        return lane.paused_until

    def _recover(self, lane: _Lane, now: float) -> None:
        """One step back up (rate and connections doubled) per cool-down."""
        changed = False
        while lane.level > 0 and now >= lane.next_step:
            lane.level -= 1
            lane.next_step += self.cooldown
            changed = True
        if not changed:
            return
        if lane.level == 0:
            lane.learned = None
        self._apply(lane)
        QMGR.info("%s: destination %s: rate %s, connections %s", lane.dest.name,
                  "recovered" if lane.level == 0 else "recovering",
                  _rate_text(lane.rate()), lane.connections(self.pause_after) or "-")
        self._save(now)

    def _apply(self, lane: _Lane) -> None:
        limit = lane.connections(self.pause_after)
        if lane.slots is not None and limit is not None:
            lane.slots.set_limit(limit)

    # -- state for `relay queue list` ---------------------------------------------------

    def states(self, now: float) -> list[dict[str, Any]]:
        """Throttled and paused destinations, as `relay queue list` shows them."""
        out = []
        for lane in self._lanes.values():
            if lane.paused_until > now:
                out.append({"name": lane.dest.name, "state": "paused",
                            "until": lane.paused_until, "failures": lane.failures,
                            "reason": lane.reason})
            elif lane.level > 0:
                base = lane.dest.rate or lane.learned
                out.append({"name": lane.dest.name, "state": "throttled", "level": lane.level,
                            "next_step": lane.next_step, "cooldown": self.cooldown,
                            "base_rate": list(base) if base else None,
                            "base_connections": lane.dest.max_connections,
                            "reason": lane.reason})
        return out

    def _save(self, now: float) -> None:
        if self.state_file is None:
            return
        data = {"written": now, "destinations": self.states(now)}
        tmp = self.state_file.with_name(self.state_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
            os.replace(tmp, self.state_file)
        except OSError as exc:
            QMGR.warning("cannot write destination state to %s: %s", self.state_file, exc)

    def close(self) -> None:
        """Forget the state file: nothing is throttled or paused once the relay stops."""
        if self.state_file is not None:
            with contextlib.suppress(OSError):
                self.state_file.unlink()


def state_path(queue_path: Path) -> Path:
    """Where the running relay writes its destination state (beside the queue database)."""
    return queue_path.with_name(queue_path.name + ".destinations.json")


def describe_states(path: Path, now: float | None = None) -> list[str]:
    """One line per destination that is throttled or paused now, from the state file."""
    now = time.time() if now is None else now
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        entries = list(data["destinations"])
    except (OSError, ValueError, KeyError, TypeError):
        return []
    lines = []
    for e in entries:
        try:
            if e["state"] == "paused" and e["until"] > now:
                lines.append(f"{e['name']}: paused until {_when(e['until'])} after "
                             f"{e['failures']} connection failures ({e['reason']})")
            elif e["state"] == "throttled":
                level = e["level"]
                if now >= e["next_step"]:
                    level -= 1 + int((now - e["next_step"]) // e["cooldown"])
                if level <= 0:
                    continue
                rate = None
                if e["base_rate"]:
                    count, period = e["base_rate"]
                    rate = (count / 2 ** level, period)
                conns = e["base_connections"]
                conn_text = (f", {max(1, conns >> level)} of {conns} connections"
                             if conns else "")
                lines.append(f"{e['name']}: throttled, rate {_rate_text(rate)}{conn_text}, "
                             f"1/{2 ** level} of normal ({e['reason']})")
        except (KeyError, TypeError, ValueError):
            continue
    return lines


def _rate_text(rate: tuple[float, float] | None) -> str:
    if rate is None:
        return "unlimited"
    count, period = rate
    if period == 1:
        return f"{count:g}/s"
    return f"{count:g}/{period:g}s"


def _duration(seconds: float) -> str:
    for unit, size in (("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))
