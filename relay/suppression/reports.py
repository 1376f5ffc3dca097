"""Reports that come back to the relay's own addresses: bounces and complaints.

`parse_report(message)` turns one incoming message into a `Report`:

* **DSN** (RFC 3464): a multipart/report with report-type=delivery-status (RFC 6522). Its
  message/delivery-status part holds one block of per-message fields (Reporting-MTA,
  Arrival-Date, ...) and one block per recipient (Final-Recipient, Action, Status, ...),
  separated by blank lines (RFC 3464 2.1). The third part, when present, returns the
  original message (message/rfc822) or its header (text/rfc822-headers, RFC 6522 4).
  The UTF-8 twins of RFC 6533 (message/global-delivery-status, message/global,
  message/global-headers) are read the same way.
* **ARF complaint** (RFC 5965): a multipart/report with report-type=feedback-report; its
  message/feedback-report part holds Feedback-Type, User-Agent, Version (RFC 5965 3.1),
  Original-Mail-From, Original-Rcpt-To, Arrival-Date, Reporting-MTA, Source-IP (3.2);
  the third part is the original message or its header.
* **anything else** goes to flufl.bounce's detectors (Postfix, qmail, Exim, Exchange
  and other plain-text bounces). They give addresses only; a permanent failure becomes
  Action failed, Status 5.0.0 (4.0.0 for a temporary one) unless the bounce text next to
  the address carries an enhanced status code of the same class (RFC 3463).

Nothing here decides what a report *means* for a recipient (that is the classifier's
job, DESIGN.md invariant 5) or whether it can be trusted (relay/suppression/trust.py).
`parse_report` never raises: garbage gives `kind="unknown"` and a note in `errors`.
"""

from __future__ import annotations

import email.header
import email.parser
import email.policy
import email.utils
import ipaddress
import logging
import re
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal

import flufl.bounce

__all__ = ["Report", "ReportRecipient", "parse_report"]

Kind = Literal["dsn", "arf", "unknown"]

_DSN_TYPES = frozenset({"message/delivery-status", "message/global-delivery-status"})
_ARF_TYPES = frozenset({"message/feedback-report"})
# Where a report returns the original: the whole message or its header only. The last
# two are not standard but are seen from older MTAs.
_ORIGINAL_MESSAGE_TYPES = frozenset({"message/rfc822", "message/global"})
_ORIGINAL_HEADER_TYPES = frozenset({"text/rfc822-headers", "message/global-headers",
                                    "message/rfc822-headers", "text/rfc822-header"})
# RFC 3464 2.3.3: the five actions.
_ACTIONS = frozenset({"failed", "delayed", "delivered", "relayed", "expanded"})
# RFC 3463 2: class.subject.detail; not preceded or followed by more dotted digits (an
# IPv4 address such as 192.0.2.5 is not a status code).
_STATUS_RE = re.compile(r"(?<![\d.])([245])\.(\d{1,3})\.(\d{1,3})(?!\.?\d)")
# RFC 5965 3.1 / IANA: the registered feedback types; others are kept but noted.
_FEEDBACK_TYPES = frozenset({"abuse", "fraud", "other", "virus", "not-spam", "auth-failure"})
# Plain-text bounces that quote the original after a marker line (qmail's QSBMF, Exim).
_INLINE_ORIGINAL_RE = re.compile(
    rb"^(?:--- Below this line is a copy of the message\.|"
    rb"-+ This is a copy of the message, including all the headers\. -+)[ \t]*\r?$",
    re.MULTILINE)
_HOSTNAME_RE = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z][a-z0-9-]*[a-z0-9]")
_MAX_TEXT = 1000        # bound each diagnostic and field value kept
_MAX_RECIPIENTS = 1000  # bound the per-recipient blocks read from one report

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportRecipient:
    """One recipient of a DSN (RFC 3464 2.3), or one address found by flufl.bounce.

    `address`: Final-Recipient's address (RFC 3464 2.3.2), as written; `original_recipient`:
    Original-Recipient's (2.3.1, the ORCPT the sender gave), if present. `action`: one of
    failed, delayed, delivered, relayed, expanded (2.3.3), lower case, comment dropped.
    `status`: "X.Y.Z" (2.3.4, RFC 3463). `diagnostic`: Diagnostic-Code's text (2.3.6)
    without its type, folding undone. `remote_mta`: Remote-MTA's host name (2.3.5).
    """

    address: str
    action: str
    status: str
    diagnostic: str = ""
    original_recipient: str | None = None
    remote_mta: str | None = None

    @property
    def permanent(self) -> bool:
        """A permanent failure (Action failed, Status 5.x.x): a hard bounce candidate."""
        return self.action == "failed" and self.status.startswith("5.")


@dataclass(frozen=True)
class Report:
    """What one incoming report says.

    `kind`: "dsn" (RFC 3464, or a plain-text bounce that flufl.bounce understood: then
    `source` is "flufl.bounce"), "arf" (RFC 5965) or "unknown". `recipients`: the DSN's
    per-recipient results (empty for ARF). `original_recipients`: who the original was
    sent to, as far as the report tells: ARF Original-Rcpt-To, else the returned original's
    To (or Microsoft's X-HmXmrOriginalRecipient when To is redacted); addresses without a
    domain (AOL's "redacted") are left out. `original_message_id`: the returned
    original's Message-ID with its angle brackets (or Gmail's X-Original-Message-ID).
    `original_return_path`: the original's envelope sender, from its Return-Path, else
    Postfix's X-Postfix-Sender, else ARF's Original-Mail-From: with VERP it names the
    queue ID and recipient. `reporting_domain`: the Reporting-MTA host name when it is a
    DNS name, else the domain of the report's From. `verp_address`: the envelope
    recipient the report was sent to (given by the caller). `errors`: notes on what could
    not be parsed; non-empty whenever `kind` is "unknown".
    """

    kind: Kind
    recipients: list[ReportRecipient] = field(default_factory=list)
    original_message_id: str | None = None
    original_recipients: list[str] = field(default_factory=list)
    feedback_type: str | None = None
    reporting_domain: str | None = None
    verp_address: str | None = None
    raw: bytes = field(default=b"", repr=False)
    source: str = ""                      # "rfc3464", "rfc5965", "flufl.bounce" or ""
    reporting_mta: str | None = None
    original_from: str | None = None
    original_return_path: str | None = None
    envelope_id: str | None = None        # RFC 3464 2.2.1 Original-Envelope-Id
    arrival_date: str | None = None
    user_agent: str | None = None         # ARF
    version: str | None = None            # ARF
    original_mail_from: str | None = None  # ARF
    source_ip: str | None = None          # ARF
    errors: list[str] = field(default_factory=list)


# Parts whose bytes the parser must keep: it would split message/delivery-status into header
# blocks and parse any other message/* type as a message, losing a base64 body or the
# shape of a malformed block on the way.
_RAW_TYPES = _DSN_TYPES | _ARF_TYPES | frozenset({"message/global-headers",
                                                  "message/rfc822-headers"})


class _ReportMessage(Message):
    """A parsed part. While `parsing` is true, the parts in _RAW_TYPES claim to be
    application/octet-stream, which the email package keeps as an undecoded payload;
    `_parse_message` turns `parsing` off on every part afterwards."""

    parsing = True

    def get_content_type(self) -> str:
        """The Content-Type, but see the class docstring."""
        ctype = super().get_content_type()
        if self.parsing and ctype in _RAW_TYPES:
            return "application/octet-stream"
        return ctype


def _parse_message(data: bytes) -> Message:
    msg = email.parser.BytesParser(_class=_ReportMessage,
                                   policy=email.policy.compat32).parsebytes(data)
    for part in msg.walk():
        part.parsing = False  # type: ignore[attr-defined]
    return msg


# --- small helpers ----------------------------------------------------------------------------

def _text(value: object) -> str:
    """A header value as one line of text: RFC 2047 words decoded, folding undone."""
    if value is None:
        return ""
    if isinstance(value, email.header.Header):
        # compat32 wraps raw 8-bit octets as charset "unknown-8bit": read them as UTF-8
        # (RFC 6532), which is what the global-* report types carry (RFC 6533).
        chunks = []
        for chunk, charset in email.header.decode_header(value):
            if not isinstance(chunk, bytes):
                chunks.append(chunk)
                continue
            try:
                chunks.append(chunk.decode(charset if charset and charset != "unknown-8bit"
                                           else "utf-8", "replace"))
            except LookupError:
                chunks.append(chunk.decode("utf-8", "replace"))
        value = "".join(chunks)
    # The bytes parser keeps raw 8-bit octets as surrogates: UTF-8 (RFC 6532) comes back.
    text = str(value).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return re.sub(r"\s+", " ", text).strip()[:_MAX_TEXT]


def _get(msg: Message, name: str) -> str:
    return _text(msg.get(name))


def _typed(value: str) -> tuple[str, str]:
    """RFC 3464 2.1: `type ; value` -> (type lower-cased, value); no type -> ("", value)."""
    kind, sep, rest = value.partition(";")
    if not sep:
        return "", value.strip()
    return kind.strip().lower(), rest.strip()


def _address(value: str) -> str:
    """An address from a field value: angle brackets and a trailing comment dropped."""
    value = value.strip()
    if value.startswith("<") and ">" in value:
        value = value[1:value.index(">")]
    else:
        value = value.split(" ", 1)[0]
    return value.strip().strip("<>")


def _host(value: str) -> str | None:
    """The host of an MTA-name field (`dns; mx.example.net. (comment)`), lower case, no
    trailing dot; None if there is none."""
    _kind, rest = _typed(value)
    token = rest.split(None, 1)[0] if rest.split() else ""
    token = token.rstrip(".").strip("[]").lower()
    return token or None


def _domain_name(host: str | None) -> str | None:
    """`host` if it is a DNS name (not an address literal), else None."""
    if not host:
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host if _HOSTNAME_RE.fullmatch(host) else None
    return None


def _addresses(value: str) -> list[str]:
    """The addr-specs of an address-list field, those without a domain left out."""
    out = []
    for _name, addr in email.utils.getaddresses([value]):
        local, at, domain = addr.rpartition("@")
        if at and local and domain:
            out.append(addr)
    return out


def _payload_bytes(part: Message) -> bytes:
    """A leaf part's content, its Content-Transfer-Encoding undone."""
    # compat32 undoes base64 and quoted-printable (RFC 6533 6.2 allows both for the
    # global-* types) and gives the raw octets of 7bit/8bit bodies back.
    payload = part.get_payload(decode=True)
    if isinstance(payload, bytes):
        return payload
    raw = part.get_payload()
    if isinstance(raw, str):
        return raw.encode("utf-8", "surrogateescape")
    return b""


def _field_blocks(part: Message) -> list[Message]:
    """The blank-line separated field groups of a message/delivery-status or
    message/feedback-report part (RFC 3464 2.1, RFC 5965 3)."""
    data = _payload_bytes(part)
    parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)
    blocks = []
    for raw_block in re.split(rb"\r?\n[ \t]*\r?\n", data):
        chunk = raw_block.strip(b"\r\n")
        if chunk:
            block = parser.parsebytes(chunk + b"\n")
            if len(block.keys()):
                blocks.append(block)
    return blocks


def _original_header(part: Message) -> Message | None:
    """The returned original (or only its header) from a message/rfc822 or
    text/rfc822-headers part."""
    ctype = part.get_content_type()
    if ctype in _ORIGINAL_MESSAGE_TYPES:
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
    data = _payload_bytes(part)
    if not data.strip():
        return None
    return email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(data)


def _find(msg: Message, types: frozenset[str]) -> Message | None:
    """The first part of `msg` (itself included) whose type is in `types`, not looking
    inside returned messages."""
    stack = [msg]
    while stack:
        part = stack.pop(0)
        ctype = part.get_content_type()
        if ctype in types:
            return part
        if part.is_multipart() and ctype.startswith("multipart/"):
            stack.extend(p for p in part.get_payload() if isinstance(p, Message))
    return None


@dataclass
class _Original:
    message_id: str | None = None
    sender: str | None = None
    return_path: str | None = None
    to: list[str] = field(default_factory=list)


def _read_original(header: Message | None) -> _Original:
    if header is None:
        return _Original()
    message_id = _get(header, "Message-ID") or None
    if message_id:
        message_id = message_id.split()[0]
    sender = email.utils.parseaddr(_get(header, "From"))[1] or None
    return_path = _address(_get(header, "Return-Path")) or None
    # Microsoft's JMRP names the recipient in its own field (To may be redacted).
    to = _addresses(_get(header, "X-HmXmrOriginalRecipient"))
    if not to:
        to = _addresses(", ".join(_text(v) for v in header.get_all("To", [])))
    return _Original(message_id, sender, return_path, to)


def _from_domain(msg: Message) -> str | None:
    addr = email.utils.parseaddr(_get(msg, "From"))[1]
    domain = addr.rpartition("@")[2].strip().rstrip(".").lower()
    return domain or None


def _status(value: str) -> str | None:
    """X.Y.Z from a Status value (RFC 3464 2.3.4 allows a trailing comment)."""
    match = _STATUS_RE.search(value)
    return ".".join(match.groups()) if match else None


# --- DSN ---------------------------------------------------------------------------------------

def _recipient(block: Message, errors: list[str]) -> ReportRecipient | None:
    final_type, final = _typed(_get(block, "Final-Recipient"))
    original = _address(_typed(_get(block, "Original-Recipient"))[1]) or None
    address = _address(final) if final else ""
    if "@" not in address:
        if original and "@" in original:
            address = original
        elif final_type not in ("", "rfc822", "utf-8"):
            # RFC 3464 2.3.2: x400, unknown, ...; nothing the relay sent to.
            errors.append(f"recipient of address type {final_type!r} skipped: {final[:80]!r}")
            return None
        else:
            errors.append("per-recipient block without a usable Final-Recipient skipped")
            return None
    action = _get(block, "Action").lower().split(" ", 1)[0].split("(", 1)[0]
    status = _status(_get(block, "Status"))
    diagnostic = _typed(_get(block, "Diagnostic-Code"))[1]
    if status is None:
        # RFC 3464 2.3.4 makes Status required; fall back to the diagnostic's code, then
        # to the action's class.
        status = _status(diagnostic) or {"failed": "5.0.0", "delayed": "4.0.0"}.get(
            action, "2.0.0" if action in _ACTIONS else "")
        errors.append(f"{address}: no valid Status; assumed {status or 'nothing'}")
    if action not in _ACTIONS:
        derived = {"5": "failed", "4": "delayed", "2": "delivered"}.get(status[:1], "")
        errors.append(f"{address}: Action {action or '(none)'!r} invalid; "
                      f"assumed {derived or 'nothing'}")
        action = derived
    if not action or not status:
        return None
    return ReportRecipient(address, action, status, diagnostic, original,
                           _host(_get(block, "Remote-MTA")))


def _parse_dsn(msg: Message, status_part: Message, errors: list[str]) -> dict[str, object]:
    blocks = _field_blocks(status_part)
    per_message: dict[str, str] = {}
    recipients: list[ReportRecipient] = []
    for block in blocks:
        names = {k.lower() for k in block}
        if names & {"final-recipient", "original-recipient", "action", "status"}:
            if len(recipients) >= _MAX_RECIPIENTS:
                errors.append(f"more than {_MAX_RECIPIENTS} recipients; the rest ignored")
                break
            rcpt = _recipient(block, errors)
            if rcpt is not None:
                recipients.append(rcpt)
        else:
            for name in block:
                per_message.setdefault(name.lower(), _get(block, name))
    original_part = _find(msg, _ORIGINAL_MESSAGE_TYPES | _ORIGINAL_HEADER_TYPES)
    original = _read_original(_original_header(original_part) if original_part else None)
    reporting_mta = _host(per_message.get("reporting-mta", ""))
    # RFC 3464 2.2.1: an xtext envelope-id, no address type.
    envelope_id = per_message.get("original-envelope-id") or None
    return_path = original.return_path or _address(
        _typed(per_message.get("x-postfix-sender", ""))[1]) or None
    return {
        "recipients": recipients,
        "original_message_id": original.message_id
        or (per_message.get("x-original-message-id", "").split() or [None])[0],
        "original_recipients": original.to,
        "original_from": original.sender,
        "original_return_path": return_path,
        "reporting_mta": reporting_mta,
        "envelope_id": envelope_id,
        "arrival_date": per_message.get("arrival-date") or None,
    }


# --- ARF ---------------------------------------------------------------------------------------

def _parse_arf(msg: Message, feedback_part: Message, errors: list[str]) -> dict[str, object]:
    fields: dict[str, str] = {}
    rcpt_to: list[str] = []
    for block in _field_blocks(feedback_part):
        for name in block:
            fields.setdefault(name.lower(), _get(block, name))
        rcpt_to += [_address(_text(v)) for v in block.get_all("Original-Rcpt-To", [])]
    rcpt_to = [a for a in rcpt_to if "@" in a and not a.endswith("@")]
    feedback_type = fields.get("feedback-type", "").lower() or None
    if feedback_type is None:
        errors.append("feedback report without Feedback-Type (RFC 5965 3.1)")
    elif feedback_type not in _FEEDBACK_TYPES:
        errors.append(f"unregistered Feedback-Type {feedback_type!r}")
    original_part = _find(msg, _ORIGINAL_MESSAGE_TYPES | _ORIGINAL_HEADER_TYPES)
    original = _read_original(_original_header(original_part) if original_part else None)
    mail_from = _address(fields.get("original-mail-from", "")) or None
    return {
        "feedback_type": feedback_type,
        "user_agent": fields.get("user-agent") or None,
        "version": fields.get("version") or None,
        "original_mail_from": mail_from,
        # RFC 5965 3.2: Arrival-Date; Received-Date is its name in the older drafts.
        "arrival_date": fields.get("arrival-date") or fields.get("received-date") or None,
        "reporting_mta": _host(fields.get("reporting-mta", "")),
        "source_ip": fields.get("source-ip") or None,
        "original_recipients": rcpt_to or original.to,
        "original_message_id": original.message_id,
        "original_from": original.sender,
        "original_return_path": original.return_path or mail_from,
    }


# --- non-standard bounces ----------------------------------------------------------------------

def _bounce_text(msg: Message) -> str:
    """The text/plain leaves of a bounce (not of a returned message), joined."""
    texts = []
    stack = [msg]
    while stack:
        part = stack.pop(0)
        if part.is_multipart():
            if part.get_content_type().startswith("multipart/"):
                stack.extend(p for p in part.get_payload() if isinstance(p, Message))
            continue
        if part.get_content_maintype() == "text" and \
                part.get_content_type() not in _ORIGINAL_HEADER_TYPES:
            texts.append(_payload_bytes(part).decode("utf-8", "replace"))
    return "\n".join(texts)


def _near(text: str, address: str) -> str:
    """The paragraph of the bounce text that names `address`, on one line."""
    lowered = text.lower()
    at = lowered.find(address.lower())
    if at < 0:
        return ""
    start = lowered.rfind("\n\n", 0, at)
    end = lowered.find("\n\n", at)
    paragraph = text[start + 2 if start >= 0 else 0:end if end >= 0 else len(text)]
    return re.sub(r"\s+", " ", paragraph).strip()[:_MAX_TEXT]


def _flufl_failures(msg: Message,
                    errors: list[str]) -> tuple[frozenset[bytes], frozenset[bytes]]:
    """flufl.bounce's all_failures(), but a detector that raises is skipped instead of
    ending the scan (flufl 6.0's Yale detector raises IndexError on an empty From, its
    Sina detector AttributeError on an 8-bit one; both run before the qmail and Postfix
    detectors) and instead of logging a traceback per report."""
    detectors = getattr(getattr(flufl.bounce, "_scan", None), "_DETECTORS", None)
    if not isinstance(detectors, list):  # another flufl version: its public scan
        return flufl.bounce.all_failures(msg)
    for detector in detectors:
        try:
            temporary, permanent = detector().process(msg)
        except Exception as exc:  # noqa: BLE001 - a heuristic detector on odd input
            errors.append(f"flufl.bounce {detector.__name__} failed: "
                          f"{type(exc).__name__}"[:_MAX_TEXT])
            continue
        if temporary or permanent:  # the first detector that finds anything wins
            return frozenset(temporary), frozenset(permanent)
    return frozenset(), frozenset()


def _parse_flufl(msg: Message, data: bytes, errors: list[str]) -> dict[str, object] | None:
    notes: list[str] = []
    try:
        # flufl's detectors expect the email package's usual parse (a delivery-status
        # split into blocks), not ours.
        temporary, permanent = _flufl_failures(
            email.parser.BytesParser(policy=email.policy.compat32).parsebytes(data), notes)
    except Exception as exc:  # noqa: BLE001 - a heuristic detector on odd input
        errors.append(f"flufl.bounce failed: {type(exc).__name__}: {exc}"[:_MAX_TEXT])
        return None
    if not temporary and not permanent:
        errors.extend(notes)
        return None
    text = _bounce_text(msg)
    recipients = []
    for raw_addresses, action, klass in ((permanent, "failed", "5"),
                                         (temporary, "delayed", "4")):
        for raw_address in sorted(raw_addresses):
            address = raw_address.decode("utf-8", "replace").strip().strip("<>")
            if "@" not in address:
                continue
            diagnostic = _near(text, address)
            codes = [".".join(m.groups()) for m in _STATUS_RE.finditer(diagnostic)]
            status = next((c for c in codes if c[0] == klass), f"{klass}.0.0")
            recipients.append(ReportRecipient(address, action, status, diagnostic))
    # qmail and Exim quote the original after a marker line.
    original = _Original()
    marker = _INLINE_ORIGINAL_RE.search(data)
    if marker:
        rest = data[marker.end():].lstrip(b"\r\n")
        original = _read_original(
            email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(rest))
    return {
        "recipients": recipients,
        "original_message_id": original.message_id,
        "original_recipients": original.to,
        "original_from": original.sender,
        "original_return_path": original.return_path,
    }


# --- the entry point -----------------------------------------------------------------------------

def parse_report(message: bytes, *, verp_address: str | None = None) -> Report:
    """Parse one incoming bounce or complaint; never raises (see the module docstring).

    `verp_address`: the envelope recipient the report was delivered to (RCPT TO), kept
    in the result for matching by VERP token.
    """
    errors: list[str] = []
    try:
        data = bytes(message)
    except (TypeError, ValueError) as exc:
        return Report("unknown", verp_address=verp_address,
                      errors=[f"not bytes: {type(exc).__name__}"])
    try:
        return _parse(data, verp_address, errors)
    except Exception as exc:  # the contract: never raise on garbage
        log.debug("report parse failed", exc_info=True)
        errors.append(f"parse failed: {type(exc).__name__}: {exc}"[:_MAX_TEXT])
        return Report("unknown", verp_address=verp_address, raw=data, errors=errors)


def _parse(data: bytes, verp_address: str | None, errors: list[str]) -> Report:
    if not data.strip():
        return Report("unknown", verp_address=verp_address, raw=data,
                      errors=["empty message"])
    msg = _parse_message(data)
    for defect in msg.defects:
        errors.append(f"MIME: {type(defect).__name__}")
    report_type = ""
    if msg.get_content_type() == "multipart/report":
        report_type = (msg.get_param("report-type") or "")
        report_type = report_type.lower() if isinstance(report_type, str) else ""

    kind: Kind = "unknown"
    source = ""
    found: dict[str, object] | None = None
    feedback_part = _find(msg, _ARF_TYPES) if report_type in ("feedback-report", "") else None
    if feedback_part is not None:
        kind, source = "arf", "rfc5965"
        found = _parse_arf(msg, feedback_part, errors)
    elif report_type == "feedback-report":
        errors.append("report-type=feedback-report without a message/feedback-report part")
    if found is None and report_type != "feedback-report":
        status_part = _find(msg, _DSN_TYPES)
        if status_part is not None:
            found = _parse_dsn(msg, status_part, errors)
            if found["recipients"]:
                kind, source = "dsn", "rfc3464"
            else:
                errors.append("delivery-status part without a usable recipient")
                found = None
        elif report_type == "delivery-status":
            errors.append("report-type=delivery-status without a message/delivery-status part")
        if found is None:
            found = _parse_flufl(msg, data, errors)
            if found is not None:
                kind, source = "dsn", "flufl.bounce"
    if found is None:
        if all(e.startswith("MIME: ") for e in errors):
            errors.append("neither a DSN, an ARF report nor a bounce flufl.bounce knows")
        found = {}
    mta = found.pop("reporting_mta", None)
    reporting_mta = mta if isinstance(mta, str) else None
    reporting_domain = _domain_name(reporting_mta) or _from_domain(msg)
    return Report(kind=kind, verp_address=verp_address, raw=data, source=source,
                  reporting_mta=reporting_mta, reporting_domain=reporting_domain,
                  errors=errors, **found)  # type: ignore[arg-type]
