"""List-Unsubscribe (RFC 2369) with one-click (RFC 8058): tokens, header lines, placement.

Three parts, each pure:

- `Tokens` makes and verifies the opaque, hard-to-forge component of the unsubscribe URIs
  (RFC 8058 3.1: "The URI SHOULD include an opaque identifier or another hard-to-forge
  component"). A token is stateless: the recipient, the scope and the queue ID travel inside
  it, signed with HMAC-SHA256, so the HTTP listener needs no table of issued links.
- `unsubscribe_headers` renders the two header lines for one recipient.
- `apply_unsubscribe` puts them into a message, replacing, keeping or merging with what the
  application wrote.

The token is signed, not encrypted: anyone holding the link can read the recipient address
out of it. That is the recipient's own address in the recipient's own message; the signature
is what matters, since it stops a third party from unsubscribing somebody else.

The mailto URI carries the token in its subject (RFC 6068 2: `?subject=`), not in its local
part. A token for a real address is ~90 characters, longer than the 64 octets RFC 5321
4.5.3.1.1 allows a local part, and an MTA on the way may fold the case of a local part, which
base64 does not survive. `mailto:unsubscribe@DOMAIN?subject=unsubscribe%20TOKEN` has no such
limits; `token_from_subject` gets the token back out of the reply.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

# Token layout (all integers big-endian):
#   version (1 octet) | issued-at (uint32, Unix seconds) |
#   len (1 octet) recipient | len scope | len queue_id  (UTF-8) | tag (16 octets)
# The tag is HMAC-SHA256(secret, _MAC_CONTEXT + everything before it), truncated to 128 bits:
# no forging or guessing below 2**128 work, and the token stays short enough for a URL.
TOKEN_VERSION = 1
TAG_SIZE = 16
FIELD_MAX = 255  # one length octet; RFC 5321 4.5.3.1.3 caps a path at 256 octets anyway
SECRET_MIN = 16  # 128 bits: an HMAC key shorter than the tag would be the weak link
CLOCK_SKEW = 300.0  # seconds a token may come from the future (several nodes' clocks)
_MAC_CONTEXT = b"relay/unsubscribe\x00"  # the same secret, used elsewhere, never collides
_HEAD = struct.Struct(">BI")
_MIN_RAW = _HEAD.size + 3 + TAG_SIZE
# The longest possible token, in base64 characters: anything longer is rejected unread.
MAX_TOKEN_CHARS = -(-(_HEAD.size + 3 * (1 + FIELD_MAX) + TAG_SIZE) * 4 // 3)
_TOKEN_CHARS = re.compile(r"[A-Za-z0-9_-]+")

# RFC 8058 3.1: "The List-Unsubscribe-Post header MUST contain the single key/value pair
# List-Unsubscribe=One-Click".
ONE_CLICK_KEY = "List-Unsubscribe"
ONE_CLICK_VALUE = "One-Click"
LIST_UNSUBSCRIBE = "List-Unsubscribe"
LIST_UNSUBSCRIBE_POST = "List-Unsubscribe-Post"
MODES = ("replace", "keep", "merge")

# RFC 5322 2.1.1: lines SHOULD be at most 78 characters and MUST be at most 998, excluding
# the CRLF.
FOLD_AT = 78
LINE_MAX = 998

_CRLF = b"\r\n"
_WSP = b" \t"
# URIs we write ourselves: RFC 3986 characters without ',' (RFC 2369 2: a literal comma in a
# URL must be encoded, as the comma separates the list) and without '<', '>', space, controls.
_URI_SAFE = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+;=%]+")
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
# RFC 2369 2: the URLs are enclosed in angle brackets; anything outside them (comments,
# whitespace, commas) is not a URL.
_BRACKETED = re.compile(rb"<([^<>]*)>")
_SUBJECT_TOKEN = re.compile(r"(?i:\bunsubscribe)\s+([A-Za-z0-9_-]{16,})")


@dataclass(frozen=True)
class TokenData:
    """What a verified token says: whom to unsubscribe, from what, and which message."""

    recipient: str
    scope: str  # "global", or a sending domain or list name (relay.suppression)
    queue_id: str
    issued_at: int  # Unix seconds


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Tokens:
    """Makes and verifies unsubscribe tokens, keyed by `secret`, valid for `lifetime` s."""

    def __init__(self, secret: bytes, *, lifetime: float,
                 clock: Callable[[], float] = time.time) -> None:
        if not isinstance(secret, bytes | bytearray) or len(secret) < SECRET_MIN:
            raise ValueError(f"the unsubscribe secret must be at least {SECRET_MIN} bytes")
        if not lifetime > 0:
            raise ValueError("the token lifetime must be positive")
        self._secret = bytes(secret)
        self.lifetime = float(lifetime)
        self._clock = clock

    def _tag(self, payload: bytes) -> bytes:
        return hmac.new(self._secret, _MAC_CONTEXT + payload, hashlib.sha256).digest()[:TAG_SIZE]

    def make(self, recipient: str, scope: str, queue_id: str,
             now: float | None = None) -> str:
        """A token for (recipient, scope, queue_id), issued at `now` (default: the clock).

        Raises ValueError when a field is empty (recipient, scope), not encodable as UTF-8,
        or longer than 255 octets, or when `now` does not fit in 32 unsigned bits.
        """
        issued = int(self._clock() if now is None else now)
        if not 0 <= issued <= 0xFFFFFFFF:
            raise ValueError(f"issue time {issued} does not fit the token")
        if not recipient or not scope:
            raise ValueError("a token needs a recipient and a scope")
        parts = [_HEAD.pack(TOKEN_VERSION, issued)]
        for name, value in (("recipient", recipient), ("scope", scope),
                            ("queue_id", queue_id)):
            try:
                encoded = value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"the {name} is not valid Unicode") from exc
            if len(encoded) > FIELD_MAX:
                raise ValueError(f"the {name} is longer than {FIELD_MAX} octets")
            parts += (bytes((len(encoded),)), encoded)
        payload = b"".join(parts)
        return _b64encode(payload + self._tag(payload))

    def verify(self, token: object, now: float | None = None) -> TokenData | None:
        """The data of a genuine, unexpired token, or None; never raises.

        Everything that is not exactly a token made with this secret (wrong alphabet,
        non-canonical base64, a flipped bit, another secret, an unknown version, trailing
        octets) and every token older than the lifetime gives None, the same None: the
        caller cannot tell a forged token from an expired one, nor can whoever probes it.
        """
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return None
        if _TOKEN_CHARS.fullmatch(token) is None or len(token) % 4 == 1:
            return None
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        except (binascii.Error, ValueError):
            return None
        # Unpadded base64 leaves spare bits in the last character: insist on the canonical
        # spelling, so that one token has exactly one string (every character is signed).
        if len(raw) < _MIN_RAW or _b64encode(raw) != token:
            return None
        payload, tag = raw[:-TAG_SIZE], raw[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(payload), tag):
            return None
        version, issued = _HEAD.unpack_from(payload)
        if version != TOKEN_VERSION:
            return None
        fields: list[str] = []
        pos = _HEAD.size
        for _ in range(3):
            if pos >= len(payload):
                return None
            size = payload[pos]
            value = payload[pos + 1:pos + 1 + size]
            if len(value) != size:
                return None
            try:
                fields.append(value.decode("utf-8"))
            except UnicodeDecodeError:
                return None
            pos += 1 + size
        if pos != len(payload) or not fields[0] or not fields[1]:
            return None
        when = self._clock() if now is None else now
        age = when - issued
        if age > self.lifetime or age < -CLOCK_SKEW:
            return None
        return TokenData(fields[0], fields[1], fields[2], issued)


def token_from_subject(subject: str) -> str | None:
    """The token in the subject of a reply to our mailto URI ("unsubscribe TOKEN"), if any.

    Tolerates what mail clients do to a subject: a "Re:" in front, case, extra spaces. The
    caller still verifies the token.
    """
    match = _SUBJECT_TOKEN.search(subject[:4 * MAX_TOKEN_CHARS])
    return match.group(1) if match else None


def _fold_uri_list(name: str, uris: list[bytes]) -> bytes:
    """`name: <u1>, <u2>` as CRLF-terminated lines, folded before a URI when that helps.

    RFC 5322 2.2.3: a field is folded by inserting CRLF before whitespace; RFC 2369 2 lets
    whitespace stand between the bracketed URLs. A URI is never split: one longer than a line
    stands alone on its line (over 78 then, since no fold point exists inside it).
    """
    items = [b"<" + uri + b">" + (b"," if i < len(uris) - 1 else b"")
             for i, uri in enumerate(uris)]
    lines = [name.encode("ascii") + b":"]
    for item in items:
        here = len(lines[-1]) + 1 + len(item)
        # Beside the field name when it fits there, or when it would be too long for 78
        # octets on a line of its own too (a fold would only add a line).
        beside_name = len(lines) == 1 and lines[0].endswith(b":")
        if here <= FOLD_AT or (beside_name and 1 + len(item) > FOLD_AT and here <= LINE_MAX):
            lines[-1] += b" " + item
        else:
            lines.append(b" " + item)
    for line in lines:
        if len(line) > LINE_MAX:
            raise ValueError(f"{name} line longer than {LINE_MAX} octets")
    return _CRLF.join(lines) + _CRLF


def unsubscribe_headers(*, tokens: Tokens, recipient: str, scope: str, queue_id: str,
                        public_url: str, mail_domain: str) -> list[bytes]:
    """The List-Unsubscribe and List-Unsubscribe-Post lines for one recipient.

    `public_url` is the base of the one-click links (`[http] public_url`); `mail_domain`
    names the host whose `unsubscribe@` mailbox reads the mailto replies. Raises ValueError
    when either could carry anything but a plain URL or host name into the header.
    """
    base = public_url.rstrip("/")
    if not base.lower().startswith(("https://", "http://")) or not _URI_SAFE.fullmatch(base):
        raise ValueError(f"public_url {public_url!r} is not a plain http(s) URL")
    if not _HOSTNAME.fullmatch(mail_domain):
        raise ValueError(f"mail domain {mail_domain!r} is not a host name")
    token = tokens.make(recipient, scope, queue_id)
    # RFC 8058 3.1: one HTTPS URI, the target of the one-click POST (https in production:
    # the receivers only POST to https); it MAY be followed by non-HTTP URIs such as mailto.
    # RFC 6068 5: the space in the subject is written %20; the token's alphabet needs no
    # escaping.
    uris = [f"{base}/u/{token}".encode("ascii"),
            f"mailto:unsubscribe@{mail_domain}?subject=unsubscribe%20{token}".encode("ascii")]
    return [_fold_uri_list(LIST_UNSUBSCRIBE, uris),
            f"{LIST_UNSUBSCRIBE_POST}: {ONE_CLICK_KEY}={ONE_CLICK_VALUE}".encode("ascii")
            + _CRLF]


def _fields(message: bytes) -> tuple[list[tuple[bytes | None, bytes]], bytes]:
    """The header fields (lower-cased name or None, raw lines) and the rest of the message.

    Lenient: the edge has already refused header sections it cannot parse, so this only
    needs to find field boundaries. A continuation line (RFC 5322 2.2.3: starts with WSP)
    belongs to the field above it. The name is what precedes ':' without trailing WSP, so
    the obsolete "Name :" form (RFC 5322 4.5) is recognised too. `rest` starts with the
    blank line before the body, or is empty for a headers-only message (RFC 5322 3.5).
    """
    fields: list[tuple[bytes | None, bytes]] = []
    pos, end = 0, len(message)
    while pos < end:
        newline = message.find(_CRLF, pos)
        next_pos = end if newline < 0 else newline + 2
        line = message[pos:next_pos]
        if line == _CRLF:
            break  # RFC 5322 2.1: the empty line that ends the header section
        if line[:1] in (b" ", b"\t") and fields:
            name, raw = fields[-1]
            fields[-1] = (name, raw + line)
        else:
            head, colon, _ = line.partition(b":")
            fields.append((head.rstrip(_WSP).lower() if colon else None, line))
        pos = next_pos
    return fields, message[pos:]


def _uris(raw_field: bytes) -> list[bytes]:
    """The bracketed URIs of a raw List-Unsubscribe field (RFC 2369 2), unfolded, with the
    whitespace inside brackets removed ("internal whitespace being ignored")."""
    value = raw_field.partition(b":")[2].replace(_CRLF, b"")
    out = []
    for match in _BRACKETED.finditer(value):
        uri = re.sub(rb"[ \t]+", b"", match.group(1))
        if uri:
            out.append(uri)
    return out


def _is_http(uri: bytes) -> bool:
    return uri.lower().startswith((b"http:", b"https:"))


def apply_unsubscribe(message: bytes, new_headers: list[bytes], mode: str) -> bytes:
    """The message with our List-Unsubscribe lines (`new_headers`) applied per `mode`.

    - "replace": every List-Unsubscribe and List-Unsubscribe-Post goes, ours are added.
    - "keep": a message that has a List-Unsubscribe is returned unchanged; otherwise a stray
      List-Unsubscribe-Post goes and ours are added.
    - "merge": one List-Unsubscribe with the application's URIs first, then ours, without
      duplicates; our List-Unsubscribe-Post. The application's http(s) URIs are dropped:
      RFC 8058 3.1 says the field "MUST contain one HTTPS URI", the one our Post header
      promises answers a one-click POST; a receiver that took the first https URI would
      otherwise POST to the application's page, which may not support it.

    RFC 8058 3.1 asks for one field of each; so does this. Added fields go at the end of the
    header section; the body is never touched. CRLF in, CRLF out.
    """
    if mode not in MODES:
        raise ValueError(f"unknown List-Unsubscribe mode {mode!r}; expected one of {MODES}")
    ours = {LIST_UNSUBSCRIBE.lower().encode(), LIST_UNSUBSCRIBE_POST.lower().encode()}
    lu_name = LIST_UNSUBSCRIBE.lower().encode()
    fields, rest = _fields(message)
    existing = [raw for name, raw in fields if name == lu_name]
    if mode == "keep" and existing:
        return message
    added = list(new_headers)
    if mode == "merge" and existing:
        new_parsed = [(_fields(line)[0] or [(None, line)])[0] for line in new_headers]
        our_index = next((i for i, (name, _) in enumerate(new_parsed) if name == lu_name),
                         None)
        if our_index is not None:
            merged: list[bytes] = []
            # A URI that cannot fit on one line (RFC 5322 2.1.1) is dropped, not split.
            app_uris = [uri for raw in existing for uri in _uris(raw)
                        if not _is_http(uri) and len(uri) + 4 <= LINE_MAX]
            for uri in app_uris + _uris(new_parsed[our_index][1]):
                if uri not in merged:
                    merged.append(uri)
            added[our_index] = _fold_uri_list(LIST_UNSUBSCRIBE, merged)
    kept = [raw for name, raw in fields if name not in ours]
    # A headers-only message may end without CRLF: terminate its last line first.
    if kept and not kept[-1].endswith(_CRLF):
        kept[-1] += _CRLF
    return b"".join(kept) + b"".join(added) + rest
