"""May a bounce or complaint be believed? Only then does it suppress anyone.

Anyone can send the relay a DSN or an ARF report naming any recipient, so a report is
trusted (issue 6, DESIGN.md invariant 5) only when one of these holds:

* **VERP**: it came to a per-recipient return path whose HMAC verified
  (relay/outbound/verp.py). Only the relay knows the secret, and the address was only
  ever given to the receiving system of that recipient.
* **DKIM**: a DKIM-Signature (RFC 6376) of the report verifies and its d= belongs to the
  reporting domain's organisation (its Reporting-MTA or From domain, see
  relay/suppression/reports.py).
* **SPF**: the connecting client is authorised (RFC 7208 2.6.3 "pass") for the MAIL FROM
  domain, or, for the null sender that bounces use (RFC 5321 4.5.5), for the HELO name
  (RFC 7208 2.3, checked as postmaster@HELO), and that domain belongs to the reporting
  domain's organisation.

"Belongs to the organisation" means the same organisational domain: the last two labels
(the last three under a well-known two-label public suffix such as co.uk), a cheap
stand-in for RFC 7489 3.2's public suffix list. A bare public suffix matches nothing.

Every verdict is recorded as an Authentication-Results header field (RFC 8601) built with
the `authres` package, kept beside the stored report; `x-verp` is our own method name
for the VERP check. pyspf and dkimpy block (DNS, RSA in pure Python), so they run in
worker threads; DNS goes to the configured nameservers (STYLE.md rule 8).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import authres
import dkim
import dns.exception
import dns.resolver
import spf
from dkim.util import InvalidTagValueList, parse_tag_value

from relay.doctor import make_resolver, spf_dns
from relay.outbound.dkim import normalize_line_endings

__all__ = ["Assessment", "assess", "organizational_domain", "same_organization"]

log = logging.getLogger(__name__)

MAX_SIGNATURES = 5       # DKIM signatures checked per report (bound the work)
DNS_TIMEOUT = 5.0        # seconds per DNS query; pyspf gets twice that for all of its
                         # queries together (RFC 7208 4.6.4 suggests at least 20 s in all)

# Two-label public suffixes under which an organisation is three labels deep. A stand-in
# for the public suffix list (RFC 7489 3.2), which the relay does not carry.
_TWO_LABEL_SUFFIXES = frozenset({
    "ac.uk", "co.uk", "gov.uk", "ltd.uk", "me.uk", "net.uk", "org.uk", "plc.uk",
    "com.au", "edu.au", "gov.au", "net.au", "org.au", "ac.jp", "co.jp", "ne.jp", "or.jp",
    "ac.nz", "co.nz", "net.nz", "org.nz", "co.za", "org.za", "com.br", "net.br", "org.br",
    "com.cn", "net.cn", "org.cn", "co.in", "net.in", "org.in", "co.kr", "or.kr",
    "com.mx", "com.tr", "com.ar", "com.tw", "com.hk", "com.sg", "co.il", "co.id",
    "com.my", "com.ph", "com.vn", "com.ua", "co.th", "com.pl", "com.es", "co.at",
})


def organizational_domain(domain: str) -> str | None:
    """The organisational domain of `domain` (see the module docstring); None for a bare
    public suffix or a non-name."""
    labels = [label for label in domain.strip().rstrip(".").lower().split(".") if label]
    if len(labels) < 2:
        return None
    try:
        ipaddress.ip_address(".".join(labels))
    except ValueError:
        pass
    else:
        return None
    depth = 3 if ".".join(labels[-2:]) in _TWO_LABEL_SUFFIXES else 2
    return ".".join(labels[-depth:]) if len(labels) >= depth else None


def same_organization(a: str | None, b: str | None) -> bool:
    """True if `a` and `b` have the same organisational domain (a domain and its parent
    do, two unrelated domains under the same public suffix do not)."""
    if not a or not b:
        return False
    org = organizational_domain(a)
    return org is not None and org == organizational_domain(b)


@dataclass(frozen=True)
class Assessment:
    """The verdict on one report.

    `trusted`: it may suppress. `reason`: one line for the log. `authres_header`: the
    whole `Authentication-Results: ...` field (RFC 8601) to store with the report.
    `method`: what made it trusted ("verp", "dkim", "spf"), "" if nothing did. `spf`: the
    SPF result; `dkim`: (d=, result) per signature checked.
    """

    trusted: bool
    reason: str
    authres_header: str
    method: str = ""
    spf: str = "none"
    dkim: list[tuple[str, str]] = field(default_factory=list)


# --- SPF ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _SpfVerdict:
    result: str
    domain: str        # the domain whose policy was checked
    sender: str        # the identity checked: MAIL FROM, or postmaster@HELO
    helo_identity: bool
    explanation: str


def _spf(client_ip: str, helo: str, mail_from: str,
         nameservers: list[tuple[str, int]] | None, timeout: float) -> _SpfVerdict:
    sender = mail_from.strip().strip("<>")
    helo_identity = not sender
    if helo_identity:
        # RFC 7208 2.4: with the null reverse-path, check postmaster@HELO.
        sender = f"postmaster@{helo}" if helo else ""
    domain = sender.rpartition("@")[2].lower()
    if not domain or not client_ip:
        return _SpfVerdict("none", domain, sender, helo_identity, "no identity to check")
    try:
        with spf_dns(make_resolver(nameservers or [], lifetime=timeout)):
            result, explanation = spf.check2(i=client_ip, s=sender, h=helo or domain,
                                             timeout=timeout, querytime=2 * timeout)
    except spf.TempError as exc:
        result, explanation = "temperror", str(exc)
    except Exception as exc:  # noqa: BLE001 - pyspf on odd input; never trust on error
        result, explanation = "permerror", f"{type(exc).__name__}: {exc}"
    return _SpfVerdict(str(result), domain, sender, helo_identity, str(explanation))


# --- DKIM ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _DkimVerdict:
    result: str   # pass, fail, permerror, temperror
    domain: str
    selector: str
    reason: str


def _default_dns_txt(nameservers: list[tuple[str, int]] | None,
                     timeout: float) -> Callable[[str], list[bytes]]:
    res = make_resolver(nameservers or [], lifetime=timeout)

    def txt(name: str) -> list[bytes]:
        try:
            answer = res.resolve(name, "TXT", search=False)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return []
        return [b"".join(r.strings) for r in answer]  # type: ignore[attr-defined]

    return txt


def _dkim(message: bytes, dns_txt: Callable[[str], list[bytes]]) -> list[_DkimVerdict]:
    message = normalize_line_endings(message)
    try:
        headers = dkim.DKIM(message).headers
    except Exception:  # noqa: BLE001 - an unparsable message has no verifiable signature
        return []
    signatures = [v for n, v in headers if n.lower() == b"dkim-signature"]
    verdicts = []
    for idx, value in enumerate(signatures[:MAX_SIGNATURES]):
        try:
            tags = parse_tag_value(value)
            domain = tags.get(b"d", b"").decode("ascii", "replace").lower()
            selector = tags.get(b"s", b"").decode("ascii", "replace")
        except (InvalidTagValueList, AttributeError):
            verdicts.append(_DkimVerdict("permerror", "", "", "unparsable signature"))
            continue
        lookup: dict[str, str] = {}

        def dnsfunc(name: bytes, timeout: float = DNS_TIMEOUT,
                    lookup: dict[str, str] = lookup) -> bytes | None:
            try:
                records = dns_txt(name.decode("ascii"))
            except (dns.exception.DNSException, OSError) as exc:
                lookup["error"] = f"DNS: {exc}"
                return None
            if not records:
                lookup["error"] = "no key record"
                return None
            return records[0]

        try:
            ok = bool(dkim.DKIM(message).verify(idx=idx, dnsfunc=dnsfunc))
        except dkim.DKIMException as exc:
            # dkimpy raises on a changed body; RFC 8601 2.7.1 calls that "fail". Other
            # exceptions are syntax or key errors: "permerror".
            if "body hash mismatch" in str(exc):
                verdicts.append(_DkimVerdict("fail", domain, selector, "body hash mismatch"))
            else:
                verdicts.append(_DkimVerdict("permerror", domain, selector, str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - dkimpy on hostile input
            verdicts.append(_DkimVerdict("permerror", domain, selector,
                                         f"{type(exc).__name__}: {exc}"))
            continue
        if ok:
            verdicts.append(_DkimVerdict("pass", domain, selector, "signature verified"))
        elif lookup.get("error", "").startswith("DNS"):
            verdicts.append(_DkimVerdict("temperror", domain, selector, lookup["error"]))
        elif "error" in lookup:
            verdicts.append(_DkimVerdict("permerror", domain, selector, lookup["error"]))
        else:
            verdicts.append(_DkimVerdict("fail", domain, selector, "signature did not verify"))
    return verdicts


def _token(value: str | None) -> str | None:
    """A property value fit for the header (a domain name or selector); None otherwise."""
    if value and re.fullmatch(r"[A-Za-z0-9._-]{1,253}", value):
        return value
    return None


def _reason(text: str, limit: int = 200) -> str:
    """Printable ASCII without quotes or backslashes, bounded: authres quotes it as is,
    and the log line it ends up in must not carry control characters."""
    return re.sub(r'[^ -~]|["\\]', "?", text)[:limit]


# --- the verdict --------------------------------------------------------------------------------

async def assess(report_bytes: bytes, *, client_ip: str, helo: str, mail_from: str,
                 reporting_domain: str, verp_ok: bool,
                 dns_txt: Callable[[str], list[bytes]] | None,
                 resolver_nameservers: list[tuple[str, int]] | None,
                 authserv_id: str = "localhost",
                 dns_timeout: float = DNS_TIMEOUT) -> Assessment:
    """Decide whether a report may be trusted (see the module docstring).

    `client_ip`, `helo`, `mail_from`: the SMTP session that delivered the report
    (`mail_from` "" or "<>" for the null sender). `reporting_domain`: the report's
    Reporting-MTA or From domain (`Report.reporting_domain`). `verp_ok`: its envelope
    recipient is a VERP address whose token verified. `dns_txt(name)`: TXT records for
    DKIM keys; None asks `resolver_nameservers` ((host, port) pairs; None or empty: the
    system resolver), which pyspf always asks. `authserv_id`: the relay's host name, the
    first token of the Authentication-Results field (RFC 8601 2.5). `dns_timeout`:
    seconds per DNS query (pyspf: twice that for the whole check); a DNS failure is a
    temperror, never a pass.

    SPF and DKIM are evaluated even when VERP verified, so the stored header tells the
    whole story; nothing here raises on a hostile report.
    """
    txt = dns_txt if dns_txt is not None else _default_dns_txt(resolver_nameservers,
                                                                dns_timeout)
    spf_verdict, dkim_verdicts = await asyncio.gather(
        asyncio.to_thread(_spf, client_ip, helo, mail_from, resolver_nameservers,
                          dns_timeout),
        asyncio.to_thread(_dkim, bytes(report_bytes), txt))

    results: list[authres.BaseAuthenticationResult] = []
    if spf_verdict.helo_identity:
        results.append(authres.SPFAuthenticationResult(
            result=spf_verdict.result, smtp_helo=_token(helo)))
    else:
        local, _, sender_domain = spf_verdict.sender.rpartition("@")
        mailfrom = spf_verdict.sender if _token(sender_domain) and re.fullmatch(
            r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}", local) else _token(sender_domain)
        results.append(authres.SPFAuthenticationResult(
            result=spf_verdict.result, smtp_mailfrom=mailfrom))
    if dkim_verdicts:
        for verdict in dkim_verdicts:
            results.append(authres.DKIMAuthenticationResult(
                result=verdict.result, reason=_reason(verdict.reason),
                header_d=_token(verdict.domain), header_s=_token(verdict.selector)))
    else:
        results.append(authres.DKIMAuthenticationResult(result="none"))
    results.append(authres.AuthenticationResult(method="x-verp",
                                                result="pass" if verp_ok else "fail"))
    header = str(authres.AuthenticationResultsHeader(authserv_id=authserv_id,
                                                     results=results))

    domain = reporting_domain.strip().rstrip(".").lower()
    dkim_pass = next((v for v in dkim_verdicts
                      if v.result == "pass" and same_organization(v.domain, domain)), None)
    spf_pass = spf_verdict.result == "pass" and same_organization(spf_verdict.domain, domain)
    if verp_ok:
        method, reason = "verp", "VERP token verified"
    elif dkim_pass is not None:
        method, reason = "dkim", (f"DKIM signature of {dkim_pass.domain} verified "
                                  f"(reporting domain {domain})")
    elif spf_pass:
        method, reason = "spf", (f"SPF pass for {spf_verdict.domain} from {client_ip} "
                                 f"(reporting domain {domain})")
    else:
        method = ""
        dkim_text = ", ".join(f"{_token(v.domain) or '?'}={v.result}"
                              for v in dkim_verdicts) or "none"
        reason = (f"untrusted: no verified VERP token; spf={spf_verdict.result} for "
                  f"{spf_verdict.domain or '(no domain)'}; dkim {dkim_text}; "
                  f"reporting domain {domain or '(unknown)'}")
    return Assessment(trusted=bool(method), reason=_reason(reason, 500), authres_header=header,
                      method=method, spf=spf_verdict.result,
                      dkim=[(v.domain, v.result) for v in dkim_verdicts])
