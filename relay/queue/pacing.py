"""Outbound pacing per destination ([outbound.destination."gmail.com"]).

A burst for a paced destination is queued and spread out, never refused: each job gets the
next free slot of its destination's rate. A job whose slot is close waits in memory; one
whose slot is further off goes back to the queue, due at its slot, without counting as an
attempt. At most `max_connections` deliveries to one destination run at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from relay.address import domain_of
from relay.config import DestinationConfig
from relay.queue import Job


@dataclass
class _Lane:
    dest: DestinationConfig
    next_slot: float = 0.0
    slots: asyncio.Semaphore | None = None


@dataclass
class Paced:
    job: Job
    lane: _Lane | None = None
    start_at: float = 0.0                 # when the delivery may start
    requeue: bool = False                 # too far off: back to the queue, due at start_at
    extra: list[Job] = field(default_factory=list)


class Pacer:
    def __init__(self, destination_for: Callable[[str], DestinationConfig | None],
                 *, hold: float = 1.0):
        self.destination_for = destination_for
        self.hold = hold                  # wait in memory for slots at most this far off
        self._lanes: dict[str, _Lane] = {}

    def _lane(self, dest: DestinationConfig) -> _Lane:
        lane = self._lanes.get(dest.name)
        if lane is None or lane.dest != dest:
            slots = asyncio.Semaphore(dest.max_connections) if dest.max_connections else None
            lane = _Lane(dest, slots=slots)
            self._lanes[dest.name] = lane
        return lane

    def split(self, job: Job) -> list[Job]:
        """One job per paced destination among its recipients; the unpaced ones together."""
        groups: dict[str | None, list] = {}
        for rcpt in job.recipients:
            dest = self.destination_for(domain_of(rcpt.address))
            groups.setdefault(dest.name if dest else None, []).append(rcpt)
        if len(groups) == 1:
            return [job]
        return [Job(job.queue_id, job.sender, job.body, job.received_at, job.smtputf8,
                    job.eightbit, rcpts, job.app, job.stream, job.meta)
                for rcpts in groups.values()]

    def plan(self, job: Job, now: float) -> Paced:
        """Give a single-destination job its slot."""
        dest = self.destination_for(domain_of(job.recipients[0].address))
        if dest is None or (dest.rate is None and dest.max_connections is None):
            return Paced(job)
        lane = self._lane(dest)
        if dest.rate is None:
            return Paced(job, lane, now)
        count, period = dest.rate
        start = max(now, lane.next_slot)
        if start - now > self.hold:
            # Keep the slot for it, so requeued jobs come back spread out at the rate.
            lane.next_slot = start + len(job.recipients) * period / count
            return Paced(job, lane, start, requeue=True)
        lane.next_slot = start + len(job.recipients) * period / count
        return Paced(job, lane, start)
