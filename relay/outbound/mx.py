"""MX routing for direct delivery (RFC 5321 section 5), with dnspython's async resolver.

`MxResolver.route(domain)` gives the hosts to try for a recipient domain, in order:

- the MX records by preference, lowest first; hosts of equal preference in random order
  (RFC 5321 5.1: "MUST randomize them to spread the load"), the randomness injectable;
- no MX record: the domain itself, as an implicit MX of preference 0 (RFC 5321 5.1);
- a null MX ("0 .", RFC 7505 3) is a permanent failure, 5.1.10: the domain accepts no mail;
- each host's IPv4 addresses, then its IPv6 ones (RFC 5321 5.1: try every address).

Answers are cached for their TTL (the clock is injectable); negative answers for
`negative_ttl`; a failed lookup (time-out, SERVFAIL) for a few seconds only, so a burst of
mail to a domain whose DNS is down does not ask again for every message. Concurrent lookups
of one name share one query.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.rdatatype
import dns.resolver

from relay import replies
from relay.dnsconf import configured
from relay.outbound.classify import SmtpReply, from_catalogue


@dataclass(frozen=True)
class MxHost:
    """One mail exchanger of a domain."""

    name: str                     # lower case, without the trailing dot
    preference: int
    addresses: tuple[str, ...]    # IPv4 first, then IPv6


@dataclass(frozen=True)
class Route:
    """Where mail for `domain` goes: `hosts` in the order to try them."""

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False        # no MX: the domain's own address records (RFC 5321 5.1)

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]


class RouteError(Exception):
    """No route for a domain; `reply` is what its recipients get (5xx: bounce, 4xx: retry)."""

    def __init__(self, reply: SmtpReply):
        super().__init__(str(reply))
        self.reply = reply


def make_async_resolver(nameservers: Sequence[tuple[str, int]],
                        lifetime: float = 10.0) -> dns.asyncresolver.Resolver:
    """An async dnspython resolver asking exactly `nameservers` ((host, port) pairs, from
    [dns].nameservers), or the system's (/etc/resolv.conf) when there are none."""
    return configured(dns.asyncresolver.Resolver, nameservers, lifetime)


@dataclass
class Answer:
    """One cached DNS answer."""

    kind: str                     # "ok" | "nxdomain" | "nodata" | "error"
    records: tuple[Any, ...]      # MX: (preference, exchange); A/AAAA: address text
    expires: float
    detail: str = ""


class MxResolver:
    def __init__(self, resolver: dns.asyncresolver.Resolver, *,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, negative_ttl: float = 60.0,
                 error_ttl: float = 2.0, max_ttl: float = 86400.0, max_hosts: int = 10,
                 max_entries: int = 100_000):
        self.resolver = resolver
        self.clock = clock
        self.rng = rng or random.Random()
        self.negative_ttl = negative_ttl
        self.error_ttl = error_ttl
        self.max_ttl = max_ttl
        self.max_hosts = max_hosts    # MX hosts looked at, at most (a bound on the work)
        self.max_entries = max_entries
        self._cache: dict[tuple[str, str], Answer] = {}
        self._inflight: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._prefetching: set[str] = set()

    # -- routes ------------------------------------------------------------------------

    async def route(self, domain: str) -> Route:
        """The hosts to try for `domain`, in order; raises RouteError when there are none."""
        domain = domain.lower().rstrip(".")
        mx = await self.lookup(domain, "MX")
        names = self._exchanges(domain, mx)
        found = await asyncio.gather(*(self._addresses(name) for name in names))
        return self._route(domain, mx, dict(zip(names, found, strict=True)))

    def cached(self, domain: str) -> Route | RouteError | None:
        """The route from the cache alone, expired answers included (None when an answer
        is missing): for pacing decisions, which must not wait for DNS."""
        domain = domain.lower().rstrip(".")
        mx = self._cache.get((domain, "MX"))
        if mx is None:
            return None
        addresses: dict[str, tuple[tuple[str, ...], str]] = {}
        for name in self._exchanges(domain, mx):
            a, aaaa = self._cache.get((name, "A")), self._cache.get((name, "AAAA"))
            if a is None or aaaa is None:
                return None
            addresses[name] = _join(a, aaaa)
        try:
            return self._route(domain, mx, addresses)
        except RouteError as exc:
            return exc

    def _exchanges(self, domain: str, mx: Answer) -> list[str]:
        """The names whose addresses the route needs."""
        if mx.kind == "nodata":
            return [domain]   # RFC 5321 5.1: no MX, the domain is its own implicit MX
        if mx.kind != "ok":
            return []
        names = []
        for _pref, exchange in sorted(mx.records):
            if exchange and exchange not in names:
                names.append(exchange)
        return names[:self.max_hosts]

    def _route(self, domain: str, mx: Answer,
               addresses: dict[str, tuple[tuple[str, ...], str]]) -> Route:
        if mx.kind == "nxdomain":
            raise RouteError(from_catalogue(replies.R550_NO_SUCH_DOMAIN, domain=domain))
        if mx.kind == "error":
            raise RouteError(from_catalogue(replies.R451_DNS_FAILED, name=domain,
                                            rdtype="MX", detail=mx.detail))
        if mx.kind == "nodata":
            addrs, error = addresses[domain]
            if not addrs:
                if error:
                    raise RouteError(from_catalogue(replies.R451_DNS_FAILED, name=domain,
                                                    rdtype="A/AAAA", detail=error))
                raise RouteError(from_catalogue(replies.R550_NO_MAIL_HOST, domain=domain))
            return Route(domain, (MxHost(domain, 0, addrs),), implicit=True)
        records = list(mx.records)
        # RFC 7505 3: a single MX record "0 ." says the domain accepts no mail at all.
        if len(records) == 1 and records[0][1] == "":
            raise RouteError(from_catalogue(replies.R556_NULL_MX, domain=domain))
        # RFC 7505 3 forbids a null MX beside others; such a "." is no host: skip it.
        records = [r for r in records if r[1]]
        by_pref: dict[int, list[str]] = {}
        for pref, exchange in records:
            if exchange not in by_pref.setdefault(pref, []):
                by_pref[pref].append(exchange)
        hosts: list[MxHost] = []
        errors: list[str] = []
        for pref in sorted(by_pref):
            names = sorted(by_pref[pref])
            # RFC 5321 5.1: equal preferences in random order, to spread the load.
            self.rng.shuffle(names)
            for name in names:
                if name not in addresses:
                    continue   # beyond max_hosts
                addrs, error = addresses[name]
                if addrs:
                    hosts.append(MxHost(name, pref, addrs))
                elif error:
                    errors.append(f"{name}: {error}")
                else:
                    errors.append(f"{name}: no address record")
        if not hosts:
            raise RouteError(from_catalogue(replies.R451_NO_MX_ADDRESS, domain=domain,
                                            detail="; ".join(errors) or "no MX host"))
        return Route(domain, tuple(hosts))

    async def _addresses(self, name: str) -> tuple[tuple[str, ...], str]:
        """(addresses, error): IPv4 first, then IPv6; the error of a failed lookup."""
        a, aaaa = await asyncio.gather(self.lookup(name, "A"), self.lookup(name, "AAAA"))
        return _join(a, aaaa)

    # -- the cache ---------------------------------------------------------------------

    async def lookup(self, name: str, rdtype: str) -> Answer:
        """The answer for (name, rdtype) (MX, A, AAAA, TXT), from the cache while its TTL
        lasts; a failed lookup is an answer of kind "error", never an exception."""
        name = name.lower().rstrip(".")
        key = (name, rdtype)
        cached = self._cache.get(key)
        if cached is not None and cached.expires > self.clock():
            return cached
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._query(name, rdtype))
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # shield: a cancelled delivery must not cancel the lookup others wait for
        return await asyncio.shield(task)

    async def _query(self, name: str, rdtype: str) -> Answer:
        now = self.clock()
        try:
            answer = await self.resolver.resolve(name + ".", rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            result = Answer("nxdomain", (), now + self.negative_ttl)
        except dns.resolver.NoAnswer:
            result = Answer("nodata", (), now + self.negative_ttl)
        except (dns.exception.DNSException, OSError) as exc:
            detail = type(exc).__name__
            text = str(exc).splitlines()[0] if str(exc) else ""
            result = Answer("error", (), now + self.error_ttl,
                             f"{detail}: {text}" if text else detail)
        else:
            ttl = min(float(answer.rrset.ttl if answer.rrset is not None else 0), self.max_ttl)
            if rdtype == "MX":
                # The root name "." (a null MX, RFC 7505) becomes "".
                records: tuple[Any, ...] = tuple(
                    (int(r.preference), r.exchange.to_text().lower().rstrip("."))
                    for r in answer)
            elif rdtype == "TXT":
                # RFC 1035 3.3.14 / RFC 7208 3.3: the character-strings of one record join.
                records = tuple(b"".join(r.strings).decode("utf-8", "replace")
                                for r in answer)
            else:
                records = tuple(r.to_text() for r in answer)
            result = Answer("ok", records, now + ttl)
        self._store((name, rdtype), result)
        return result

    def _store(self, key: tuple[str, str], answer: Answer) -> None:
        """Cache an answer; past `max_entries`, expired ones go, then the oldest half."""
        if len(self._cache) >= self.max_entries:
            now = self.clock()
            for old in [k for k, a in self._cache.items() if a.expires <= now]:
                del self._cache[old]
            if len(self._cache) >= self.max_entries:
                for old in list(self._cache)[:len(self._cache) // 2]:
                    del self._cache[old]
        self._cache[key] = answer

    def prefetch(self, domain: str) -> None:
        """Start looking up `domain`'s route in the background (for `cached`)."""
        domain = domain.lower().rstrip(".")
        if domain in self._prefetching:
            return
        self._prefetching.add(domain)

        async def run() -> None:
            try:
                with contextlib.suppress(Exception):
                    await self.route(domain)
            finally:
                self._prefetching.discard(domain)

        task = asyncio.get_running_loop().create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Cancel background lookups."""
        tasks = list(self._background) + list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _join(a: Answer, aaaa: Answer) -> tuple[tuple[str, ...], str]:
    addrs = (a.records if a.kind == "ok" else ()) + (aaaa.records if aaaa.kind == "ok" else ())
    errors = [x.detail for x in (a, aaaa) if x.kind == "error"]
    return tuple(addrs), "; ".join(errors)
