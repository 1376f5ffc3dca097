"""Is a report trusted? VERP, DKIM and SPF against a real DNS server on 127.0.0.1 (no DNS
stand-in): keys made at run time, published in the loopback zone, fetched by dkimpy and
pyspf over the network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import authres
import dns.resolver
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization

from relay.outbound.dkim import DkimKey, Signer, generate_private_key, normalize_line_endings
from relay.suppression.reports import parse_report
from relay.suppression.trust import (
    Assessment,
    assess,
    organizational_domain,
    same_organization,
)
from tests.support.dns import LoopbackDNS, Records, resolver

REPORTS = Path(__file__).resolve().parents[1] / "data" / "reports"
AUTHSERV = "relay.example.test"
T0 = 1_780_000_000.0   # a past instant: verifiers refuse t= in the future


def _pem(key: object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@pytest.fixture(scope="module")
def keys() -> dict[str, DkimKey]:
    """example.net's reporting keys (RSA and Ed25519) and a stranger's (example.org)."""
    return {
        "rsa": DkimKey.from_pem("example.net", "fbl1", _pem(generate_private_key("rsa"))),
        "ed": DkimKey.from_pem("example.net", "fbl2", _pem(generate_private_key("ed25519"))),
        "other": DkimKey.from_pem("example.org", "s1", _pem(generate_private_key("ed25519"))),
        # Same selector and domain as "ed" but not published: a forged signature.
        "forged": DkimKey.from_pem("example.net", "fbl2", _pem(generate_private_key("ed25519"))),
    }


def zone(keys: dict[str, DkimKey]) -> Records:
    records: Records = {(k.dns_name, "TXT"): [k.txt_record()]
                        for name, k in keys.items() if name != "forged"}
    records[("example.net.", "TXT")] = ["v=spf1 ip4:192.0.2.0/24 -all"]
    records[("mx.example.net.", "TXT")] = ["v=spf1 ip4:192.0.2.0/24 -all"]
    records[("mx.example.net.", "A")] = ["192.0.2.25"]
    records[("example.org.", "TXT")] = ["v=spf1 ip4:198.51.100.0/24 -all"]
    return records


@pytest_asyncio.fixture
async def dns_server(keys: dict[str, DkimKey]) -> AsyncIterator[LoopbackDNS]:
    async with LoopbackDNS(zone(keys)) as server:
        yield server


def dns_txt(port: int) -> Callable[[str], list[bytes]]:
    """TXT records from the loopback server, as the lead's wiring will supply them."""
    res = resolver(port)

    def txt(name: str) -> list[bytes]:
        try:
            answer = res.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [b"".join(r.strings) for r in answer]  # type: ignore[attr-defined]

    return txt


def postfix_dsn() -> bytes:
    """The Postfix sample, From mx.example.net, in wire form (CRLF)."""
    return normalize_line_endings((REPORTS / "postfix-dsn.eml").read_bytes())


def signed(key: DkimKey, message: bytes | None = None) -> bytes:
    return Signer([key], clock=lambda: T0).sign(message or postfix_dsn(),
                                                fallback_domain=key.domain)


async def run(port: int, message: bytes, *, client_ip: str = "203.0.113.9",
              helo: str = "mx.example.net", mail_from: str = "",
              reporting_domain: str = "mx.example.net", verp_ok: bool = False,
              with_txt: bool = True) -> Assessment:
    return await assess(message, client_ip=client_ip, helo=helo, mail_from=mail_from,
                        reporting_domain=reporting_domain, verp_ok=verp_ok,
                        dns_txt=dns_txt(port) if with_txt else None,
                        resolver_nameservers=[("127.0.0.1", port)], authserv_id=AUTHSERV)


def parsed(assessment: Assessment) -> dict[str, list[authres.BaseAuthenticationResult]]:
    """The Authentication-Results field parsed back with authres, results by method."""
    header = authres.parse(assessment.authres_header)
    assert header.authserv_id == AUTHSERV
    out: dict[str, list[authres.BaseAuthenticationResult]] = {}
    for result in header.results:
        out.setdefault(result.method, []).append(result)
    return out


# --- DKIM ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("key_name", ["rsa", "ed"])
@pytest.mark.parametrize("with_txt", [True, False], ids=["dns_txt", "nameservers"])
async def test_dkim_signed_by_reporting_domain(keys: dict[str, DkimKey],
                                               dns_server: LoopbackDNS, key_name: str,
                                               with_txt: bool) -> None:
    key = keys[key_name]
    verdict = await run(dns_server.port, signed(key), with_txt=with_txt)
    assert verdict.trusted and verdict.method == "dkim", verdict.reason
    assert verdict.dkim == [("example.net", "pass")]
    assert "example.net" in verdict.reason
    results = parsed(verdict)
    (dkim_result,) = results["dkim"]
    assert (dkim_result.result, dkim_result.header_d, dkim_result.header_s) == \
        ("pass", "example.net", key.selector)
    # The key was fetched from the loopback server.
    assert (key.dns_name.lower(), "TXT", "udp") in dns_server.queries


async def test_dkim_of_another_domain_is_not_enough(keys: dict[str, DkimKey],
                                                    dns_server: LoopbackDNS) -> None:
    """A valid signature by example.org says nothing about a report from example.net."""
    verdict = await run(dns_server.port, signed(keys["other"]))
    assert verdict.dkim == [("example.org", "pass")]
    assert not verdict.trusted
    assert parsed(verdict)["dkim"][0].result == "pass"   # recorded all the same


async def test_dkim_tampered_or_forged(keys: dict[str, DkimKey],
                                       dns_server: LoopbackDNS) -> None:
    tampered = signed(keys["ed"]).replace(b"User unknown in local recipient table",
                                          b"User unknown in local recipient TABLE")
    verdict = await run(dns_server.port, tampered)
    assert not verdict.trusted and verdict.dkim == [("example.net", "fail")]
    forged = await run(dns_server.port, signed(keys["forged"]))
    assert not forged.trusted and forged.dkim == [("example.net", "fail")]


async def test_dkim_key_missing(keys: dict[str, DkimKey], dns_server: LoopbackDNS) -> None:
    del dns_server.records[(keys["ed"].dns_name, "TXT")]
    verdict = await run(dns_server.port, signed(keys["ed"]))
    assert not verdict.trusted
    assert verdict.dkim == [("example.net", "permerror")]
    assert parsed(verdict)["dkim"][0].reason == "no key record"


# --- SPF ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("mail_from", "helo", "reporting_domain", "identity"), [
    ("", "mx.example.net", "mx.example.net", "helo"),            # bounce: null sender
    ("<>", "mx.example.net", "example.net", "helo"),
    ("fbl@example.net", "mta.isp.example", "example.net", "mailfrom"),
    ("fbl@example.net", "mta.isp.example", "arf.mail.example.net", "mailfrom"),
])
async def test_spf_pass(dns_server: LoopbackDNS, mail_from: str, helo: str,
                        reporting_domain: str, identity: str) -> None:
    verdict = await run(dns_server.port, postfix_dsn(), client_ip="192.0.2.25", helo=helo,
                        mail_from=mail_from, reporting_domain=reporting_domain)
    assert verdict.trusted and verdict.method == "spf", verdict.reason
    assert verdict.spf == "pass"
    (spf_result,) = parsed(verdict)["spf"]
    assert spf_result.result == "pass"
    if identity == "helo":
        assert spf_result.smtp_helo == helo
    else:
        assert spf_result.smtp_mailfrom == mail_from


async def test_spf_pass_for_another_organisation(dns_server: LoopbackDNS) -> None:
    """example.net's SPF passes, but the report claims to come from example.org."""
    verdict = await run(dns_server.port, postfix_dsn(), client_ip="192.0.2.25",
                        mail_from="x@example.net", reporting_domain="mail.example.org")
    assert verdict.spf == "pass" and not verdict.trusted


# --- forged, VERP -------------------------------------------------------------------------------

async def test_forged_report_is_untrusted(dns_server: LoopbackDNS) -> None:
    """No signature, SPF fail (198.51.100.7 is not in example.net's policy), no VERP."""
    verdict = await run(dns_server.port, postfix_dsn(), client_ip="198.51.100.7",
                        mail_from="postmaster@example.net", reporting_domain="mx.example.net")
    assert not verdict.trusted
    assert verdict.method == ""
    assert verdict.spf == "fail"
    assert verdict.dkim == []
    assert verdict.reason.startswith("untrusted:")
    results = parsed(verdict)
    assert [r.result for r in results["spf"]] == ["fail"]
    assert [r.result for r in results["dkim"]] == ["none"]
    assert [r.result for r in results["x-verp"]] == ["fail"]


async def test_verp_ok_is_trusted(dns_server: LoopbackDNS) -> None:
    verdict = await run(dns_server.port, postfix_dsn(), client_ip="198.51.100.7",
                        verp_ok=True, reporting_domain="")
    assert verdict.trusted and verdict.method == "verp"
    assert [r.result for r in parsed(verdict)["x-verp"]] == ["pass"]


async def test_garbage_report_does_not_raise(dns_server: LoopbackDNS) -> None:
    for raw in (b"", b"\x00\xff", b"DKIM-Signature: v=1; d=\xff; b=;\r\n\r\n",
                b"DKIM-Signature: garbage\r\nFrom: a@example.net\r\n\r\nx\r\n"):
        verdict = await run(dns_server.port, raw, client_ip="not an ip", helo="")
        assert not verdict.trusted
        authres.parse(verdict.authres_header)


async def test_no_nameserver_answers_means_untrusted(keys: dict[str, DkimKey]) -> None:
    """A dead resolver: temperrors, never a pass."""
    async with LoopbackDNS({}) as server:
        port = server.port
    verdict = await assess(signed(keys["ed"]), client_ip="192.0.2.25", helo="mx.example.net",
                           mail_from="", reporting_domain="example.net", verp_ok=False,
                           dns_txt=None, resolver_nameservers=[("127.0.0.1", port)],
                           authserv_id=AUTHSERV, dns_timeout=0.3)
    assert not verdict.trusted
    assert verdict.spf == "temperror"
    assert verdict.dkim == [("example.net", "temperror")]


async def test_end_to_end_with_parsed_report(keys: dict[str, DkimKey],
                                             dns_server: LoopbackDNS) -> None:
    """parse_report gives the reporting domain that assess checks the signature against."""
    raw = signed(keys["rsa"], normalize_line_endings(
        (REPORTS / "postfix-dsn.eml").read_bytes().replace(
            b"MAILER-DAEMON@mx.example.net", b"MAILER-DAEMON@example.net")))
    report = parse_report(raw)
    assert report.reporting_domain == "mx.example.net"
    verdict = await run(dns_server.port, report.raw,
                        reporting_domain=report.reporting_domain or "")
    assert verdict.trusted and verdict.method == "dkim"


async def test_assessments_run_concurrently(dns_server: LoopbackDNS) -> None:
    """SPF swaps pyspf's resolver under a lock; concurrent checks stay correct."""
    verdicts = await asyncio.gather(*(
        run(dns_server.port, postfix_dsn(), client_ip=ip, mail_from="x@example.net",
            reporting_domain="example.net")
        for ip in ["192.0.2.25", "198.51.100.7"] * 4))
    assert [v.spf for v in verdicts] == ["pass", "fail"] * 4


# --- organisational domains ---------------------------------------------------------------------

@pytest.mark.parametrize(("a", "b", "same"), [
    ("example.net", "example.net", True),
    ("mx.example.net", "example.net", True),
    ("arf.mail.example.net", "bounce.example.net.", True),
    ("Example.NET", "example.net", True),
    ("example.net", "example.org", False),
    ("net", "example.net", False),
    ("evil.co.uk", "victim.co.uk", False),
    ("mx.victim.co.uk", "victim.co.uk", True),
    ("co.uk", "co.uk", False),
    ("192.0.2.1", "192.0.2.1", False),
    ("", "example.net", False),
])
def test_same_organization(a: str, b: str, same: bool) -> None:
    assert same_organization(a, b) is same


def test_organizational_domain() -> None:
    assert organizational_domain("a.b.mx.example.net.") == "example.net"
    assert organizational_domain("mail.shop.example.co.uk") == "example.co.uk"
    assert organizational_domain("com") is None
