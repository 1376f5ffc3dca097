"""DKIM signing (RFC 6376, RFC 8463 for Ed25519) of the bytes the relay is about to send.

The scheduler renders a message per recipient (List-Unsubscribe, VERP, ...) and calls
`Signer.sign` LAST; nothing changes the bytes afterwards but the prepended signatures
(DESIGN.md invariant 4).

Two paths produce the same kind of signature (relaxed/relaxed, the same h= list):

* the fast path (default) reuses dkimpy's canonicalisation and header hashing
  (`dkim.canonicalization`, `dkim.hash_headers`) but does the private-key operation with
  the `cryptography` package on a key object parsed once, and reuses the body hash when
  the same body is signed for several recipients in a row. dkimpy's own RSA is pure
  Python and re-parses the PEM on every call (8-11 ms per RSA-2048 signature, the event
  loop blocked meanwhile), see STYLE.md "Traps".
* `Signer(..., fast=False)` calls `dkim.sign` itself; kept for comparison and tests.

Input is defensively normalised to CRLF first: dkimpy hashes a bare CR as an ordinary byte
while the wire turns it into CRLF (case 02), so the bytes signed must be the bytes sent.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import CanonicalizationPolicy

from relay.replies import R550_BAD_HEADER, Reply

__all__ = [
    "ALGORITHMS",
    "MIN_RSA_BITS",
    "OVERSIGNED_HEADERS",
    "SIGNED_HEADERS",
    "DkimKey",
    "DkimKeyError",
    "DkimMessageError",
    "Signer",
    "can_sign",
    "check",
    "generate_private_key",
    "load_keys",
    "normalize_line_endings",
    "relaxed_body",
    "txt_zone_entry",
    "valid_name",
    "write_private_key",
]

ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
MIN_RSA_BITS = 2048  # RFC 8301 3.2: at least 1024, SHOULD be 2048; we require 2048.

# The fields we sign when present (RFC 6376 5.4.1 recommends most of these). Feedback-ID and
# List-Unsubscribe(-Post) are added by the relay itself and must be covered (invariant 4).
SIGNED_HEADERS: tuple[str, ...] = (
    "from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
    "content-transfer-encoding", "reply-to", "list-unsubscribe", "list-unsubscribe-post",
    "feedback-id",
)
# RFC 6376 8.15: listing a field once more than it occurs signs a "null" instance, so a
# second one added in transit breaks the signature. From decides DMARC alignment; a forged
# List-Unsubscribe(-Post) would send one-click unsubscribes somewhere else (RFC 8058 4).
OVERSIGNED_HEADERS = frozenset({"from", "list-unsubscribe", "list-unsubscribe-post"})

_RELAXED = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")
_EOL = re.compile(rb"\r\n|\r|\n")
# dkimpy's rfc822_parse takes the field name up to the first colon, printable US-ASCII only
# (RFC 5322 2.2: ftext is %d33-57 / %d59-126).
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_DOMAIN_RE = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_FOLD_AT = 76  # RFC 5322 2.1.1: lines SHOULD stay within 78 characters


class DkimKeyError(Exception):
    """A configured key cannot be used: a configuration fault, the relay refuses to start."""

    def __init__(self, path: str | os.PathLike[str], why: str):
        super().__init__(f"{path}: {why}")
        self.path = str(path)
        self.why = why


class DkimMessageError(Exception):
    """The message cannot be signed as it stands: a property of the message (5.6.0).

    `reply` is what the edge answers at the end of DATA.
    """

    reply: Reply = R550_BAD_HEADER

    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


# --- keys --------------------------------------------------------------------------------

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


def _ascii_domain(domain: str) -> str:
    """Lower-case A-label form (d= is ASCII, RFC 6376 3.5 / RFC 8616)."""
    domain = domain.strip().rstrip(".").lower()
    try:
        domain.encode("ascii")
    except UnicodeEncodeError:
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            return domain
    return domain


@dataclass(frozen=True, eq=False)
class DkimKey:
    """One signing key: the d= domain, the s= selector and the parsed private key."""

    domain: str
    selector: str
    algorithm: str
    private_key: PrivateKey = field(repr=False)
    path: Path | None = None

    @classmethod
    def from_pem(cls, domain: str, selector: str, pem: bytes,
                 path: str | os.PathLike[str] | None = None) -> DkimKey:
        """Parse a PEM private key (RSA PKCS#1 or PKCS#8, Ed25519 PKCS#8)."""
        where = str(path) if path is not None else f"{selector}._domainkey.{domain}"
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except TypeError:
            raise DkimKeyError(where, "the key is encrypted; give an unencrypted PEM") from None
        except (ValueError, UnsupportedAlgorithm) as exc:
            raise DkimKeyError(where, f"not a usable PEM private key ({exc})") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < MIN_RSA_BITS:
                raise DkimKeyError(where, f"RSA key of {key.key_size} bits is too short: "
                                          f"at least {MIN_RSA_BITS} (RFC 8301)")
            algorithm = "rsa-sha256"
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            algorithm = "ed25519-sha256"
        else:
            raise DkimKeyError(where, f"unsupported key type {type(key).__name__}: "
                                      "DKIM signs with RSA or Ed25519")
        if not selector or not _DOMAIN_RE.fullmatch(selector):
            raise DkimKeyError(where, f"bad selector {selector!r}")
        return cls(_ascii_domain(domain), selector, algorithm, key,
                   Path(path) if path is not None else None)

    @classmethod
    def load(cls, domain: str, selector: str, path: str | os.PathLike[str]) -> DkimKey:
        """Read and parse a PEM file; DkimKeyError if unreadable or unusable."""
        try:
            pem = Path(path).read_bytes()
        except OSError as exc:
            raise DkimKeyError(path, f"cannot read: {exc.strerror or exc}") from None
        return cls.from_pem(domain, selector, pem, path)

    @property
    def key_type(self) -> str:
        """The k= tag value: "rsa" or "ed25519"."""
        return "rsa" if self.algorithm == "rsa-sha256" else "ed25519"

    @property
    def bits(self) -> int:
        """Key size in bits (256 for Ed25519)."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return self.private_key.key_size
        return 256

    def public_key_bytes(self) -> bytes:
        """What p= carries, decoded: DER SubjectPublicKeyInfo for RSA (RFC 6376 3.6.1),
        the raw 32-byte key for Ed25519 (RFC 8463 4)."""
        pub = self.private_key.public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return pub.public_bytes(serialization.Encoding.DER,
                                serialization.PublicFormat.SubjectPublicKeyInfo)

    def public_key_b64(self) -> str:
        """The p= value."""
        return base64.b64encode(self.public_key_bytes()).decode("ascii")

    def txt_record(self) -> str:
        """The TXT record value to publish at `selector._domainkey.domain`."""
        return f"v=DKIM1; k={self.key_type}; p={self.public_key_b64()}"

    @property
    def dns_name(self) -> str:
        """`selector._domainkey.domain.` (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}."

    def dkimpy_private_key(self) -> bytes:
        """The key in the form dkimpy's `dkim.sign` wants: PKCS#1 PEM for RSA (its parser
        reads RSAPrivateKey only), the base64 32-byte seed for Ed25519."""
        if isinstance(self.private_key, ed25519.Ed25519PrivateKey):
            seed = self.private_key.private_bytes(serialization.Encoding.Raw,
                                                  serialization.PrivateFormat.Raw,
                                                  serialization.NoEncryption())
            return base64.b64encode(seed)
        return self.private_key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.TraditionalOpenSSL,
                                              serialization.NoEncryption())


def valid_name(name: str) -> bool:
    """True for a DNS host name / selector of LDH labels (RFC 1035 2.3.1, RFC 6376 3.1)."""
    return bool(_DOMAIN_RE.fullmatch(name))


def load_keys(entries: Iterable[Any]) -> list[DkimKey]:
    """Load every configured key: (domain, selector, path) tuples or `DkimKeyConfig`s.

    Raises DkimKeyError on the first unreadable, invalid or too-short key: the relay
    refuses to start rather than send unsigned mail.
    """
    keys = []
    for entry in entries:
        if hasattr(entry, "key") and hasattr(entry, "selector"):
            domain, selector, path = entry.domain, entry.selector, entry.key
        else:
            domain, selector, path = entry
        keys.append(DkimKey.load(domain, selector, path))
    return keys


def generate_private_key(algorithm: str = "rsa", bits: int = 2048) -> PrivateKey:
    """A new key: algorithm "rsa" (bits >= 2048) or "ed25519"."""
    if algorithm == "rsa":
        if bits < MIN_RSA_BITS:
            raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits")
        return rsa.generate_private_key(public_exponent=65537, key_size=bits)
    if algorithm == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown algorithm {algorithm!r}: use rsa or ed25519")


def write_private_key(path: str | os.PathLike[str], key: PrivateKey) -> None:
    """Write `key` as unencrypted PKCS#8 PEM, mode 0600; FileExistsError if `path` exists
    (O_EXCL: an existing key is never overwritten, even by a race)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask may only remove bits; say it exactly anyway
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)


def txt_zone_entry(key: DkimKey) -> str:
    """The zone-file line to publish, the value split into 255-octet strings
    (RFC 1035 3.3.14: one character-string holds at most 255 octets; RFC 6376 3.6.2.2:
    the strings are concatenated)."""
    value = key.txt_record()
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)]
    quoted = "\n\t".join(f'"{chunk}"' for chunk in chunks)
    return f"{key.dns_name} IN TXT ( {quoted} )"


# --- message handling --------------------------------------------------------------------

def normalize_line_endings(message: bytes) -> bytes:
    """Every bare CR, bare LF and CRLF becomes CRLF, and the message ends with CRLF.

    This is the form the wire carries; dkimpy would otherwise hash a bare CR as an
    ordinary byte (STYLE.md "Traps", case 02). Three C-speed counts skip the rewrite for
    the usual, already-clean message.
    """
    lf = message.count(b"\n")
    if not (lf == message.count(b"\r") == message.count(b"\r\n")):
        message = _EOL.sub(b"\r\n", message)
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message


def _split(message: bytes) -> tuple[list[list[bytes]], bytes]:
    """(header fields, body) of a CRLF message, as `dkim.rfc822_parse` returns them
    (each value with its folding and trailing CRLF), without splitting the body into lines.

    Stricter than dkimpy where dkimpy is lax: a continuation line before the first field
    (dkimpy: IndexError) and a line without a colon (dkimpy silently drops an mbox
    "From " line, which would then travel unsigned) are refused.
    """
    if message.startswith(b"\r\n"):
        block, body = b"", message[2:]
    else:
        end = message.find(b"\r\n\r\n")
        if end < 0:
            block, body = message, b""
        else:
            block, body = message[:end + 2], message[end + 4:]
    headers: list[list[bytes]] = []
    for line in block.split(b"\r\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise DkimMessageError("the header section starts with a continuation line")
            headers[-1][1] += line + b"\r\n"
            continue
        m = _FIELD_NAME.match(line)
        if m is None:
            raise DkimMessageError(
                f"malformed header line {line[:40]!r} (RFC 5322 2.2)")
        headers.append([line[:m.end() - 1], line[m.end():] + b"\r\n"])
    return headers, body


# The usual From value, one line: `Name <local@domain>`, `"Name" <local@domain>` or
# `local@domain`, nothing a parser could read two ways (no comma, comment, group, quote
# inside the name, route, folding). Anything else goes to email.utils.getaddresses; a test
# holds both to the same answer over a table of odd values.
_SIMPLE_FROM = re.compile(
    rb"[ \t]*(?:(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~. \t-]*|\"[^\"\\\r\n]*\")[ \t]*"
    rb"<[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
    rb"|[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*))[ \t]*\r\n")


def _from_domain(headers: list[list[bytes]]) -> str | None:
    """The domain of the first mailbox of the first From field (DMARC's RFC5322.From)."""
    for name, value in headers:
        if name.lower() == b"from":
            m = _SIMPLE_FROM.fullmatch(value)
            if m is not None:
                return (m.group(1) or m.group(2)).decode("ascii").lower()
            return _from_domain_slow(value)
    return None


def _from_domain_slow(value: bytes) -> str | None:
    """`_from_domain` through email.utils.getaddresses, for any From value."""
    text = _EOL.sub(b"", value).decode("utf-8", "replace")
    for _, addr in getaddresses([text]):
        if "@" in addr:
            return _ascii_domain(addr.rpartition("@")[2])
    return None


def check(message: bytes) -> None:
    """Raise DkimMessageError if the message (after line-ending normalisation) cannot be
    signed: a malformed header section or no From field (RFC 6376 5.4: From MUST be
    signed). Reads the header section only; cheap enough for the end of DATA."""
    # Only the header section is read, so only it is normalised: the part up to the first
    # CRLF CRLF as sent holds the header section of the normalised message too (the
    # rewrite of a bare CR or LF only ever moves that end earlier).
    end = message.find(b"\r\n\r\n")
    head = normalize_line_endings(message if end < 0 else message[:end + 4])
    end = head.find(b"\r\n\r\n")
    headers, _ = _split(head if end < 0 else head[:end + 4])
    if not any(name.lower() == b"from" for name, _ in headers):
        raise DkimMessageError("no From header field (RFC 5322 3.6, RFC 6376 5.4)")


def can_sign(message: bytes) -> bool:
    """True if `check` finds nothing wrong."""
    try:
        check(message)
    except DkimMessageError:
        return False
    return True


def relaxed_body(body: bytes) -> bytes:
    """The "relaxed" body canonicalisation of a CRLF body (RFC 6376 3.4.4), equal to
    dkimpy's `Relaxed.canonicalize_body` (a test holds them equal) but several times
    faster: dkimpy's regular expressions start a match at every space of the text, these
    C-speed replaces run only when there is something to change, in O(n log run) time."""
    if b"\t" in body:
        body = body.replace(b"\t", b" ")
    while b"  " in body:                          # b. a WSP run becomes one SP
        body = body.replace(b"  ", b" ")          # (each pass halves every run)
    if b" \r\n" in body:
        body = body.replace(b" \r\n", b"\r\n")    # a. WSP at the end of a line goes
    # c. empty lines at the end go; a non-empty body ends with CRLF; an empty one is empty.
    end = len(body.rstrip(b"\r\n"))
    if body[end:] != b"\r\n" * ((len(body) - end) // 2):
        # Not only CRLF pairs at the end (a body that was not normalised): pair by pair.
        end = len(body)
        while body.endswith(b"\r\n", 0, end):
            end -= 2
    if end == 0:
        return b""
    if end == len(body) - 2:
        return body
    return body[:end] + b"\r\n"


def _include_headers(headers: list[list[bytes]]) -> list[bytes]:
    """The h= list: each signed field as many times as it occurs, over-signed fields once
    more; fields absent and not over-signed are left out."""
    counts: dict[bytes, int] = {}
    for name, _ in headers:
        lname = name.lower()
        counts[lname] = counts.get(lname, 0) + 1
    include = []
    for name in SIGNED_HEADERS:
        n = counts.get(name.encode(), 0) + (1 if name in OVERSIGNED_HEADERS else 0)
        include.extend([name.encode()] * n)
    return include


def _fold(tags: list[bytes], first: int) -> bytes:
    """Join tag=value items with "; ", folding (CRLF SP) between items and inside h= at its
    colons so that lines stay short; RFC 6376 3.2 allows FWS around tags and h= colons."""
    out = bytearray()
    col = first
    for index, tag in enumerate(tags):
        piece = tag + (b";" if index < len(tags) - 1 else b"")
        parts = [piece]
        if tag.startswith(b"h=") and col + len(piece) + 1 > _FOLD_AT:
            names = piece.split(b":")
            parts = [n + b":" for n in names[:-1]] + [names[-1]]
        for j, part in enumerate(parts):
            sep = b" " if j == 0 and index > 0 else b""
            if col + len(sep) + len(part) > _FOLD_AT and col > 1:
                out += b"\r\n "
                col = 1
                sep = b""
            out += sep + part
            col += len(sep) + len(part)
    return bytes(out)


def _fold_b(value: bytes) -> bytes:
    """The b= value in 70-character pieces (FWS inside b= is ignored, RFC 6376 3.5)."""
    return b"\r\n ".join(value[i:i + 70] for i in range(0, len(value), 70))


# --- the signer --------------------------------------------------------------------------

@dataclass(frozen=True)
class _Pending:
    """One signature to make: the key, the field value up to "b=", the digest to sign."""

    key: DkimKey
    value: bytes
    digest: bytes
    include: list[bytes]


def _raw_sign(pk: PrivateKey, digest: bytes) -> bytes:
    if isinstance(pk, rsa.RSAPrivateKey):
        return pk.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    return pk.sign(digest)  # RFC 8463 3: Ed25519 over the SHA-256 hash


def _assemble(message: bytes, plan: list[_Pending], raws: list[bytes]) -> bytes:
    return b"".join(b"DKIM-Signature:" + p.value + _fold_b(base64.b64encode(raw)) + b"\r\n"
                    for p, raw in zip(plan, raws, strict=True)) + message


_executor: concurrent.futures.ThreadPoolExecutor | None = None
_CANONICAL_MEMO = 4096   # header fields remembered by a Signer (then forgotten all at once)


def _sign_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The RSA signing threads, one per core, made on first use (idle threads cost nothing)."""
    global _executor
    if _executor is None:
        _executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="dkim-sign")
    return _executor



class Signer:
    """Signs messages with the keys of their From domain (DMARC alignment).

    `keys`: every configured key; several for one domain sign it several times (dual
    signing, e.g. RSA and Ed25519, RFC 8463 6). `fallback` maps a From domain that has no
    key of its own to the domain whose keys sign it (a subdomain to its organisational
    domain keeps DMARC's relaxed alignment); "*" is the default for any domain.
    `fast=False` signs through dkimpy's own `dkim.sign` (slow; for comparison). `clock`
    gives t= (RFC 6376 3.5), passed in so tests control it.
    """

    def __init__(self, keys: Iterable[DkimKey], *, fallback: dict[str, str] | None = None,
                 fast: bool = True, clock: Callable[[], float] = time.time):
        self.keys = list(keys)
        self.fallback = {_ascii_domain(k) if k != "*" else k: _ascii_domain(v)
                         for k, v in (fallback or {}).items()}
        self.fast = fast
        self.clock = clock
        self._by_domain: dict[str, list[DkimKey]] = {}
        for key in self.keys:
            self._by_domain.setdefault(key.domain, []).append(key)
        # LRU of one: the last body and its relaxed SHA-256 body hash. The scheduler renders
        # one message per recipient with different headers and the same body.
        self._last_body: tuple[bytes, bytes] | None = None
        # Relaxed canonical form of header fields already seen: the copies of one message
        # share all their fields but List-Unsubscribe (regular expressions per field, about
        # a quarter of the work of a copy's signature apart from the RSA operation).
        self._canonical: dict[tuple[bytes, bytes], tuple[bytes, bytes]] = {}
        self._last_folded: tuple[tuple[bytes, ...], bytes] | None = None

    @property
    def domains(self) -> frozenset[str]:
        """Domains that have at least one key."""
        return frozenset(self._by_domain)

    def keys_for(self, from_domain: str | None, fallback_domain: str | None = None,
                 ) -> list[DkimKey]:
        """The keys that sign mail whose From domain is `from_domain`: its own keys, else
        `fallback[from_domain]`'s, else `fallback_domain`'s, else `fallback["*"]`'s."""
        candidates = []
        if from_domain:
            from_domain = _ascii_domain(from_domain)
            candidates += [from_domain, self.fallback.get(from_domain)]
        if fallback_domain:
            candidates.append(_ascii_domain(fallback_domain))
        candidates.append(self.fallback.get("*"))
        for domain in candidates:
            if domain and domain in self._by_domain:
                return self._by_domain[domain]
        return []

    def sign(self, message: bytes, *, fallback_domain: str | None = None) -> bytes:
        """The message, line endings normalised, with one DKIM-Signature field per key of
        its From domain prepended (the first key's topmost). Unchanged (but normalised) if
        no key applies. DkimMessageError if the message cannot be signed."""
        message, plan = self._plan(message, fallback_domain)
        if not plan:
            return message
        if not self.fast:
            include = plan[0].include
            return b"".join(self._sign_dkimpy(p.key, message, include) for p in plan) + message
        return _assemble(message, plan, [_raw_sign(p.key.private_key, p.digest) for p in plan])

    async def sign_async(self, message: bytes, *, fallback_domain: str | None = None) -> bytes:
        """`sign`, with the RSA private-key operations on a worker thread: OpenSSL drops
        the GIL while it signs, so the event loop goes on serving sessions on the other
        core. Ed25519 (tens of microseconds) stays inline. Same bytes as `sign`."""
        if not self.fast:
            return self.sign(message, fallback_domain=fallback_domain)
        message, plan = self._plan(message, fallback_domain)
        if not plan:
            return message
        loop = asyncio.get_running_loop()
        raws = []
        for p in plan:
            if isinstance(p.key.private_key, rsa.RSAPrivateKey):
                raws.append(await loop.run_in_executor(
                    _sign_executor(), _raw_sign, p.key.private_key, p.digest))
            else:
                raws.append(_raw_sign(p.key.private_key, p.digest))
        return _assemble(message, plan, raws)

    def _plan(self, message: bytes, fallback_domain: str | None,
              ) -> tuple[bytes, list[_Pending]]:
        """The normalised message and, per key that signs it, the DKIM-Signature value
        without b= and the digest to sign (fast path) — empty when no key applies."""
        message = self._normalised(message)
        headers, body = _split(message)
        keys = self.keys_for(_from_domain(headers), fallback_domain)
        if not keys:
            return message, []
        if not any(name.lower() == b"from" for name, _ in headers):
            raise DkimMessageError("no From header field (RFC 5322 3.6, RFC 6376 5.4)")
        include = _include_headers(headers)
        if not self.fast:
            return message, [_Pending(key, b"", b"", include) for key in keys]
        return message, self._digests(keys, headers, body, include)

    def body_hash(self, body: bytes) -> bytes:
        """bh= (base64) of a body under relaxed canonicalisation, SHA-256 (RFC 6376 3.7);
        the last body's hash is reused."""
        last = self._last_body
        if last is not None and last[0] == body:
            return last[1]
        bh = base64.b64encode(hashlib.sha256(relaxed_body(body)).digest())
        self._last_body = (body, bh)
        return bh

    def _normalised(self, message: bytes) -> bytes:
        """`normalize_line_endings(message)`, the body part skipped when it is the body
        last hashed (the copies of a message differ in their headers only: three
        counts over a 50 KB body cost ~60 us a copy). The cut after the first CRLF CRLF
        splits no CRLF, so normalising the parts gives the normalised whole."""
        end = message.find(b"\r\n\r\n")
        if end < 0:
            return normalize_line_endings(message)
        body = message[end + 4:]
        # The body whose hash body_hash keeps came out of a normalised message: clean.
        last = self._last_body
        if (last is None or last[0] != body) and normalize_line_endings(body) is not body:
            return normalize_line_endings(message)
        head = message[:end + 4]
        normal_head = normalize_line_endings(head)
        return message if normal_head is head else normal_head + body

    def _canonical_field(self, name: bytes, value: bytes) -> tuple[bytes, bytes]:
        """dkimpy's relaxed canonicalisation of one field (RFC 6376 3.4.2), remembered."""
        key = (name, value)
        found = self._canonical.get(key)
        if found is None:
            found = tuple(_RELAXED.canonicalize_headers([key])[0])
            if len(self._canonical) >= _CANONICAL_MEMO:
                self._canonical.clear()
            self._canonical[key] = found
        return found

    def _folded(self, tags: list[bytes]) -> bytes:
        """The DKIM-Signature value up to "b=", folded; the last one is remembered (the
        copies of a message, signed within the same second, have the same tags)."""
        key = tuple(tags)
        last = self._last_folded
        if last is not None and last[0] == key:
            return last[1]
        value = b" " + _fold(tags, len("DKIM-Signature: ")) + b";\r\n b="
        self._last_folded = (key, value)
        return value

    def _digests(self, keys: list[DkimKey], headers: list[list[bytes]], body: bytes,
                 include: list[bytes]) -> list[_Pending]:
        bh = self.body_hash(body)
        canon = [self._canonical_field(name, value) for name, value in headers]
        t = str(int(self.clock())).encode("ascii")
        h_value = b":".join(include)
        out = []
        for key in keys:
            tags = [b"v=1", b"a=" + key.algorithm.encode(), b"c=relaxed/relaxed",
                    b"d=" + key.domain.encode(), b"s=" + key.selector.encode(), b"t=" + t,
                    b"h=" + h_value, b"bh=" + bh]
            value = self._folded(tags)
            # RFC 6376 3.7: hash the signed fields, then this field with b= empty and
            # without its trailing CRLF; dkimpy's hash_headers does exactly that.
            hasher = hashlib.sha256()
            dkim.hash_headers(hasher, _RELAXED, canon, list(include),
                              (b"DKIM-Signature", value), None)
            out.append(_Pending(key, value, hasher.digest(), include))
        return out

    def _sign_dkimpy(self, key: DkimKey, message: bytes, include: list[bytes]) -> bytes:
        try:
            return dkim.sign(message, key.selector.encode(), key.domain.encode(),
                             key.dkimpy_private_key(), canonicalize=(b"relaxed", b"relaxed"),
                             signature_algorithm=key.algorithm.encode(),
                             include_headers=include)
        except dkim.MessageFormatError as exc:
            raise DkimMessageError(str(exc)) from None
