"""VERP return paths (Variable Envelope Return Path): one bounce address per recipient.

Each recipient of a message gets its own envelope sender, `PREFIX+TOKEN@DOMAIN`, so a
bounce or complaint that comes back to that address names the message and the recipient
even when the report itself is unparsable, and a report whose token verifies can be
trusted: only the relay knows the secret.

The token
---------
A local part is at most 64 octets (RFC 5321 4.5.3.1.1) and recipients can be longer than
that, so the token cannot carry the recipient itself. It carries the queue ID and a MAC::

    TOKEN = lowercase base32, no padding ( queue_id (ASCII) || HMAC-SHA256(secret, data)[:10] )
    data  = b"relay-verp-1\\0" || queue_id || b"\\0" || canonical(recipient)

`canonical` lower-cases the recipient's domain and keeps its local part as written
(RFC 5321 2.4), so the same recipient written with `Example.NET` verifies too.

`verify` decodes the queue ID, asks the caller for the recipients of that queue ID (the
queue store knows them) and returns the one whose MAC matches: 80 bits of HMAC-SHA256
(NIST SP 800-107 5.3.3 allows truncation to that length; a forger has one guess per
report).

Why lowercase base32: its alphabet (a-z, 2-7) is all `atext`, so the local part is a
plain dot-atom (RFC 5321 4.1.2) that needs no quoting, and it survives MTAs that fold
local parts to lower (or upper) case, which base64 does not. A 14-character queue ID
gives a 47-octet local part with the default prefix.

Secrets rotate: pass the retired ones as `previous`; tokens made with them still verify
while bounces for old mail trickle in (up to the queue lifetime plus a few days).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable

__all__ = ["MAC_BYTES", "MAX_LOCAL_PART", "Verp"]

MAC_BYTES = 10          # 80 bits of HMAC-SHA256
MAX_LOCAL_PART = 64     # RFC 5321 4.5.3.1.1
_CONTEXT = b"relay-verp-1\0"
_PREFIX_RE = re.compile(r"[a-z0-9](?:[a-z0-9_-]*[a-z0-9])?")   # a safe atom
_QUEUE_ID_RE = re.compile(r"[!-~]+")                            # printable ASCII, no space
_DOMAIN_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")


def _canonical(recipient: str) -> bytes:
    """The recipient as MAC'd: domain lower-cased, local part as written."""
    local, at, domain = recipient.strip().strip("<>").rpartition("@")
    text = f"{local}@{domain.lower()}" if at else recipient.strip()
    return text.encode("utf-8", "surrogateescape")


class Verp:
    """Makes and checks VERP return paths `prefix+TOKEN@domain` (see the module docstring).

    `secret`: the HMAC key (at least 16 bytes); `previous`: retired keys that still verify.
    """

    def __init__(self, secret: bytes, *, prefix: str = "bounces", domain: str,
                 previous: Iterable[bytes] = ()) -> None:
        if len(secret) < 16:
            raise ValueError("VERP secret must be at least 16 bytes")
        prefix = prefix.lower()
        if not _PREFIX_RE.fullmatch(prefix):
            raise ValueError(f"bad VERP prefix {prefix!r}")
        domain = domain.lower().rstrip(".")
        if not _DOMAIN_RE.fullmatch(domain):
            raise ValueError(f"bad VERP domain {domain!r}")
        self.prefix = prefix
        self.domain = domain
        self._secrets = [bytes(secret), *(bytes(s) for s in previous)]
        # prefix "+" token <= 64 octets; base32 turns 5 bytes into 8 characters.
        room = MAX_LOCAL_PART - len(prefix) - 1
        self.max_queue_id = room * 5 // 8 - MAC_BYTES

    @staticmethod
    def _mac(secret: bytes, queue_id: str, recipient: str) -> bytes:
        data = _CONTEXT + queue_id.encode("ascii") + b"\0" + _canonical(recipient)
        return hmac.new(secret, data, hashlib.sha256).digest()[:MAC_BYTES]

    def token(self, queue_id: str, recipient: str) -> str:
        """The TOKEN part for one (queue ID, recipient)."""
        if not _QUEUE_ID_RE.fullmatch(queue_id):
            raise ValueError(f"queue ID {queue_id!r} is not printable ASCII")
        if len(queue_id) > self.max_queue_id:
            raise ValueError(f"queue ID {queue_id!r} too long for a {MAX_LOCAL_PART}-octet "
                             f"local part (at most {self.max_queue_id} characters)")
        raw = queue_id.encode("ascii") + self._mac(self._secrets[0], queue_id, recipient)
        return base64.b32encode(raw).decode("ascii").rstrip("=").lower()

    def return_path(self, queue_id: str, recipient: str) -> str:
        """`prefix+TOKEN@domain`: the envelope sender for this recipient's copy."""
        return f"{self.prefix}+{self.token(queue_id, recipient)}@{self.domain}"

    def queue_id(self, address: str) -> str | None:
        """The queue ID an address of ours claims to be about, NOT verified; None if the
        address is not one of ours or does not decode. Lets the SMTP listener accept RCPT
        for well-formed VERP addresses before the report arrives."""
        parsed = self._decode(address)
        return parsed[0] if parsed else None

    def _decode(self, address: str) -> tuple[str, bytes] | None:
        """(queue ID, MAC) from an address of ours; None if it is not one."""
        if not isinstance(address, str):
            return None
        # Case-insensitive throughout: some MTAs fold local parts (the token is base32).
        local, at, domain = address.strip().strip("<>").rpartition("@")
        if not at or domain.lower().rstrip(".") != self.domain:
            return None
        head, plus, token = local.lower().partition("+")
        if not plus or head != self.prefix or not token or len(local) > MAX_LOCAL_PART:
            return None
        try:
            raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
        except (binascii.Error, ValueError):
            return None
        # Only the canonical encoding: the last character's unused bits must be zero, so
        # each (queue ID, MAC) has exactly one token.
        if len(raw) <= MAC_BYTES or base64.b32encode(raw).decode().rstrip("=") != token.upper():
            return None
        try:
            queue_id = raw[:-MAC_BYTES].decode("ascii")
        except UnicodeDecodeError:
            return None
        if not _QUEUE_ID_RE.fullmatch(queue_id):
            return None
        return queue_id, raw[-MAC_BYTES:]

    def verify(self, address: str,
               candidates: Callable[[str], list[str]]) -> tuple[str, str] | None:
        """(queue ID, recipient) if `address` is a VERP address of ours whose MAC matches
        one of `candidates(queue_id)` (the recipients the relay knows for that queue ID),
        else None. Never raises on a malformed address; a queue ID the caller no longer
        knows (candidates returns []) gives None."""
        parsed = self._decode(address)
        if parsed is None:
            return None
        queue_id, mac = parsed
        for recipient in candidates(queue_id):
            for secret in self._secrets:
                if hmac.compare_digest(mac, self._mac(secret, queue_id, recipient)):
                    return queue_id, recipient
        return None
