"""Envelope address validation (RFC 5321 section 4.1.2, RFC 6531 section 3.3).

aiosmtpd has already taken the path apart (angle brackets, source routes); this module
decides whether the mailbox left over is one the relay may accept and pass on, and gives
the canonical form used for look-ups (domain lower-cased, local part kept as it is:
RFC 5321 section 2.4 says the local part is case-sensitive).
"""

from __future__ import annotations

import ipaddress
import re

from relay import replies
from relay.replies import Reply

# RFC 5321 4.1.2: atext of RFC 5322, and qtextSMTP / quoted-pairSMTP.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-"
_DOT_STRING = re.compile(rf"^[{_ATEXT}]+(?:\.[{_ATEXT}]+)*$")
_DOT_STRING_UTF8 = re.compile(rf"^[{_ATEXT}\u0080-\U0010ffff]+(?:\.[{_ATEXT}\u0080-\U0010ffff]+)*$")
_QUOTED = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\[\x20-\x7e])*"$')
_QUOTED_UTF8 = re.compile(r'^"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"$')
_LABEL = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LABEL_UTF8 = re.compile(r"^[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\u0080-\U0010ffff-]*"
                         r"[A-Za-z0-9\u0080-\U0010ffff])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _split(mailbox: str) -> tuple[str, str] | None:
    """Split at the last @ that is outside the quoted local part."""
    if mailbox.startswith('"'):
        end = 1
        while end < len(mailbox):
            ch = mailbox[end]
            if ch == "\\":
                end += 2
                continue
            if ch == '"':
                break
            end += 1
        local, rest = mailbox[: end + 1], mailbox[end + 1:]
        if not rest.startswith("@"):
            return None
        return local, rest[1:]
    local, at, domain = mailbox.rpartition("@")
    if not at:
        return None
    return local, domain


def _valid_domain(domain: str, smtputf8: bool) -> bool:
    if domain.startswith("[") and domain.endswith("]"):
        literal = domain[1:-1]
        if literal.lower().startswith("ipv6:"):
            literal = literal[5:]
            try:
                return ipaddress.ip_address(literal).version == 6
            except ValueError:
                return False
        try:
            return ipaddress.ip_address(literal).version == 4
        except ValueError:
            return False
    if len(domain.encode("utf-8")) > 255 or "." not in domain:
        return False
    return all(_valid_label(part, smtputf8) for part in domain.split("."))


def _valid_label(label: str, smtputf8: bool) -> bool:
    # RFC 1035 2.3.4 / RFC 5890 2.3.2.1: at most 63 octets, for a U-label in its A-label form.
    if label.isascii():
        return bool(_LABEL.match(label))
    return bool(smtputf8 and _LABEL_UTF8.match(label)
                and len(b"xn--" + label.encode("punycode")) <= 63)


def check_mailbox(mailbox: str, *, smtputf8: bool, sender: bool) -> Reply | None:
    """Return the refusal for an envelope mailbox, or None when it is acceptable.

    `mailbox` is aiosmtpd's address string: decoded UTF-8 with surrogate escapes for
    undecodable bytes. The null sender is handled by the caller.
    """
    bad = replies.R501_BAD_SENDER if sender else replies.R501_BAD_RCPT
    if _CONTROL.search(mailbox):
        return replies.R501_CONTROL_CHARS
    try:
        encoded = mailbox.encode("utf-8")
    except UnicodeEncodeError:  # surrogate escapes: bytes that are not UTF-8
        return bad
    if not mailbox.isascii() and not smtputf8:
        # RFC 6531 3.4/3.5: a non-ASCII address needs the SMTPUTF8 parameter on MAIL.
        return replies.R553_UTF8_NEEDS_SMTPUTF8
    if len(encoded) > 254:  # RFC 5321 4.5.3.1.3: path <= 256 octets with the brackets
        return bad
    parts = _split(mailbox)
    if parts is None:
        return bad
    local, domain = parts
    if not local or len(local.encode("utf-8")) > 64:  # RFC 5321 4.5.3.1.1
        return bad
    if smtputf8:
        local_ok = _DOT_STRING_UTF8.match(local) or _QUOTED_UTF8.match(local)
    else:
        local_ok = _DOT_STRING.match(local) or _QUOTED.match(local)
    if not local_ok or not _valid_domain(domain, smtputf8):
        return bad
    return None


def parse_path(arg: str) -> str | None:
    """The mailbox of a MAIL FROM:/RCPT TO: argument (keyword already removed), or None.

    RFC 5321 4.1.2: Path = "<" [ A-d-l ":" ] Mailbox ">"; a source route (A-d-l) is
    recognised and stripped (4.1.1.3, Appendix C). The mailbox text is returned exactly as
    the client wrote it, so quoted local parts go on byte for byte. "" is the null path.
    Without angle brackets (a common client error) the first word is taken.
    """
    text = arg.lstrip(" ")
    if not text.startswith("<"):
        word = text.split(" ", 1)[0]
        return word or None
    i, quoted = 1, False
    while i < len(text):
        ch = text[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            break
        i += 1
    else:
        return None
    inside, rest = text[1:i], text[i + 1:]
    if rest and not rest.startswith(" "):
        return None
    if inside.startswith("@"):
        route, colon, inside = inside.partition(":")
        if not colon or not all(
                hop.startswith("@") and _valid_domain(hop[1:], True)
                for hop in route.split(",")):
            return None
    return inside


def canonical(mailbox: str) -> str:
    """The form used for look-ups: domain lower-cased, local part unchanged."""
    parts = _split(mailbox)
    if parts is None:
        return mailbox
    local, domain = parts
    return f"{local}@{domain.lower()}"


def domain_of(mailbox: str) -> str:
    parts = _split(mailbox)
    return parts[1].lower() if parts else ""
