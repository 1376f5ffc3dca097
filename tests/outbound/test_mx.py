"""MX routing (RFC 5321 section 5, RFC 7505) and MTA-STS policies (RFC 8461), against a real
DNS server on loopback (tests/support/dns.py) and a real HTTPS server for policies."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web

from relay.config import parse_config
from relay.outbound.classify import Category, classify
from relay.outbound.mtasts import HttpsFetcher, MtaSts, Policy, PolicyError, parse_policy, parse_txt
from relay.outbound.mx import MxResolver, Route, RouteError, make_async_resolver
from tests.support.dns import LoopbackDNS, Records
from tests.support.downstream import self_signed_contexts

BASE: Records = {
    ("pref.test.", "MX"): [(20, "mx2.pref.test."), (10, "mx1.pref.test.")],
    ("mx1.pref.test.", "A"): ["127.0.0.2"],
    ("mx2.pref.test.", "A"): ["127.0.0.3"],
    ("mx2.pref.test.", "AAAA"): ["::1"],
    ("equal.test.", "MX"): [(10, "a.equal.test."), (10, "b.equal.test."), (30, "c.equal.test.")],
    ("a.equal.test.", "A"): ["127.0.0.2"],
    ("b.equal.test.", "A"): ["127.0.0.3"],
    ("c.equal.test.", "A"): ["127.0.0.4"],
    ("nomx.test.", "A"): ["127.0.0.5"],
    ("nomx6.test.", "AAAA"): ["::1"],
    ("nullmx.test.", "MX"): [(0, ".")],
    ("mixednull.test.", "MX"): [(0, "."), (10, "mx1.pref.test.")],
    ("nothing.test.", "TXT"): ["v=spf1 -all"],
    ("dangling.test.", "MX"): [(10, "gone.dangling.test.")],
}


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def dns() -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS(dict(BASE), ttl=60) as server:
        yield server


def resolver_for(dns: LoopbackDNS, **kw: object) -> MxResolver:
    return MxResolver(make_async_resolver([("127.0.0.1", dns.port)], lifetime=2.0), **kw)


def mx_queries(dns: LoopbackDNS, name: str) -> int:
    return sum(1 for q in dns.queries if q[0] == name and q[1] == "MX")


async def test_mx_hosts_in_preference_order_with_all_their_addresses(dns: LoopbackDNS) -> None:
    route = await resolver_for(dns).route("Pref.Test")
    assert route.names == ["mx1.pref.test", "mx2.pref.test"]
    assert [h.preference for h in route.hosts] == [10, 20]
    assert route.hosts[0].addresses == ("127.0.0.2",)
    assert route.hosts[1].addresses == ("127.0.0.3", "::1")   # IPv4 first, then IPv6
    assert not route.implicit


async def test_equal_preferences_are_shuffled_by_the_injected_rng(dns: LoopbackDNS) -> None:
    async def firsts(seed: int) -> list[str]:
        resolver = resolver_for(dns, rng=random.Random(seed))
        out = []
        for _ in range(30):
            route = await resolver.route("equal.test")
            assert route.names[2] == "c.equal.test"   # preference 30 always last
            out.append(route.names[0])
        return out

    seven = await firsts(7)
    assert set(seven) == {"a.equal.test", "b.equal.test"}   # both get to be first
    assert await firsts(7) == seven                          # and the seed decides
    assert mx_queries(dns, "equal.test.") == 2               # once per resolver: cached


@pytest.mark.parametrize(("domain", "address"), [("nomx.test", "127.0.0.5"),
                                                 ("nomx6.test", "::1")])
async def test_no_mx_falls_back_to_the_domains_own_address(dns: LoopbackDNS, domain: str,
                                                           address: str) -> None:
    route = await resolver_for(dns).route(domain)
    assert route.implicit   # RFC 5321 5.1: an implicit MX of preference 0
    assert route.names == [domain]
    assert route.hosts[0].addresses == (address,)


async def test_null_mx_is_a_permanent_5_1_10_that_suppresses(dns: LoopbackDNS) -> None:
    with pytest.raises(RouteError) as info:
        await resolver_for(dns).route("nullmx.test")
    reply = info.value.reply
    assert (reply.code, reply.enhanced) == (556, "5.1.10")
    verdict = classify(reply)
    assert verdict.category is Category.HARD and verdict.suppress


async def test_a_null_mx_beside_real_ones_is_skipped(dns: LoopbackDNS) -> None:
    route = await resolver_for(dns).route("mixednull.test")
    assert route.names == ["mx1.pref.test"]


@pytest.mark.parametrize(("domain", "code", "enhanced"), [
    ("nxdomain.test", 550, "5.1.2"),     # the domain does not exist
    ("nothing.test", 550, "5.4.4"),      # no MX, no address
    ("dangling.test", 451, "4.4.4"),     # an MX host without an address: maybe later
])
async def test_domains_without_a_route(dns: LoopbackDNS, domain: str, code: int,
                                       enhanced: str) -> None:
    with pytest.raises(RouteError) as info:
        await resolver_for(dns).route(domain)
    assert (info.value.reply.code, info.value.reply.enhanced) == (code, enhanced)
    assert not classify(info.value.reply).suppress   # never about the mailbox (invariant 5)


async def test_a_dns_failure_is_transient() -> None:
    async with LoopbackDNS() as server:
        port = server.port
    # Nothing answers on that port any more.
    resolver = MxResolver(make_async_resolver([("127.0.0.1", port)], lifetime=0.5))
    with pytest.raises(RouteError) as info:
        await resolver.route("pref.test")
    assert (info.value.reply.code, info.value.reply.enhanced) == (451, "4.4.3")


async def test_answers_are_cached_for_their_ttl(dns: LoopbackDNS) -> None:
    clock = Clock()
    resolver = resolver_for(dns, clock=clock)
    assert resolver.cached("pref.test") is None
    await resolver.route("pref.test")
    dns.records[("pref.test.", "MX")] = [(10, "mx2.pref.test.")]
    clock.now += 59
    assert (await resolver.route("pref.test")).names == ["mx1.pref.test", "mx2.pref.test"]
    assert mx_queries(dns, "pref.test.") == 1
    cached = resolver.cached("pref.test")
    assert isinstance(cached, Route) and cached.names == ["mx1.pref.test", "mx2.pref.test"]
    clock.now += 2   # past the TTL of 60 s
    assert (await resolver.route("pref.test")).names == ["mx2.pref.test"]
    assert mx_queries(dns, "pref.test.") == 2


async def test_cached_routes_without_waiting(dns: LoopbackDNS) -> None:
    resolver = resolver_for(dns)
    assert resolver.cached("nullmx.test") is None
    with pytest.raises(RouteError):
        await resolver.route("nullmx.test")
    assert isinstance(resolver.cached("nullmx.test"), RouteError)


def test_provider_groups_are_chosen_by_mx_suffix() -> None:
    cfg = parse_config({"outbound": {"mode": "mx", "max_connections": 7, "destination": {
        "google": {"mx_suffixes": ["google.com", "googlemail.com"], "rate": "50/s"},
        "example.org": {"max_connections": 2, "tls": "required"}}}}).outbound
    assert cfg.group_for(["mx.example.net", "alt1.aspmx.l.google.com"]).name == "google"
    assert cfg.group_for(["gmail-smtp-in.l.googlemail.com"]).name == "google"
    assert cfg.group_for(["google.com.evil.test", "notgoogle.com"]) is None
    assert cfg.destination_for("gmail.com") is None   # groups do not match by name
    entry = cfg.destination_for("lists.example.org")
    assert entry is not None and entry.name == "example.org"
    effective = cfg.effective(entry)
    assert (effective.max_connections, effective.tls, effective.max_recipients) == (
        2, "required", 100)
    assert cfg.effective(cfg.group_for(["aspmx.l.google.com"])).max_connections == 7


# --- MTA-STS --------------------------------------------------------------------------

@pytest.mark.parametrize(("records", "policy_id"), [
    (["v=STSv1; id=20240101T000000;"], "20240101T000000"),
    (["v=STSv1;id=abc"], "abc"),
    (["v=spf1 -all", "v=STSv1; id=x1;"], "x1"),
    (["v=STSv1; id=a;", "v=STSv1; id=b;"], None),      # two: none (RFC 8461 3.1)
    (["v=STSv1;"], None),                               # no id
    (["v=STSv1; id=has-dash;"], None),                  # id: 1-32 alphanumerics
    (["v=STSv10; id=a"], None),
    ([], None),
])
def test_txt_records(records: list[str], policy_id: str | None) -> None:
    assert parse_txt(records) == policy_id


GOOD_POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mx1.example.test\r\nmx: *.mx.example.test\r\n" \
              "max_age: 86400\r\n"


def test_policy_file() -> None:
    policy = parse_policy(GOOD_POLICY)
    assert policy == Policy("enforce", ("mx1.example.test", "*.mx.example.test"), 86400)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 9999999999\n").max_age == 31557600


@pytest.mark.parametrize("text", [
    "mode: enforce\nmx: a.test\nmax_age: 1\n",                       # no version
    "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",        # bad mode
    "version: STSv1\nmode: enforce\nmax_age: 1\n",                   # no mx
    "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: soon\n",    # bad max_age
    "version: STSv1\nmode: enforce\nmx: a..test\nmax_age: 1\n",      # bad pattern
    "<html>not a policy</html>",
])
def test_bad_policy_files(text: str) -> None:
    with pytest.raises(PolicyError):
        parse_policy(text)


@pytest.mark.parametrize(("host", "allowed"), [
    ("mx1.example.test", True),
    ("MX1.Example.Test.", True),
    ("a.mx.example.test", True),
    ("mx.example.test", False),          # a wildcard needs one more label (RFC 8461 4.1)
    ("a.b.mx.example.test", False),      # ... and only one
    ("mx2.example.test", False),
])
def test_mx_pattern_matching(host: str, allowed: bool) -> None:
    assert parse_policy(GOOD_POLICY).allows(host) is allowed


class Fetches:
    def __init__(self, text: str = GOOD_POLICY):
        self.text = text
        self.calls: list[str] = []
        self.fail = False

    async def __call__(self, domain: str) -> str:
        self.calls.append(domain)
        if self.fail:
            raise OSError("connection refused")
        return self.text


async def test_policies_are_cached_by_max_age_and_refetched_on_a_new_id(
        dns: LoopbackDNS) -> None:
    dns.records[("_mta-sts.example.test.", "TXT")] = ["v=STSv1; id=one;"]
    clock = Clock()
    fetch = Fetches(GOOD_POLICY.replace("86400", "3600"))
    sts = MtaSts(resolver_for(dns, clock=clock), fetch=fetch, clock=clock)
    policy = await sts.policy("example.test")
    assert policy is not None and policy.mode == "enforce" and policy.id == "one"
    clock.now += 61                       # the TXT record is asked again: same id
    assert await sts.policy("example.test") == policy
    assert fetch.calls == ["example.test"]
    dns.records[("_mta-sts.example.test.", "TXT")] = ["v=STSv1; id=two;"]
    clock.now += 61
    assert (await sts.policy("example.test")).id == "two"           # RFC 8461 5.1
    assert len(fetch.calls) == 2
    del dns.records[("_mta-sts.example.test.", "TXT")]
    clock.now += 61
    assert (await sts.policy("example.test")).id == "two"   # still in force without TXT
    clock.now += 3600
    assert await sts.policy("example.test") is None         # max_age is over


async def test_a_policy_that_cannot_be_fetched_is_no_policy(dns: LoopbackDNS) -> None:
    dns.records[("_mta-sts.example.test.", "TXT")] = ["v=STSv1; id=one;"]
    fetch = Fetches()
    fetch.fail = True
    sts = MtaSts(resolver_for(dns), fetch=fetch)
    assert await sts.policy("example.test") is None
    assert await sts.policy("example.test") is None
    assert len(fetch.calls) == 1    # not tried again for every message
    assert await sts.policy("pref.test") is None   # no TXT record: no policy, no fetch
    assert len(fetch.calls) == 1


@pytest_asyncio.fixture
async def policy_server() -> AsyncIterator[tuple[str, ssl.SSLContext]]:
    """An HTTPS server on localhost serving policies; yields its URL template and a client
    context that trusts its certificate."""
    server_ctx, client_ctx = self_signed_contexts("localhost")

    async def policy(request: web.Request) -> web.StreamResponse:
        domain = request.match_info["domain"]
        if domain == "moved.test":
            raise web.HTTPFound("https://localhost/elsewhere")
        if domain == "html.test":
            return web.Response(text=GOOD_POLICY, content_type="text/html")
        if domain == "big.test":
            return web.Response(text="x" * 70000, content_type="text/plain")
        return web.Response(text=GOOD_POLICY, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/{domain}/.well-known/mta-sts.txt", policy)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"https://localhost:{port}/{{domain}}/.well-known/mta-sts.txt", client_ctx
    finally:
        await runner.cleanup()


async def test_policy_fetched_over_verified_https(policy_server) -> None:
    url, ctx = policy_server
    fetcher = HttpsFetcher(url=url, ssl_context=ctx, timeout=5)
    try:
        assert parse_policy(await fetcher("example.test")).mode == "enforce"
        for domain in ("moved.test", "html.test", "big.test"):   # RFC 8461 3.3
            with pytest.raises(PolicyError):
                await fetcher(domain)
    finally:
        await fetcher.close()
    untrusting = HttpsFetcher(url=url, timeout=5)   # the system's CAs do not know it
    try:
        with pytest.raises(Exception, match="(?i)certificate"):
            await untrusting("example.test")
    finally:
        await untrusting.close()
