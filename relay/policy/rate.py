"""Rate limits at the edge (aiolimiter leaky buckets), per app and per client IP.

Going over is answered with 451 4.7.1 and a hint, never a silent drop and never a wait:
the edge only asks `has_capacity` and takes capacity that is there.
"""

from __future__ import annotations

from collections import OrderedDict

from aiolimiter import AsyncLimiter

_UNITS = (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1))


def describe(rate: tuple[float, float]) -> str:
    """(100, 60) -> "100 per minute"; (5, 600) -> "5 per 10 minute(s)"."""
    count, period = rate
    for name, size in _UNITS:
        if period >= size and period % size == 0:
            n = int(period // size)
            return f"{count:g} per {name}" if n == 1 else f"{count:g} per {n} {name}s"
    return f"{count:g} per {period:g} seconds"


class KeyedLimits:
    """One leaky bucket per key (an app name or a client IP), bounded in number."""

    def __init__(self, rate: tuple[float, float] | None, max_keys: int = 65536):
        self.rate = rate
        self.max_keys = max_keys
        self._limiters: OrderedDict[str, AsyncLimiter] = OrderedDict()

    def _limiter(self, key: str) -> AsyncLimiter:
        assert self.rate is not None
        limiter = self._limiters.pop(key, None)
        if limiter is None:
            limiter = AsyncLimiter(self.rate[0], self.rate[1])
        self._limiters[key] = limiter
        while len(self._limiters) > self.max_keys:
            self._limiters.popitem(last=False)
        return limiter

    def has_capacity(self, key: str, amount: float = 1) -> bool:
        if self.rate is None:
            return True
        return self._limiter(key).has_capacity(amount)

    async def take(self, key: str, amount: float = 1) -> bool:
        """Take `amount` if it is there now; False (and nothing taken) if not."""
        if self.rate is None:
            return True
        limiter = self._limiter(key)
        if not limiter.has_capacity(amount):
            return False
        await limiter.acquire(amount)   # has capacity: does not wait
        return True
