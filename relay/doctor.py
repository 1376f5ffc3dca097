"""`relay doctor`: are the DNS records of every sending domain what receivers need?

For each sending domain (every [[dkim]] domain and every [[app]].from_domains entry) it
asks DNS, through [dns].nameservers (empty: the system resolver):

* dkim  - each selector's TXT record exists and its p= is the public half of the
  configured private key; a test message signed with the key verifies with dkimpy
  against the published record (RFC 6376 3.6);
* spf   - pyspf evaluates the domain's SPF policy for every outbound address
  (RFC 7208 4); pass, or warn on softfail/neutral, or fail;
* dmarc - _dmarc.DOMAIN (or the parent's) holds one DMARC record; p=, adkim=, aspf=
  are reported (RFC 7489 6.1, 6.6.3);
* mx    - the bounce domain (for now the sending domain itself) has an MX record, so
  DSNs and replies can come back (RFC 5321 5.1, RFC 7505).

One line per check, `PASS|WARN|FAIL KIND DOMAIN[ SELECTOR]: text`; the exit status is 1
when any check failed, else 0.
"""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import re
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

import dkim
import dns.exception
import dns.nameserver
import dns.resolver
import spf
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from dkim.util import InvalidTagValueList, parse_tag_value

from relay.config import Config
from relay.dnsconf import configured
from relay.outbound.dkim import DkimKey, DkimKeyError, Signer

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

_SPF_STATUS = {
    "pass": PASS,
    "softfail": WARN,   # RFC 7208 2.6.5: "probably not authorized"
    "neutral": WARN,    # RFC 7208 2.6.2: no assertion either way
    "fail": FAIL,       # RFC 7208 2.6.4: explicitly not authorized
    "none": FAIL,       # no SPF record: large receivers require one of bulk senders
    "permerror": FAIL,  # RFC 7208 2.6.7: the record is broken
    "temperror": FAIL,  # RFC 7208 2.6.6: DNS trouble
}


@dataclass(frozen=True)
class Finding:
    """The outcome of one check."""

    status: str   # PASS, WARN or FAIL
    kind: str     # dkim, spf, dmarc, mx
    subject: str  # "example.com" or "example.com s1"
    text: str

    def line(self) -> str:
        """`PASS dkim example.com s1: TXT matches key`."""
        return f"{self.status} {self.kind} {self.subject}: {self.text}"


def sending_domains(cfg: Config) -> list[str]:
    """Every [[dkim]] domain, then every [[app]].from_domains entry, each once, in order."""
    seen: dict[str, None] = {}
    for entry in cfg.dkim:
        seen.setdefault(entry.domain.lower(), None)
    for app in cfg.apps:
        for domain in app.from_domains:
            seen.setdefault(domain.lower(), None)
    return list(seen)


def make_resolver(nameservers: tuple[tuple[str, int], ...] | list[tuple[str, int]],
                  lifetime: float = 5.0) -> dns.resolver.Resolver:
    """A dnspython resolver asking exactly `nameservers` ((host, port) pairs), or the
    system's resolver (/etc/resolv.conf) when there are none."""
    return configured(dns.resolver.Resolver, nameservers, lifetime)


# --- pyspf over our resolver -------------------------------------------------------------

_SPF_LOCK = threading.Lock()


def _spf_lookup(res: dns.resolver.Resolver) -> Callable[..., list[tuple[Any, Any]]]:
    """A replacement for pyspf's `DNSLookup(name, qtype, strict, timeout)` with the same
    results as its dnspython backend, asking `res` instead of the process-wide resolver."""

    def lookup(name: str, qtype: str, strict: Any = True, timeout: float = 20,
               ) -> list[tuple[Any, Any]]:
        out: list[tuple[Any, Any]] = []
        try:
            answer = res.resolve(name, qtype, lifetime=timeout, search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return out
        except dns.exception.DNSException as exc:
            raise spf.TempError(f"DNS {exc}") from None
        for rdata in answer:
            if qtype in ("A", "AAAA"):
                out.append(((name, qtype), rdata.address))
            elif qtype == "MX":
                out.append(((name, qtype), (rdata.preference, rdata.exchange)))
            elif qtype == "PTR":
                out.append(((name, qtype), rdata.target.to_text(True)))
            elif qtype in ("TXT", "SPF"):
                out.append(((name, qtype), rdata.strings))
        return out

    return lookup


@contextlib.contextmanager
def _spf_dns(res: dns.resolver.Resolver) -> Iterator[None]:
    """pyspf looks up through its module-level `DNSLookup` hook; point it at `res` for the
    duration of one check (under a lock: the hook is process-wide), then put it back."""
    with _SPF_LOCK:
        saved = spf.DNSLookup
        spf.DNSLookup = _spf_lookup(res)
        try:
            yield
        finally:
            spf.DNSLookup = saved


spf_dns = _spf_dns  # public name for other modules (relay/suppression/trust.py)


def detect_outbound_ips(cfg: Config) -> list[str]:
    """The local address the kernel would use to reach the smarthost (or, in MX mode, the
    Internet). A UDP connect() sends nothing; it only picks a route."""
    if cfg.outbound.mode == "smarthost" and cfg.outbound.smarthost is not None:
        host, port = cfg.outbound.smarthost
    else:
        host, port = "198.51.100.1", 25  # RFC 5737 TEST-NET-2: any non-local address
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
        family, _, _, _, sockaddr = infos[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(sockaddr)
            return [sock.getsockname()[0]]
    except OSError:
        return []


# --- the checks --------------------------------------------------------------------------

class Doctor:
    """Runs the checks for one configuration against one resolver."""

    def __init__(self, cfg: Config, res: dns.resolver.Resolver, outbound_ips: list[str],
                 *, ips_explicit: bool = True):
        self.cfg = cfg
        self.res = res
        self.outbound_ips = outbound_ips
        self.ips_explicit = ips_explicit
        self.helo = cfg.outbound.helo_name or cfg.server.hostname

    def txt(self, name: str) -> list[bytes]:
        """The TXT records at `name`, character-strings joined; [] if none (NXDOMAIN or
        no TXT). Other DNS failures raise dns.exception.DNSException."""
        try:
            answer = self.res.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [b"".join(r.strings) for r in answer]  # type: ignore[attr-defined]

    def run(self) -> list[Finding]:
        """Every check for every sending domain, in order."""
        findings: list[Finding] = []
        for domain in sending_domains(self.cfg):
            for check in (self.check_dkim, self.check_spf, self.check_dmarc, self.check_mx):
                try:
                    findings.extend(check(domain))
                except dns.exception.DNSException as exc:
                    kind = check.__name__.removeprefix("check_")
                    findings.append(Finding(FAIL, kind, domain, f"DNS error: {exc}"))
        return findings

    # -- dkim --

    def check_dkim(self, domain: str) -> list[Finding]:
        entries = [e for e in self.cfg.dkim if e.domain.lower() == domain]
        if not entries:
            return [Finding(WARN, "dkim", domain, "no [[dkim]] key for this domain: its mail "
                            "is signed by a fallback domain or not at all")]
        return [self._check_selector(domain, e.selector, e.key) for e in entries]

    def _check_selector(self, domain: str, selector: str, path: Any) -> Finding:
        subject = f"{domain} {selector}"
        try:
            key = DkimKey.load(domain, selector, path)
        except DkimKeyError as exc:
            return Finding(FAIL, "dkim", subject, f"key unusable: {exc}")
        name = key.dns_name
        records = [r for r in self.txt(name)
                   if r.startswith(b"v=DKIM1") or b"p=" in r]
        if not records:
            return Finding(FAIL, "dkim", subject,
                           f"no TXT record at {name}; publish \"{key.txt_record()}\"")
        problems = []
        for record in records:
            why = _record_mismatch(record, key)
            if why is None:
                break
            problems.append(why)
        else:
            return Finding(FAIL, "dkim", subject, "; ".join(problems))
        # Belt and braces: a real signature, checked by dkimpy against what DNS serves.
        signed = Signer([key]).sign(b"From: <postmaster@" + domain.encode() + b">\r\n"
                                    b"Subject: relay doctor\r\n\r\ntest\r\n")
        if not dkim.verify(signed, dnsfunc=self._dkim_dnsfunc, minkey=1024):
            return Finding(FAIL, "dkim", subject, "TXT matches the key but a test "
                           "signature does not verify against it")
        extra = f" ({len(records)} key records; receivers may pick any)" \
            if len(records) > 1 else ""
        return Finding(PASS, "dkim", subject, f"TXT matches key ({key.key_type}"
                       f"{'' if key.key_type == 'ed25519' else f' {key.bits} bits'}){extra}")

    def _dkim_dnsfunc(self, name: bytes, timeout: float = 5) -> bytes | None:
        records = self.txt(name.decode("ascii"))
        return records[0] if records else None

    # -- spf --

    def check_spf(self, domain: str) -> list[Finding]:
        if not self.outbound_ips:
            return [Finding(WARN, "spf", domain, "no outbound address known; "
                            "give one with `relay doctor --ip ADDRESS`")]
        findings = []
        for ip in self.outbound_ips:
            address = ipaddress.ip_address(ip)
            if not self.ips_explicit and not address.is_global:
                findings.append(Finding(
                    WARN, "spf", domain, f"outbound address {ip} is not public (a smarthost's "
                    "own address is what receivers check); give it with --ip ADDRESS"))
                continue
            with _spf_dns(self.res):
                result, explanation = spf.check2(i=ip, s=f"postmaster@{domain}", h=self.helo)
            status = _SPF_STATUS.get(result, FAIL)
            if status == PASS:
                text = f"{ip} permitted ({result})"
            elif result in ("permerror", "temperror"):
                why = re.sub(r"^SPF (Permanent|Temporary) Error: ", "", explanation)
                text = f"SPF record unusable for {ip} ({result}: {why})"
            elif result == "none":
                text = f"no SPF record; {ip} not authorised (none)"
            else:
                text = f"{ip} not permitted ({result})"
            findings.append(Finding(status, "spf", domain, text))
        return findings

    # -- dmarc --

    def check_dmarc(self, domain: str) -> list[Finding]:
        labels = domain.split(".")
        # RFC 7489 6.6.3: the From domain, then the organisational domain. Without the
        # public suffix list, walk up while at least two labels remain.
        for start in range(len(labels) - 1):
            owner = ".".join(labels[start:])
            records = [r for r in self.txt(f"_dmarc.{owner}.")
                       if r[:8].upper() == b"V=DMARC1"]
            if not records:
                continue
            where = "" if start == 0 else f" (inherited from _dmarc.{owner})"
            if len(records) > 1:
                return [Finding(FAIL, "dmarc", domain, f"{len(records)} DMARC records at "
                                f"_dmarc.{owner}: receivers ignore them all (RFC 7489 6.6.3)")]
            tags = _dmarc_tags(records[0])
            policy = tags.get("sp", tags.get("p")) if start else tags.get("p")
            if policy not in ("none", "quarantine", "reject"):
                return [Finding(FAIL, "dmarc", domain,
                                f"record has no valid p= tag{where} (RFC 7489 6.3)")]
            adkim, aspf = tags.get("adkim", "r"), tags.get("aspf", "r")
            text = f"p={policy} adkim={adkim} aspf={aspf}"
            if tags.get("pct", "100") != "100":
                text += f" pct={tags['pct']}"
            return [Finding(PASS, "dmarc", domain, text + where)]
        return [Finding(WARN, "dmarc", domain, f"no DMARC record at _dmarc.{domain}")]

    # -- mx --

    def check_mx(self, domain: str) -> list[Finding]:
        try:
            answer = self.res.resolve(f"{domain}.", "MX", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return [Finding(WARN, "mx", domain, "no MX record: bounces and replies to this "
                            "domain cannot come back")]
        mxs = sorted((r.preference, r.exchange.to_text()) for r in answer)  # type: ignore[attr-defined]
        if mxs == [(0, ".")]:
            return [Finding(WARN, "mx", domain, "null MX (RFC 7505): bounces and replies to "
                            "this domain cannot come back")]
        return [Finding(PASS, "mx", domain, ", ".join(f"{p} {h}" for p, h in mxs))]


def _record_mismatch(record: bytes, key: DkimKey) -> str | None:
    """None if the key record publishes `key`'s public half, else why not."""
    try:
        tags = parse_tag_value(record)
    except InvalidTagValueList as exc:
        return f"unparsable key record ({exc})"
    if tags.get(b"v", b"DKIM1") != b"DKIM1":
        return "key record has v= other than DKIM1"
    k = tags.get(b"k", b"rsa").decode("ascii", "replace")
    if k != key.key_type:
        return f"TXT is k={k} but the key is {key.key_type}"
    p = re.sub(rb"\s+", b"", tags.get(b"p", b""))
    if not p:
        return "TXT has an empty p= (the key is revoked, RFC 6376 3.6.1)"
    try:
        published = base64.b64decode(p, validate=True)
    except ValueError:
        return "TXT p= is not base64"
    if key.key_type == "ed25519":
        same = published == key.public_key_bytes()
    else:
        try:
            # SubjectPublicKeyInfo (RFC 6376 3.6.1) or a bare PKCS#1 RSAPublicKey.
            public = serialization.load_der_public_key(published)
        except ValueError:
            return "TXT p= is not an RSA public key"
        own = key.private_key.public_key()
        same = (isinstance(public, rsa.RSAPublicKey) and isinstance(own, rsa.RSAPublicKey)
                and public.public_numbers() == own.public_numbers())
    if not same:
        return "TXT does not match key (p= is another key)"
    service = tags.get(b"s", b"*")
    if not set(service.split(b":")) & {b"*", b"email"}:
        return f"TXT s={service.decode('ascii', 'replace')} excludes email (RFC 6376 3.6.1)"
    return None


def _dmarc_tags(record: bytes) -> dict[str, str]:
    tags = {}
    for part in record.decode("ascii", "replace").split(";"):
        name, eq, value = part.partition("=")
        if eq:
            tags[name.strip().lower()] = value.strip().lower()
    return tags


def run_doctor(cfg: Config, *, outbound_ips: list[str] | None = None,
               out: IO[str] | None = None,
               resolver: dns.resolver.Resolver | None = None) -> int:
    """Check every sending domain of `cfg`, print one line per check to `out`; return 1 if
    any check failed, else 0.

    `out`: default the current sys.stdout. `outbound_ips`: the addresses receivers see the mail come from; default
    [outbound].source_addresses if the configuration has it, else the local address that
    reaches the smarthost. `resolver`: default one built from [dns].nameservers.

    Synchronous (pyspf is): call it through `asyncio.to_thread` from a running loop.
    """
    out = out if out is not None else sys.stdout  # looked up now: it may be redirected
    explicit = True
    if outbound_ips is None:
        configured = getattr(cfg.outbound, "source_addresses", None)
        if configured:
            outbound_ips = [str(a) for a in configured]
        else:
            outbound_ips = detect_outbound_ips(cfg)
            explicit = False
    res = resolver or make_resolver(cfg.dns.nameservers)
    findings = Doctor(cfg, res, list(outbound_ips), ips_explicit=explicit).run()
    if not findings:
        print("WARN doctor: no sending domains ([[dkim]] or [[app]].from_domains) configured",
              file=out)
    for finding in findings:
        print(finding.line(), file=out)
    failed = sum(f.status == FAIL for f in findings)
    warned = sum(f.status == WARN for f in findings)
    print(f"doctor: {len(findings)} checks, {failed} failed, {warned} warnings", file=out)
    return 1 if failed else 0


__all__ = ["FAIL", "PASS", "WARN", "Doctor", "Finding", "detect_outbound_ips",
           "make_resolver", "run_doctor", "sending_domains", "spf_dns"]
