"""Header policy, applied once by the edge at the end of DATA, before the durable commit.

`apply_header_rules` is a pure function over the message bytes: it reads the relay's own
control headers (`X-Relay-*`), removes the headers the configuration names, adds Message-ID,
Date and Feedback-ID where they are missing, folds over-long header lines, and refuses the
messages whose header section it cannot handle honestly. It never changes the body, and it
never rewrites a header line that is already within the limit: DKIM signs these bytes later,
and what the application wrote is what the recipient gets.

The caller guarantees CRLF line endings (no bare CR or LF). Randomness and time are passed in
(STYLE rule 8).
"""

from __future__ import annotations

import random
import re
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.policy import default as _default_policy
from email.utils import format_datetime

# Refusal reasons (the keys of `HeaderResult.refusal`); the edge maps each to its reply.
NO_FROM = "no_from"
MULTIPLE_FROM = "multiple_from"
BAD_HEADER = "bad_header"
HEADER_TOO_LONG = "header_too_long"
HEADER_LINE_TOO_LONG = "header_line_too_long"
REFUSALS = (NO_FROM, MULTIPLE_FROM, BAD_HEADER, HEADER_TOO_LONG, HEADER_LINE_TOO_LONG)

# Bound the header section (STYLE rule 5). Postfix's header_size_limit defaults to 100 KiB;
# 64 KiB is generous for any real message and keeps the per-line work small.
MAX_HEADER_SECTION = 64 * 1024

# Google's Feedback-ID format is "a:b:c:SenderId"; the SenderId names the sending system.
FEEDBACK_SENDER_ID = "relay"

# Control values and Feedback-ID parts keep only these characters, and at most 64 of them:
# no CR, LF, ':', ';' or space can reach a header through them (header injection).
TOKEN_MAX = 64
_TOKEN_DROP = re.compile(r"[^A-Za-z0-9._-]")
_HOST_DROP = re.compile(r"[^A-Za-z0-9.-]")

# RFC 5322 2.2 / 3.6.8: field-name = 1*ftext, ftext = %d33-57 / %d59-126 (printable US-ASCII
# except ':'), followed by ':'.
_FIELD_START = re.compile(rb"[\x21-\x39\x3b-\x7e]+:")
_WSP = b" \t"
_CRLF = b"\r\n"


@dataclass(frozen=True)
class HeaderRules:
    """What the header policy does; one instance per configuration."""

    remove: tuple[str, ...] = ("X-Originating-IP", "Bcc")  # "X-Internal-*" is a prefix
    control_prefix: str = "X-Relay-"  # the relay's own control headers: read, then removed
    add_message_id: bool = True
    add_date: bool = True
    feedback_id: bool = True  # add Feedback-ID when an app is known
    max_line: int = 998  # RFC 5322 2.1.1


@dataclass
class HeaderResult:
    """The outcome: the new message bytes, or the refusal reason, plus what was read."""

    message: bytes | None  # None when refused
    refusal: str | None  # one of REFUSALS when refused
    control: dict[str, str] = field(default_factory=dict)  # sanitised control values
    from_addresses: list[str] = field(default_factory=list)  # addr-specs of From
    message_id: str = ""  # without <>


@dataclass
class _Field:
    """One header field: its lower-cased name and its raw bytes with continuation lines."""

    name: str
    raw: bytes

    def value(self) -> str:
        """The unfolded value (RFC 5322 2.2.3: unfolding removes each CRLF before WSP)."""
        raw = self.raw[len(self.name) + 1:].replace(_CRLF, b"")
        return raw.decode("utf-8", "replace").strip()


def sanitize_token(value: str) -> str:
    """Keep only [A-Za-z0-9._-], at most TOKEN_MAX characters: safe inside any header."""
    return _TOKEN_DROP.sub("", value)[:TOKEN_MAX]


def _split_header(message: bytes) -> tuple[list[_Field], bytes] | str:
    """Cut the message into its header fields and the rest (blank line and body).

    Returns a refusal reason instead when the header section is not one we accept.
    """
    spans: list[tuple[str, int, int]] = []  # name, start, end: slices are cut once, at the end
    pos = 0
    end_of_message = len(message)
    while pos < end_of_message:
        # Bound the search: no header line may end beyond MAX_HEADER_SECTION.
        newline = message.find(_CRLF, pos, MAX_HEADER_SECTION + 2)
        if newline < 0:
            if end_of_message > MAX_HEADER_SECTION:
                return HEADER_TOO_LONG
            line_end = next_pos = end_of_message  # the last line, without CRLF
        else:
            line_end, next_pos = newline, newline + 2
        if line_end == pos:
            # RFC 5322 2.1: an empty line separates the header section from the body.
            break
        if next_pos > MAX_HEADER_SECTION:
            return HEADER_TOO_LONG
        first = message[pos:pos + 1]
        if first in (b" ", b"\t"):
            # RFC 5322 2.2.3: a folded continuation line starts with WSP; it belongs to the
            # field above it, and a message cannot start with one.
            if not spans:
                return BAD_HEADER
            spans[-1] = (spans[-1][0], spans[-1][1], next_pos)
        else:
            match = _FIELD_START.match(message, pos, line_end)
            if match is None:
                # RFC 5322 2.2: neither a field nor a continuation. An mbox "From " line, or
                # a body with no blank line before it: Postfix would take the rest as body;
                # we refuse, so that parsing here and DKIM verifiers later agree.
                return BAD_HEADER
            name = message[pos:match.end() - 1].decode("ascii").lower()
            spans.append((name, pos, next_pos))
        pos = next_pos
    # RFC 5322 3.5: the body is optional; with no blank line, `rest` is empty (headers only).
    fields = [_Field(name, message[start:end]) for name, start, end in spans]
    return fields, message[pos:]


def _remove_matcher(rules: HeaderRules) -> tuple[frozenset[str], tuple[str, ...]]:
    """The configured removals: exact names and name prefixes ("X-Internal-*")."""
    exact = {entry.lower() for entry in rules.remove if entry and not entry.endswith("*")}
    prefixes = tuple(entry[:-1].lower() for entry in rules.remove if entry.endswith("*"))
    return frozenset(exact), prefixes


_ADDRESS_LIKE = re.compile(r"[^\s<>,;:\"()\[\]\\@\x00-\x1f\x7f]+@[^\s<>,;:\"()\[\]\\@\x00-\x1f\x7f]+")


def _from_addresses(value: str) -> list[str]:
    """The addr-specs of a From value (RFC 5322 3.6.2: a mailbox-list), domain as written.

    The stdlib parser is lenient and guesses on malformed input (it reads the display name
    of `a@example.com <ceo@evil.example>` as the address), so every address-looking token
    of the value is added too: a sender rule that checks all of them fails closed."""
    found: list[str] = []
    try:
        header = _default_policy.header_factory("from", value)
        # The parser's best guess for garbage ("<>", a bare word) is not a mailbox.
        found = [addr.addr_spec for addr in header.addresses if addr.username and addr.domain]
    except Exception:  # noqa: BLE001 - the stdlib parser has crashed on hostile input before
        found = []
    for token in _ADDRESS_LIKE.findall(value):
        if token not in found:
            found.append(token)
    return found


def _message_id(value: str) -> str:
    """The id of a Message-ID value (RFC 5322 3.6.4: "<" id-left "@" id-right ">")."""
    start = value.find("<")
    end = value.find(">", start + 1)
    if start >= 0 and end > start:
        return value[start + 1:end].strip()
    return value.strip("<> \t")


def _fold_line(line: bytes, limit: int) -> list[bytes] | None:
    """Split a header line into lines of at most `limit` octets, or None when impossible.

    RFC 5322 2.2.3: fold by inserting CRLF before a WSP, so unfolding (removing those CRLFs)
    gives back the line exactly. No piece may be whitespace only (RFC 5322 3.2.2), so each
    split leaves non-WSP text on both sides.
    """
    last_text = len(line.rstrip(_WSP)) - 1  # a split must come before the last non-WSP octet
    pieces: list[bytes] = []
    start = 0
    while len(line) - start > limit:
        high = min(start + limit, last_text)  # a split at `at` leaves line[start:at] <= limit
        at = max(line.rfind(b" ", start + 1, high + 1), line.rfind(b"\t", start + 1, high + 1))
        if at < 0 or not line[start:at].strip(_WSP):
            return None  # one token longer than the limit: folding cannot help
        pieces.append(line[start:at])
        start = at
    pieces.append(line[start:])
    return pieces


def _fold_field(raw: bytes, limit: int) -> bytes | None:
    """The field with every line over `limit` octets folded; lines within it are untouched."""
    if len(raw) <= limit + 2:
        return raw
    terminated = raw.endswith(_CRLF)
    lines = (raw[:-2] if terminated else raw).split(_CRLF)
    out: list[bytes] = []
    for line in lines:
        if len(line) <= limit:
            out.append(line)
            continue
        pieces = _fold_line(line, limit)
        if pieces is None:
            return None
        out.extend(pieces)
    return _CRLF.join(out) + (_CRLF if terminated else b"")


def apply_header_rules(message: bytes, rules: HeaderRules, *, app: str | None, hostname: str,
                       now: float, stream: str,
                       rng: random.Random | None = None,
                       parse_from: bool = True) -> HeaderResult:
    """Apply the header policy to a message with CRLF line endings.

    `app` is the authenticated (or implicit) application, None when unknown; `hostname` the
    relay's name (Message-ID right-hand side); `now` a Unix time for Date; `stream` the stream
    the caller decided on (Feedback-ID). `rng` makes the Message-ID reproducible in tests; by
    default it comes from `secrets`.
    """
    split = _split_header(message)
    if isinstance(split, str):
        return HeaderResult(None, split)
    fields, rest = split

    # RFC 5322 3.6: From is required, and occurs exactly once.
    from_fields = [f for f in fields if f.name == "from"]
    if not from_fields:
        return HeaderResult(None, NO_FROM)
    if len(from_fields) > 1:
        return HeaderResult(None, MULTIPLE_FROM)
    # Parsing the From addresses is the costliest step; only sender rules need them.
    from_addresses = _from_addresses(from_fields[0].value()) if parse_from else []

    exact, prefixes = _remove_matcher(rules)
    control_prefix = rules.control_prefix.lower()
    control: dict[str, str] = {}
    replace_feedback = rules.feedback_id and bool(app)
    kept: list[_Field] = []
    for fld in fields:
        if control_prefix and fld.name.startswith(control_prefix):
            # The relay's own instructions: read (the first occurrence wins), never passed on.
            # Sanitised here, so no consumer can carry CR, LF or ':' into a header.
            key = fld.name[len(control_prefix):]
            if key and key not in control:
                control[key] = sanitize_token(fld.value())
            continue
        if fld.name in exact or fld.name.startswith(prefixes):
            continue
        if replace_feedback and fld.name == "feedback-id":
            continue  # replaced below: never two Feedback-IDs
        kept.append(fld)

    added: list[str] = []
    message_id = ""
    id_fields = [f for f in kept if f.name == "message-id"]
    if id_fields:
        message_id = _message_id(id_fields[0].value())
        if not message_id and rules.add_message_id:
            # An empty Message-ID identifies nothing; RFC 5322 3.6 allows one field, so the
            # empty one goes and ours takes its place.
            kept = [f for f in kept if f.name != "message-id"]
    if not message_id and rules.add_message_id:
        # RFC 5322 3.6.4: unique id; 128 random bits on the left, our host name on the right.
        token = f"{rng.getrandbits(128):032x}" if rng is not None else secrets.token_hex(16)
        host = _HOST_DROP.sub("", hostname).strip(".") or "localhost"
        message_id = f"{token}@{host}"
        added.append(f"Message-ID: <{message_id}>")
    if rules.add_date and not any(f.name == "date" for f in kept):
        # RFC 5322 3.6.1 / 3.3: the origination date, with a numeric zone (+0000).
        added.append(f"Date: {format_datetime(datetime.fromtimestamp(now, UTC))}")
    if replace_feedback:
        parts = (sanitize_token(control.get("campaign", "")) or "none",
                 sanitize_token(app or "") or "none",
                 sanitize_token(stream) or "none",
                 FEEDBACK_SENDER_ID)
        added.append(f"Feedback-ID: {':'.join(parts)}")

    out: list[bytes] = []
    for fld in kept:
        folded = _fold_field(fld.raw, rules.max_line)
        if folded is None:
            return HeaderResult(None, HEADER_LINE_TOO_LONG, control, from_addresses,
                                message_id)
        out.append(folded)
    if added:
        # A headers-only message may end without CRLF: terminate its last line first.
        if out and not out[-1].endswith(_CRLF):
            out[-1] += _CRLF
        # Added fields go at the end of the header section, in a fixed order; every part
        # of them is sanitised or generated, so none can carry CR or LF.
        for line in added:
            folded = _fold_field(line.encode("ascii") + _CRLF, rules.max_line)
            if folded is None:
                return HeaderResult(None, HEADER_LINE_TOO_LONG, control, from_addresses,
                                    message_id)
            out.append(folded)
    return HeaderResult(b"".join(out) + rest, None, control, from_addresses, message_id)
