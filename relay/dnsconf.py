"""dnspython resolvers that ask exactly [dns].nameservers, or the system's when empty."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import dns.asyncresolver
import dns.nameserver
import dns.resolver

R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def configured(cls: type[R], nameservers: Sequence[tuple[str, int]], lifetime: float) -> R:
    """A resolver of `cls` asking `nameservers` ((host, port) pairs), or the system's
    (/etc/resolv.conf) when there are none; `lifetime` bounds each query."""
    if not nameservers:
        res = cls()
    else:
        res = cls(configure=False)
        res.nameservers = [dns.nameserver.Do53Nameserver(host, port)
                           for host, port in nameservers]
    res.lifetime = lifetime
    res.timeout = lifetime
    return res
