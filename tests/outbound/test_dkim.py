"""DKIM signing: every signature is checked by independent verifiers, dkimpy, Perl's
Mail::DKIM and Node's mailauth (the one that knows ed25519-sha256 where Debian's Mail::DKIM
does not), each fetching the public keys from a real DNS server on 127.0.0.1 (UDP, and TCP
after truncation), never from a dict.
"""

from __future__ import annotations

import asyncio
import base64
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dkim
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from dkim.canonicalization import Relaxed as RelaxedCanonicalization
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import DkimKeyConfig
from relay.outbound.dkim import (
    DkimKey,
    DkimKeyError,
    DkimMessageError,
    Signer,
    can_sign,
    check,
    generate_private_key,
    load_keys,
    normalize_line_endings,
    relaxed_body,
    write_private_key,
)
from tests.conftest import CASES, CORPUS
from tests.support.dkimverify import (
    assert_independent_pass,
    assert_verifies,
    dkimpy_results,
    mailauth_results,
    perl_results,
    zone,
)
from tests.support.dns import LoopbackDNS, Records, async_resolver, resolver
from tests.support.transcript import parse

# RFC 6376 3.4.4: relaxed canonicalisation of an empty body is empty; its SHA-256.
EMPTY_BODY_BH = b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
T0 = 1_780_000_000.0  # a past instant: verifiers refuse t= in the future


# --- keys and DNS ---------------------------------------------------------------------------

def _pem(key: rsa.RSAPrivateKey | object) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,  # type: ignore[attr-defined]
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class Keys:
    rsa: DkimKey        # example.com, s=rsa1
    ed: DkimKey         # example.com, s=ed1
    rsa_b: DkimKey      # example.com, s=rsa2 (a second RSA key for dual RSA signing)
    other: DkimKey      # example.org, s=org1

    def all(self) -> list[DkimKey]:
        return [self.rsa, self.ed, self.rsa_b, self.other]


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=DkimKey.from_pem("example.com", "rsa1", _pem(generate_private_key("rsa"))),
        ed=DkimKey.from_pem("example.com", "ed1", _pem(generate_private_key("ed25519"))),
        rsa_b=DkimKey.from_pem("example.com", "rsa2", _pem(generate_private_key("rsa"))),
        other=DkimKey.from_pem("example.org", "org1", _pem(generate_private_key("rsa"))),
    )


@pytest_asyncio.fixture
async def dns_server(keys: Keys) -> Iterator[LoopbackDNS]:
    async with LoopbackDNS(zone(keys.all())) as server:
        yield server


# --- message helpers -----------------------------------------------------------------------

def tags(message: bytes, index: int = 0) -> dict[bytes, bytes]:
    """The tags of the index-th DKIM-Signature field, whitespace removed."""
    d = dkim.DKIM(message)
    values = [v for n, v in d.headers if n.lower() == b"dkim-signature"]
    return {k: re.sub(rb"\s+", b"", v) for k, v in dkim.util.parse_tag_value(values[index]).items()}


def strip_signatures(message: bytes) -> bytes:
    """The message without its leading DKIM-Signature fields."""
    while message.lower().startswith(b"dkim-signature:"):
        end = message.find(b"\r\n")
        while message[end + 2:end + 3] in (b" ", b"\t"):
            end = message.find(b"\r\n", end + 2)
        message = message[end + 2:]
    return message


HEAD = (b"From: News <news@example.com>\r\n"
        b"To: reader@example.net\r\n"
        b"Subject: Hello\r\n"
        b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <1@example.com>\r\n")
SIMPLE = HEAD + b"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n\r\n" \
                b"Hello reader.\r\n"

MULTIPART = HEAD + (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: multipart/mixed; boundary=\"outer\"\r\n"
    b"\r\n"
    b"This is a multi-part message in MIME format.\r\n"
    b"--outer\r\n"
    b"Content-Type: multipart/alternative; boundary=\"inner\"\r\n"
    b"\r\n"
    b"--inner\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: quoted-printable\r\n"
    b"\r\n"
    b"Gr=C3=BC=C3=9Fe   \r\n"
    b"--inner\r\n"
    b"Content-Type: text/html; charset=utf-8\r\n"
    b"\r\n"
    b"<p>Gr&uuml;&szlig;e</p>\r\n"
    b"--inner--\r\n"
    b"--outer\r\n"
    b"Content-Type: application/octet-stream; name=\"a.bin\"\r\n"
    b"Content-Transfer-Encoding: base64\r\n"
    b"Content-Disposition: attachment; filename=\"a.bin\"\r\n"
    b"\r\n"
    + base64.encodebytes(bytes(range(256)) * 4).replace(b"\n", b"\r\n")
    + b"--outer--\r\n")

UTF8 = ("From: Jürgen Groß <news@example.com>\r\n"
        "To: Ärger <reader@example.net>\r\n"
        "Subject: Grüße aus Köln — 東京\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "Content-Transfer-Encoding: 8bit\r\n"
        "\r\n"
        "Schöne Grüße\r\n\tmit Tab und   Leerzeichen   \r\n").encode()

LONG = (b"From: News <news@example.com>\r\n"
        b"To: " + b",\r\n ".join(b"reader%d@example.net" % i for i in range(60)) + b"\r\n"
        b"Subject: " + b" ".join([b"word"] * 150) + b"\r\n"
        b"List-Unsubscribe: <https://example.com/u/" + b"x" * 400 + b">,\r\n"
        b"  <mailto:unsubscribe@example.com?subject=" + b"y" * 200 + b">\r\n"
        b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        b"Feedback-ID: 1:shop:marketing:relay\r\n"
        b"\r\n" + (b"z" * 998 + b"\r\n") * 3)

EMPTY_BODY = HEAD + b"\r\n"
HEADERS_ONLY = HEAD
WHITESPACE = (b"From:   News\t <news@example.com>  \r\n"
              b"SUBJECT:\tmixed \t case\r\n"
              b"to: reader@example.net\r\n"
              b"To: second@example.net\r\n"
              b"\r\n"
              b"trailing spaces   \r\n\r\n\r\n   \r\n\r\n")

MESSAGES = {"simple": SIMPLE, "multipart": MULTIPART, "utf8": UTF8, "long": LONG,
            "empty-body": EMPTY_BODY, "headers-only": HEADERS_ONLY, "whitespace": WHITESPACE}


def case_messages(name: str) -> list[bytes]:
    """The DATA contents of a transcript in shared/cases, dot-unstuffed, bare CR/LF
    normalised to CRLF as the relay would need them (it refuses 02 and 04 at DATA)."""
    transcript = parse(CASES / name)
    out = []
    after_data = False
    for step in transcript.steps:
        if step[0] != "send":
            continue
        data = b"".join(step[1])
        if after_data:
            assert data.endswith(b"\r\n.\r\n"), data
            body = data[:-3].replace(b"\r\n..", b"\r\n.")
            out.append(normalize_line_endings(body))
        after_data = data.upper() == b"DATA\r\n"
    return out


# --- signing and verifying ----------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_one_key_verifies(keys: Keys, dns_server: LoopbackDNS, tmp_path: Path,
                                algorithm: str) -> None:
    key = keys.rsa if algorithm == "rsa" else keys.ed
    signed = Signer([key], clock=lambda: T0).sign(SIMPLE)
    t = tags(signed)
    assert t[b"a"] == key.algorithm.encode() and t[b"d"] == b"example.com"
    assert t[b"s"] == key.selector.encode() and t[b"c"] == b"relaxed/relaxed"
    assert t[b"t"] == b"%d" % T0
    # dkimpy and mailauth; Mail::DKIM too where it knows ed25519-sha256 (Debian 12's does not).
    await assert_verifies(signed, dns_server.port, tmp_path, 1)


async def test_dual_signing_rsa_and_ed25519(keys: Keys, dns_server: LoopbackDNS,
                                            tmp_path: Path) -> None:
    signed = Signer([keys.rsa, keys.ed, keys.other]).sign(SIMPLE)
    # One signature per key of the From domain, the first key's on top; example.org's key
    # does not sign example.com mail.
    assert [tags(signed, i)[b"s"] for i in range(2)] == [b"rsa1", b"ed1"]
    assert signed.count(b"DKIM-Signature:") == 2
    await assert_verifies(signed, dns_server.port, tmp_path, 2)
    # A receiver that knows only RSA still passes the message (RFC 8463 6: dual signing).
    [verdict] = await perl_results([signed], dns_server.port, tmp_path)
    assert verdict.by_selector()["rsa1"].result == "pass"
    [both] = await mailauth_results([signed], dns_server.port, tmp_path)
    assert [(s.algorithm, s.selector, s.result) for s in both.sigs] == [
        ("rsa-sha256", "rsa1", "pass"), ("ed25519-sha256", "ed1", "pass")]


async def test_dual_signing_two_rsa_keys(keys: Keys, dns_server: LoopbackDNS,
                                         tmp_path: Path) -> None:
    signed = Signer([keys.rsa, keys.rsa_b]).sign(MULTIPART)
    assert [tags(signed, i)[b"s"] for i in range(2)] == [b"rsa1", b"rsa2"]
    await assert_verifies(signed, dns_server.port, tmp_path, 2)


@pytest.mark.parametrize("name", list(MESSAGES))
async def test_message_shapes_verify(keys: Keys, dns_server: LoopbackDNS, tmp_path: Path,
                                     name: str) -> None:
    message = MESSAGES[name]
    signed = Signer([keys.rsa, keys.ed]).sign(message)
    # Nothing but prepending: the rest is the (already CRLF) message, byte for byte.
    assert strip_signatures(signed) == message
    await assert_verifies(signed, dns_server.port, tmp_path, 2)
    if name in ("empty-body", "headers-only"):
        assert tags(signed)[b"bh"] == EMPTY_BODY_BH


def test_signed_header_list_and_over_signing(keys: Keys) -> None:
    signed = Signer([keys.rsa]).sign(LONG)
    h = tags(signed)[b"h"].split(b":")
    # Present fields once each, From / List-Unsubscribe / List-Unsubscribe-Post once more.
    assert h == [b"from", b"from", b"to", b"subject", b"list-unsubscribe",
                 b"list-unsubscribe", b"list-unsubscribe-post", b"list-unsubscribe-post",
                 b"feedback-id"]
    h = tags(Signer([keys.rsa]).sign(WHITESPACE))[b"h"].split(b":")
    # Absent fields are not listed, except the over-signed ones (so none can be added).
    assert h == [b"from", b"from", b"to", b"to", b"subject", b"list-unsubscribe",
                 b"list-unsubscribe-post"]


@pytest.mark.parametrize("added", [
    b"From: Mallory <ceo@example.com>\r\n",
    b"List-Unsubscribe: <https://evil.example.org/u>\r\n",
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
])
@pytest.mark.parametrize("where", ["top", "bottom"])
async def test_over_signed_fields_cannot_be_added(keys: Keys, dns_server: LoopbackDNS,
                                                  tmp_path: Path, added: bytes,
                                                  where: str) -> None:
    signed = Signer([keys.rsa]).sign(SIMPLE)
    assert await dkimpy_results(signed, dns_server.port) == [True]
    if where == "top":
        tampered = added + signed
    else:
        tampered = signed.replace(b"\r\n\r\n", b"\r\n" + added + b"\r\n", 1)
    assert await dkimpy_results(tampered, dns_server.port) == [False]
    [verdict] = await perl_results([tampered], dns_server.port, tmp_path)
    assert verdict.result == "fail", verdict
    [verdict] = await mailauth_results([tampered], dns_server.port, tmp_path)
    assert verdict.results() == ["fail"], verdict


async def test_an_unsigned_field_may_be_added(keys: Keys, dns_server: LoopbackDNS,
                                              tmp_path: Path) -> None:
    """Control for the test above: a Received field added in transit breaks nothing."""
    signed = Signer([keys.rsa]).sign(SIMPLE)
    await assert_verifies(b"Received: from relay.test by mx.example.net\r\n" + signed,
                          dns_server.port, tmp_path, 1)


@pytest.mark.parametrize("change", ["body", "subject", "body-append"])
async def test_a_modified_message_fails(keys: Keys, dns_server: LoopbackDNS, tmp_path: Path,
                                        change: str) -> None:
    signed = Signer([keys.rsa]).sign(SIMPLE)
    if change == "body":
        tampered = signed.replace(b"Hello reader.", b"Hello reader!")
    elif change == "subject":
        tampered = signed.replace(b"Subject: Hello", b"Subject: Hallo")
    else:
        tampered = signed + b"P.S. click here\r\n"
    assert tampered != signed
    assert await dkimpy_results(tampered, dns_server.port) == [False]
    [verdict] = await perl_results([tampered], dns_server.port, tmp_path)
    assert verdict.result == "fail", verdict
    [verdict] = await mailauth_results([tampered], dns_server.port, tmp_path)
    assert verdict.results() == ["fail"], verdict


async def test_fallback_domain(keys: Keys, dns_server: LoopbackDNS, tmp_path: Path) -> None:
    message = SIMPLE.replace(b"news@example.com", b"news@shop.example.net")
    signer = Signer([keys.rsa, keys.other])
    # No key for the From domain and no fallback: returned unchanged.
    assert signer.sign(message) == message
    signed = signer.sign(message, fallback_domain="example.com")
    assert tags(signed)[b"d"] == b"example.com"
    await assert_verifies(signed, dns_server.port, tmp_path, 1)
    # The From domain's own key wins over the app's fallback domain.
    own = signer.sign(SIMPLE.replace(b"news@example.com", b"news@example.org"),
                      fallback_domain="example.com")
    assert tags(own)[b"d"] == b"example.org"
    # The constructor's table: a From domain to the domain whose keys sign it; "*" any.
    mapped = Signer([keys.rsa, keys.other], fallback={"shop.example.net": "example.org"})
    assert tags(mapped.sign(message, fallback_domain="example.com"))[b"d"] == b"example.org"
    anyone = Signer([keys.rsa], fallback={"*": "example.com"})
    assert tags(anyone.sign(message))[b"d"] == b"example.com"
    # The From domain is matched case-insensitively.
    upper = signer.sign(SIMPLE.replace(b"news@example.com", b"news@EXAMPLE.COM"))
    assert tags(upper)[b"d"] == b"example.com"


async def test_fast_path_and_dkimpy_path_agree(keys: Keys, dns_server: LoopbackDNS,
                                               tmp_path: Path) -> None:
    for message in (SIMPLE, UTF8, LONG, WHITESPACE, EMPTY_BODY):
        fast = Signer([keys.rsa, keys.ed]).sign(message)
        slow = Signer([keys.rsa, keys.ed], fast=False).sign(message)
        for i in range(2):
            assert tags(fast, i)[b"bh"] == tags(slow, i)[b"bh"]
            assert tags(fast, i)[b"h"] == tags(slow, i)[b"h"].replace(b" ", b"")
        await assert_verifies(fast, dns_server.port, tmp_path, 2)
        await assert_verifies(slow, dns_server.port, tmp_path, 2)
        # Same message, same key, same hashes: RSA PKCS#1 v1.5 is deterministic, so with
        # the same t= and field text the b= would be equal; here the field texts differ
        # (dkimpy adds i= and q=), so only both verifying is required.


async def test_body_hash_reused_across_recipients(keys: Keys, dns_server: LoopbackDNS,
                                                  tmp_path: Path) -> None:
    signer = Signer([keys.rsa])
    first = signer.sign(b"List-Unsubscribe: <https://example.com/u/1>\r\n" + MULTIPART)
    cached = signer._last_body
    second = signer.sign(b"List-Unsubscribe: <https://example.com/u/2>\r\n" + MULTIPART)
    assert signer._last_body is cached  # the second recipient reused the body hash
    assert tags(first)[b"bh"] == tags(second)[b"bh"]
    # A different body of the same length gets its own hash, not the cached one.
    other = MULTIPART.replace(b"Gr=C3=BC", b"Gr=C3=BD")
    assert len(other) == len(MULTIPART) and other != MULTIPART
    third = signer.sign(other)
    assert tags(third)[b"bh"] != tags(first)[b"bh"]
    results = await asyncio.gather(*(dkimpy_results(m, dns_server.port)
                                     for m in (first, second, third)))
    assert results == [[True]] * 3
    await assert_independent_pass([first, second, third], dns_server.port, tmp_path, 1)


async def test_key_record_fetched_over_tcp(dns_server: LoopbackDNS, tmp_path: Path) -> None:
    """A 4096-bit key's record does not fit 512 octets: both verifiers get TC and retry over
    TCP, as they must on the Internet."""
    big = DkimKey.from_pem("example.com", "big", _pem(generate_private_key("rsa", 4096)))
    dns_server.records[(big.dns_name, "TXT")] = [big.txt_record()]
    signed = Signer([big]).sign(SIMPLE)
    await assert_verifies(signed, dns_server.port, tmp_path, 1)
    assert ("big._domainkey.example.com.", "TXT", "tcp") in dns_server.queries


# --- line endings and the shared cases -----------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"From: a@example.com\nTo: b@example.net\nSubject: lf\n\nline one\nline two\n",
    b"From: a@example.com\r\nSubject: cr\r\n\r\nfirst half\rsecond half\r\n",
    b"From: a@example.com\r\nSubject: mixed\r\n\r\nalpha\nbeta   \r\ngamma\n\n\r\n",
    b"From: a@example.com\r\nSubject: no final newline\r\n\r\nlast line",
])
async def test_line_endings_normalised_before_signing(keys: Keys, dns_server: LoopbackDNS,
                                                      tmp_path: Path, raw: bytes) -> None:
    signed = Signer([keys.rsa]).sign(raw)
    assert strip_signatures(signed) == normalize_line_endings(raw)
    # No bare CR or LF anywhere: the bytes signed are the bytes the wire carries.
    assert signed.count(b"\r") == signed.count(b"\n") == signed.count(b"\r\n")
    assert signed.endswith(b"\r\n")
    await assert_verifies(signed, dns_server.port, tmp_path, 1)


@pytest.mark.parametrize("case", ["02-bare-cr-body-dkim.smtp", "04-mixed-eol-dkim.smtp",
                                  "10-utf8-header-8bitmime.smtp", "24-empty-body-dkim.smtp"])
async def test_shared_cases_sign_and_verify(keys: Keys, dns_server: LoopbackDNS,
                                            tmp_path: Path, case: str) -> None:
    messages = case_messages(case)
    assert messages
    signer = Signer([keys.rsa, keys.ed])
    signed = [signer.sign(m) for m in messages]
    for original, result in zip(messages, signed, strict=True):
        assert can_sign(original)
        assert strip_signatures(result) == original
        assert b"\r" not in result.replace(b"\r\n", b"")
        assert await dkimpy_results(result, dns_server.port) == [True, True]
    if case.startswith("24"):
        # A: headers only; B: only blank lines. Both hash as the empty body (RFC 6376 3.4.4),
        # and the signatures stay in the header section.
        assert len(signed) == 2
        for result in signed:
            assert tags(result)[b"bh"] == EMPTY_BODY_BH
            assert dkim.DKIM(result).headers[0][0] == b"DKIM-Signature"
    if case.startswith("10"):
        assert "Subject: Grüße aus Köln".encode() in signed[0]  # raw UTF-8, unchanged
    if case.startswith("04"):
        assert signed[0].endswith(b"\r\n\r\nalpha\r\nbeta   \r\ngamma\r\n\r\n\r\n")
    await assert_independent_pass(signed, dns_server.port, tmp_path, 2)


# Corpus messages that cannot be signed, and why (the edge refuses them at DATA, 5.6.0).
CORPUS_UNSIGNABLE = {
    "msg_11.txt": "no From", "msg_18.txt": "no From", "msg_37.txt": "no From",
    "msg_38.txt": "no From", "msg_39.txt": "no From", "msg_40.txt": "no From",
    "msg_19.txt": "malformed header line", "msg_35.txt": "malformed header line",
    # An mbox "From " line: dkimpy skips it silently, so it would travel unsigned.
    "msg_25.txt": "malformed header line", "msg_43.txt": "malformed header line",
}


def corpus() -> list[Path]:
    return sorted(CORPUS.glob("*.txt"))


async def test_corpus_every_message(keys: Keys, dns_server: LoopbackDNS,
                                    tmp_path: Path) -> None:
    files = corpus()
    assert len(files) >= 40
    signer = Signer([keys.rsa, keys.ed])
    signed: dict[str, bytes] = {}
    for path in files:
        message = normalize_line_endings(path.read_bytes())
        if path.name in CORPUS_UNSIGNABLE:
            assert not can_sign(message), path.name
            with pytest.raises(DkimMessageError) as info:
                check(message)
            why = CORPUS_UNSIGNABLE[path.name]
            assert why.split()[-1].lower() in str(info.value).lower(), (path.name, info.value)
            with pytest.raises(DkimMessageError):
                signer.sign(message, fallback_domain="example.com")
            if why == "no From" or path.name in ("msg_19.txt", "msg_35.txt"):
                # dkimpy refuses these too.
                with pytest.raises((dkim.MessageFormatError, dkim.ParameterError)):
                    dkim.sign(message, b"ed1", b"example.com", keys.ed.dkimpy_private_key(),
                              signature_algorithm=b"ed25519-sha256")
            continue
        assert can_sign(message), path.name
        # Corpus From domains have no key: the app's fallback domain signs (d=example.com).
        result = signer.sign(message, fallback_domain="example.com")
        assert strip_signatures(result) == message
        signed[path.name] = result
    assert len(signed) == len(files) - len(CORPUS_UNSIGNABLE)
    results = await asyncio.gather(*(dkimpy_results(m, dns_server.port)
                                     for m in signed.values()))
    assert dict(zip(signed, results, strict=True)) == {name: [True, True] for name in signed}
    await assert_independent_pass(list(signed.values()), dns_server.port, tmp_path, 2,
                                  names=list(signed))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from([b"a", b"b", b" ", b"  ", b"\t", b"\r\n", b"\r\n\r\n",
                                 b"\r", b"\n", b"\xc3\xa4"]), max_size=60))
def test_relaxed_body_equals_dkimpy(parts: list[bytes]) -> None:
    body = b"".join(parts)
    assert relaxed_body(body) == RelaxedCanonicalization.canonicalize_body(body)


def test_relaxed_body_equals_dkimpy_on_corpus() -> None:
    for path in corpus():
        message = normalize_line_endings(path.read_bytes())
        body = message.partition(b"\r\n\r\n")[2]
        assert relaxed_body(body) == RelaxedCanonicalization.canonicalize_body(body)


def test_fast_split_matches_dkimpy_parser() -> None:
    """The signer's own header/body split equals dkimpy's rfc822_parse on every signable
    corpus message and every test message."""
    from relay.outbound.dkim import _split

    samples = [normalize_line_endings(p.read_bytes()) for p in corpus()
               if p.name not in CORPUS_UNSIGNABLE] + list(MESSAGES.values())
    for message in samples:
        headers, body = _split(message)
        expected_headers, expected_body = dkim.rfc822_parse(message)
        assert (headers, body) == (expected_headers, expected_body)


# --- the edge's check ------------------------------------------------------------------------

@pytest.mark.parametrize(("message", "fragment"), [
    (b"Subject: no from\r\n\r\nbody\r\n", "no From"),
    (b" folded first\r\nFrom: a@example.com\r\n\r\n", "continuation"),
    (b"From: a@example.com\r\nthis is not a header\r\n\r\nbody\r\n", "malformed header"),
    (b"From: a@example.com\r\nBad Name: x\r\n\r\n", "malformed header"),
    (b"From MAILER-DAEMON Fri Apr 06 16:46:09 2001\r\nFrom: a@example.com\r\n\r\n",
     "malformed header"),
    (b"From: a@example.com\r\nN\xc3\xa4me: x\r\n\r\n", "malformed header"),
    (b"", "no From"),
])
def test_check_refuses_unsignable(keys: Keys, message: bytes, fragment: str) -> None:
    assert not can_sign(message)
    with pytest.raises(DkimMessageError, match=fragment) as info:
        check(message)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.6.0")
    with pytest.raises(DkimMessageError):
        Signer([keys.rsa], fallback={"*": "example.com"}).sign(message)


@pytest.mark.parametrize("message", [SIMPLE, UTF8, HEADERS_ONLY, EMPTY_BODY, WHITESPACE,
                                     b"From: a@example.com\nSubject: lf only\n\nbody\n"])
def test_check_accepts_signable(message: bytes) -> None:
    check(message)
    assert can_sign(message)


def test_malformed_message_via_dkimpy_path(keys: Keys) -> None:
    with pytest.raises(DkimMessageError):
        Signer([keys.rsa], fast=False, fallback={"*": "example.com"}).sign(
            b"From: a@example.com\r\nnot a header\r\n\r\n")


# --- keys --------------------------------------------------------------------------------

def test_load_keys_rsa_pkcs1_pkcs8_and_ed25519(tmp_path: Path) -> None:
    rsa_key = generate_private_key("rsa")
    (tmp_path / "pkcs1.pem").write_bytes(rsa_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption()))
    write_private_key(tmp_path / "pkcs8.pem", rsa_key)
    write_private_key(tmp_path / "ed.pem", generate_private_key("ed25519"))
    loaded = load_keys([("Example.COM", "a", tmp_path / "pkcs1.pem"),
                        DkimKeyConfig("example.com", "b", tmp_path / "pkcs8.pem"),
                        ("example.com", "c", str(tmp_path / "ed.pem"))])
    assert [(k.domain, k.selector, k.algorithm, k.bits) for k in loaded] == [
        ("example.com", "a", "rsa-sha256", 2048), ("example.com", "b", "rsa-sha256", 2048),
        ("example.com", "c", "ed25519-sha256", 256)]
    assert loaded[0].public_key_b64() == loaded[1].public_key_b64()
    # dkimpy's own forms: PKCS#1 PEM for RSA, the base64 32-byte seed for Ed25519.
    assert loaded[0].dkimpy_private_key().startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert len(base64.b64decode(loaded[2].dkimpy_private_key())) == 32
    assert loaded[2].txt_record().startswith("v=DKIM1; k=ed25519; p=")
    assert len(base64.b64decode(loaded[2].public_key_b64())) == 32


def _bad_keys(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    yield tmp_path / "missing.pem", "cannot read"
    (tmp_path / "garbage.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nxx\n")
    yield tmp_path / "garbage.pem", "not a usable PEM"
    short = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    write_private_key(tmp_path / "short.pem", short)
    yield tmp_path / "short.pem", "1024 bits is too short"
    (tmp_path / "enc.pem").write_bytes(generate_private_key("ed25519").private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    yield tmp_path / "enc.pem", "encrypted"
    write_private_key(tmp_path / "ec.pem", ec.generate_private_key(ec.SECP256R1()))
    yield tmp_path / "ec.pem", "unsupported key type"
    public = generate_private_key("ed25519").public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    (tmp_path / "public.pem").write_bytes(public)
    yield tmp_path / "public.pem", "not a usable PEM"


def test_load_keys_refuses_bad_keys(tmp_path: Path) -> None:
    for path, fragment in _bad_keys(tmp_path):
        with pytest.raises(DkimKeyError) as info:
            load_keys([("example.com", "s1", path)])
        assert info.value.path == str(path)
        assert fragment in info.value.why, (path, info.value.why)
        assert str(path) in str(info.value)


def test_write_private_key_mode_and_no_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    write_private_key(path, generate_private_key("ed25519"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_private_key(path, generate_private_key("ed25519"))
    assert path.read_bytes() == before


# --- relay dkim keygen ---------------------------------------------------------------------

def _txt_value(printed: str) -> tuple[str, str]:
    """(owner name, the concatenated TXT value) from the printed zone entry."""
    owner = printed.split()[0]
    chunks = re.findall(r'"([^"]*)"', printed)
    assert all(len(c) <= 255 for c in chunks)
    return owner, "".join(chunks)


@pytest.mark.parametrize("algorithm", ["rsa", "ed25519"])
async def test_keygen_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                          algorithm: str) -> None:
    from relay.cli import main

    out_dir = tmp_path / "keys"
    assert main(["dkim", "keygen", "--domain", "Example.com", "--selector", "s2025",
                 "--algorithm", algorithm, "--out", str(out_dir)]) == 0
    path = out_dir / "example.com.s2025.pem"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    key = DkimKey.load("example.com", "s2025", path)
    assert key.algorithm == ("rsa-sha256" if algorithm == "rsa" else "ed25519-sha256")
    printed = capsys.readouterr().out
    owner, value = _txt_value(printed)
    assert owner == "s2025._domainkey.example.com."
    assert " IN TXT ( " in printed and printed.rstrip().endswith(")")
    assert value == key.txt_record()
    # The printed record is one a verifier accepts: sign and verify through DNS.
    async with LoopbackDNS({(owner, "TXT"): [value]}) as server:
        signed = Signer([key]).sign(SIMPLE)
        assert await dkimpy_results(signed, server.port) == [True]
    # Never overwrite.
    assert main(["dkim", "keygen", "--domain", "example.com", "--selector", "s2025",
                 "--algorithm", algorithm, "--out", str(out_dir)]) != 0
    assert "exists" in capsys.readouterr().err
    assert DkimKey.load("example.com", "s2025", path).public_key_b64() == key.public_key_b64()


def test_keygen_default_dir_beside_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    conf = tmp_path / "etc" / "relay.toml"
    conf.parent.mkdir()
    conf.write_text("")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv("RELAY_CONFIG", raising=False)
    # --config: dkim/ beside it.
    assert main(["dkim", "keygen", "--config", str(conf), "--domain", "a.example",
                 "--selector", "s1", "--algorithm", "ed25519"]) == 0
    assert (tmp_path / "etc" / "dkim" / "a.example.s1.pem").is_file()
    # $RELAY_CONFIG.
    monkeypatch.setenv("RELAY_CONFIG", str(conf))
    assert main(["dkim", "keygen", "--domain", "b.example", "--selector", "s1",
                 "--algorithm", "ed25519"]) == 0
    assert (tmp_path / "etc" / "dkim" / "b.example.s1.pem").is_file()
    # No config file anywhere: ./dkim.
    monkeypatch.delenv("RELAY_CONFIG")
    assert main(["dkim", "keygen", "--domain", "c.example", "--selector", "s1",
                 "--algorithm", "ed25519"]) == 0
    assert (work / "dkim" / "c.example.s1.pem").is_file()
    capsys.readouterr()


@pytest.mark.parametrize("args", [
    ["--domain", "bad domain", "--selector", "s1"],
    ["--domain", "example.com", "--selector", "s_1!"],
    ["--domain", "example.com", "--selector", "s1", "--bits", "1024"],
])
def test_keygen_refuses_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      args: list[str]) -> None:
    from relay.cli import main

    assert main(["dkim", "keygen", *args, "--out", str(tmp_path)]) != 0
    assert capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


async def test_loopback_dns_nxdomain_nodata_and_cname() -> None:
    """The loopback server's answers for unknown names, for known names without the asked
    type, and through an in-zone CNAME (used by the doctor tests too)."""
    import dns.resolver

    records: Records = {("example.com.", "MX"): [(10, "mx.example.com.")],
                        ("mx.example.com.", "A"): ["192.0.2.25"],
                        ("alias.example.com.", "CNAME"): ["mx.example.com."]}
    async with LoopbackDNS(records) as server:
        res = resolver(server.port)

        def lookups() -> None:
            answer = res.resolve("example.com", "MX")
            assert [(r.preference, r.exchange.to_text()) for r in answer] == [
                (10, "mx.example.com.")]
            assert [r.address for r in res.resolve("alias.example.com", "A")] == ["192.0.2.25"]
            with pytest.raises(dns.resolver.NoAnswer):
                res.resolve("example.com", "TXT")
            with pytest.raises(dns.resolver.NXDOMAIN):
                res.resolve("nothing.example.com", "TXT")

        await asyncio.to_thread(lookups)
        # The async twin works in the serving loop itself.
        answer = await async_resolver(server.port).resolve("mx.example.com", "A")
        assert [r.address for r in answer] == ["192.0.2.25"]


# --- the signing thread and the From fast path (issue 9) -------------------------------------

async def test_sign_async_gives_the_same_bytes_as_sign(keys: Keys, dns_server: LoopbackDNS,
                                                      tmp_path: Path) -> None:
    # RSA PKCS#1 v1.5 and Ed25519 are deterministic: same clock, same bytes.
    signer = Signer([keys.rsa, keys.ed], clock=lambda: T0)
    for message in (SIMPLE, UTF8, LONG, WHITESPACE, EMPTY_BODY, MULTIPART):
        threaded = await signer.sign_async(message)
        assert threaded == signer.sign(message)
    # Many at once from the loop (the thread pool serves them all, none mixed up).
    messages = [SIMPLE.replace(b"Subject: ", b"Subject: %d " % i) for i in range(40)]
    many = await asyncio.gather(*(signer.sign_async(m) for m in messages))
    assert many == [signer.sign(m) for m in messages]
    await assert_verifies(many[7], dns_server.port, tmp_path, 2)
    # No key for the From domain: unchanged (normalised); unsignable: the same error.
    assert await Signer([keys.rsa]).sign_async(b"From: a@nokey.test\n\nx\n") == \
        b"From: a@nokey.test\r\n\r\nx\r\n"
    with pytest.raises(DkimMessageError):
        await Signer([keys.rsa], fallback={"*": "example.com"}).sign_async(
            b" folded first\r\nFrom: a@example.com\r\n\r\nx\r\n")


FROM_VALUES = [
    b" news@example.com", b" <news@example.com>", b" News <news@Example.COM>",
    b' "News, Inc." <news@example.com>', b' "Bob \\"B\\"" <bob@example.com>',
    b" Bob.Smith <bob@example.com>", b" a@b.example, c@d.example",
    b" evil@attacker.example <news@example.com>", b" <evil@attacker.example>news@example.com",
    b" news@example.com (Newsletter)", b" (comment) news@example.com",
    b" Group: news@example.com;", b" <@route.example:news@example.com>",
    b" news@[192.0.2.1]", b" news@example.com.", b" news@ex_ample.com", b" news@-x.example",
    b" news@", b" @example.com", b" news", b"", b" ", b" <>", b" N\xc3\xa4me <n@example.com>",
    b" news@b\xc3\xbccher.example", b' "quoted local"@example.com',
    b" =?utf-8?q?News?= <news@example.com>", b" News <news@example.com> trailing",
    b" News\r\n <news@example.com>", b" News <news@example.com>\r\n extra",
    b"\tNews <news@example.com>", b" News <news@example.com> ", b" a..b@example.com",
    b" .a@example.com", b" news@example..com", b" News <news@example.com>>",
    b" News <<news@example.com>", b" <a@b.example> <c@d.example>",
]


@pytest.mark.parametrize("value", FROM_VALUES)
def test_from_domain_fast_path_equals_getaddresses(value: bytes) -> None:
    from relay.outbound.dkim import _from_domain, _from_domain_slow

    field = value + b"\r\n"
    assert _from_domain([[b"From", field]]) == _from_domain_slow(field)


def test_from_domain_fast_path_equals_getaddresses_on_corpus() -> None:
    from relay.outbound.dkim import _from_domain, _from_domain_slow, _split

    seen = 0
    for path in corpus():
        message = normalize_line_endings(path.read_bytes())
        try:
            headers, _ = _split(message)
        except DkimMessageError:
            continue
        for name, value in headers:
            if name.lower() == b"from":
                assert _from_domain([[name, value]]) == _from_domain_slow(value), path.name
                seen += 1
    assert seen >= 30


# The header check reads (and normalises) only the header section; what it decides must be
# what normalising the whole message first would decide.
_EOL_PIECES = [b"\r\n", b"\r", b"\n", b"\r\n\r\n", b"From: a@example.com", b"Subject: x",
               b" folded", b"body", b"x: y", b":", b" ", b"From MAILER-DAEMON"]


def _check_whole(message: bytes) -> str | None:
    from relay.outbound.dkim import _split, normalize_line_endings
    message = normalize_line_endings(message)
    end = message.find(b"\r\n\r\n")
    try:
        headers, _ = _split(message if end < 0 else message[:end + 4])
    except DkimMessageError as exc:
        return exc.why
    if not any(name.lower() == b"from" for name, _ in headers):
        return "no From"
    return None


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.sampled_from(_EOL_PIECES), max_size=14))
def test_check_reads_the_header_section_as_whole_normalisation_would(pieces) -> None:
    message = b"".join(pieces)
    try:
        check(message)
        got = None
    except DkimMessageError as exc:
        got = "no From" if "no From" in exc.why else exc.why
    assert got == _check_whole(message), message


async def test_remembered_header_canonicalisation(keys: Keys, dns_server: LoopbackDNS,
                                                  monkeypatch) -> None:
    """Copies of one message share all their fields but List-Unsubscribe: the signer keeps
    their relaxed canonical form. What it remembers is dkimpy's canonical form of exactly
    that field, and copies signed with a memo that hits, misses and fills verify."""
    import relay.outbound.dkim as dkim_mod
    from relay.outbound.dkim import _RELAXED, _split

    monkeypatch.setattr(dkim_mod, "_CANONICAL_MEMO", 8)
    shared = Signer([keys.rsa, keys.ed], clock=lambda: T0)
    messages = [b"List-Unsubscribe: <https://example.com/u/%d>\r\n" % i + MULTIPART
                for i in range(12)]
    messages += [SIMPLE, UTF8, WHITESPACE,
                 b"From: a@example.com\r\nSubject:  x \t y\r\n  folded\r\n\r\nbody\r\n"]
    signed = [shared.sign(m) for m in messages * 2]
    assert 0 < len(shared._canonical) <= 8
    for message in messages:
        for name, value in _split(message)[0]:
            assert shared._canonical_field(name, value) == tuple(
                _RELAXED.canonicalize_headers([(name, value)])[0])
    results = await asyncio.gather(*(dkimpy_results(m, dns_server.port) for m in signed))
    assert results == [[True, True]] * len(signed)


@settings(max_examples=1500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=12),
       st.lists(st.lists(st.sampled_from(_EOL_PIECES), max_size=6), min_size=4, max_size=4),
       st.lists(st.lists(st.sampled_from(_EOL_PIECES), max_size=6), min_size=4, max_size=4))
def test_signer_normalises_like_the_whole_message_with_a_remembered_body(
        picks, heads, bodies) -> None:
    """The signer skips the body part it last hashed; over sequences of messages made of a
    few header sections and bodies, the result is always normalize_line_endings'."""
    from relay.outbound.dkim import _split, normalize_line_endings

    signer = Signer([])
    for h, b in picks:
        message = b"".join(heads[h]) + b"\r\n\r\n" + b"".join(bodies[b])
        got = signer._normalised(message)
        assert got == normalize_line_endings(message), message
        try:
            body = _split(got)[1]
        except DkimMessageError:
            continue
        signer.body_hash(body)   # as _plan does next, for a message it signs
