"""The delivery status notification sent to the envelope sender (RFC 3464, RFC 6522, RFC 6533).

`build_dsn` is a pure function: it takes what the queue knows about a message whose
recipients failed (or are late) and gives back the complete notification, ready to be
queued like any other message with the null reverse-path. It does no I/O; time and
randomness come in as arguments (STYLE rule 8).

Shape of the result (RFC 6522 multipart/report, report-type=delivery-status):

1. ``text/plain``: a human explanation in the manner of Postfix's bounce template, one
   paragraph per recipient with the remote server's reply.
2. ``message/delivery-status`` (RFC 3464): the per-message fields, then one block per
   recipient (Final-Recipient, Action, Status, Remote-MTA, Diagnostic-Code,
   Last-Attempt-Date, Will-Retry-Until). ``message/global-delivery-status`` (RFC 6533 4)
   when an address in it is not ASCII; such an address is written with the ``utf-8``
   address type (RFC 6533 3).
3. The original: its header section as ``text/rfc822-headers`` (RFC 6522 4), or the whole
   message as ``message/rfc822`` when ``include_body`` is set and it fits. Header sections
   with raw UTF-8 (RFC 6532) use ``message/global-headers`` / ``message/global``
   (RFC 6533 4, RFC 6532 3.7).

Returning the original, bounded by ``max_returned`` octets:

- ``include_body`` and the whole message (CRLF line endings) is at most ``max_returned``
  octets, every line at most 998 octets, no NUL, header section ASCII or valid UTF-8:
  the message is returned byte for byte as ``message/rfc822`` (``message/global``).
- Otherwise only the header section is returned: as Postfix does, a message is never cut
  in the middle of its body, which would break its MIME structure. The header section
  itself is cut at a line boundary (never inside a folded field, unless its first field
  alone is too long) when it exceeds ``max_returned``; lines over 998 octets are folded
  at white space or, failing that, split (the continuation starts with a space);
  NUL and other control characters are removed and bytes that are not UTF-8 become
  U+FFFD.
- ``max_returned <= 0`` leaves the third part out (RFC 6522 3: it is optional).

The result is 7-bit (no Content-Transfer-Encoding needed) whenever the sender, the
recipients and the returned original are ASCII. Otherwise the parts that carry UTF-8 are
labelled ``8bit``, and so is the multipart: the caller sends it with BODY=8BITMIME when
``not dsn.isascii()``, and with SMTPUTF8 when the sender address itself is not ASCII (it
is the To: header and the RCPT TO). Text that comes from remote servers (reply texts, host
names) is made ASCII with ``?`` in a 7-bit report, and is stripped of CR, LF and every
other control character in both, so it can never start a header field or a MIME part of
its own.
"""

from __future__ import annotations

import random
import re
import textwrap
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime

# RFC 5322 2.1.1: a line is at most 998 octets and SHOULD be at most 78.
_SOFT_LIMIT = 78
_HARD_LIMIT = 998
# RFC 5321 4.5.3.1.5 bounds a reply line at 512 octets; a multi-line reply joined by
# spaces can be longer. Bound what goes into the report (STYLE rule 5).
_MAX_DIAGNOSTIC = 2000
_TEXT_WIDTH = 76

_STATUS = re.compile(r"^([245])\.(\d{1,3})\.(\d{1,3})$")
# Runs of white space, C0/C1 controls and Unicode line separators: one space.
_SPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f\u2028\u2029]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# "host[ip]:port", "host[ip]", "[ip]:port", "host:port", "host" (the log's relay= form).
_REMOTE = re.compile(r"^(?P<host>[^\[\]]*?)(?:\[(?P<ip>[^\[\]]*)\])?(?::\d{1,5})?$")
# One line ending in any of the forms a stored message may have.
_EOL = rb"(?:\r\n|\r(?!\n)|\n)"
_ANY_EOL = re.compile(_EOL)
_HEADER_END = re.compile(_EOL + _EOL)
_BYTE_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_WSP = (b" ", b"\t")
_UTF8_TAIL_MASK, _UTF8_TAIL = 0xC0, 0x80  # 10xxxxxx: a continuation byte of UTF-8
_MSGID = re.compile(r"^<[\x21-\x3b\x3d\x3f-\x7e]{1,250}>$")

# RFC 3463 subject and detail codes: the explanation shown when the relay itself decided
# (no remote reply to quote).
_DETAIL_TEXT = {
    "1.1": "bad destination mailbox address",
    "1.2": "bad destination system address",
    "1.3": "bad destination mailbox address syntax",
    "1.10": "the recipient's domain does not accept mail (null MX)",
    "2.2": "mailbox full",
    "3.4": "message too big for the destination system",
    "4.1": "no answer from host",
    "4.2": "bad connection",
    "4.3": "directory server failure",
    "4.4": "unable to route",
    "4.6": "routing loop detected",
    "4.7": "delivery time expired",
    "5.0": "mail delivery protocol error",
    "6.0": "message content or media error",
    "7.0": "security or policy error",
    "7.1": "delivery not authorized, message refused",
}
_SUBJECT_TEXT = {
    "0": "undefined status",
    "1": "addressing error",
    "2": "mailbox error",
    "3": "mail system error",
    "4": "network or routing error",
    "5": "mail delivery protocol error",
    "6": "message content or media error",
    "7": "security or policy error",
}

SUBJECT_FAILED = "Undelivered Mail Returned to Sender"
SUBJECT_DELAYED = "Delayed Mail (still being retried)"


@dataclass(frozen=True)
class FailedRecipient:
    """One recipient to report on, as the queue knows it.

    ``address``: as in the envelope (may have a quoted local part, may be UTF-8).
    ``status``: RFC 3463 enhanced status of the last attempt. RFC 3464 2.3.4: Status is the
    last status seen, so an expiry is ``action="failed"`` with the last transient status or
    ``4.4.7`` (delivery time expired), not a status rewritten to 5.x.x.
    ``diagnostic``: the remote reply, e.g. ``"550 5.1.1 No such user"`` (a multi-line
    reply joined by spaces); None when the relay itself decided.
    ``remote_mta``: the next hop, ``"mx.example.net"`` or the log's
    ``"mx.example.net[192.0.2.7]:25"`` form; None when no host was reached.
    ``action``: ``"failed"`` (4.x.x or 5.x.x) or ``"delayed"`` (4.x.x) (RFC 3464 2.3.3).
    ``last_attempt``: when the last attempt was made (epoch seconds); None means ``now``.
    ``will_retry_until``: for a delayed recipient, when the relay gives up (RFC 3464 2.3.9).
    """

    address: str
    status: str
    diagnostic: str | None
    remote_mta: str | None
    action: str = "failed"
    last_attempt: float | None = None
    will_retry_until: float | None = None


def build_dsn(
    *,
    queue_id: str,
    original_sender: str,
    recipients: list[FailedRecipient],
    original_message: bytes,
    reporting_mta: str,
    arrival_date: float,
    now: float,
    postmaster: str | None = None,
    include_body: bool = False,
    max_returned: int = 64 * 1024,
    rng: random.Random | None = None,
) -> bytes | None:
    """Build the notification for `recipients` of message `queue_id`, or None.

    None when `original_sender` is the null reverse-path "": RFC 5321 4.5.5 and 6.1, a
    notification is never sent about a message that has none, so bounces cannot loop.

    Otherwise the complete message (CRLF line endings, no line over 998 octets) to send
    from the null reverse-path to `original_sender`. Its Subject says "delayed" only when
    every recipient is delayed. `postmaster` is the address named in the text for help
    (default ``postmaster@<reporting_mta>``). `rng` makes the Message-ID and MIME
    boundary (default: the system's random source). See the module docstring for how the
    original is returned and when the result is 8-bit.

    Raises ValueError for a caller's mistake: no recipients, an action that is neither
    "failed" nor "delayed", or a status that is not an RFC 3463 code fitting the action.
    """
    if original_sender == "":
        return None
    if not recipients:
        raise ValueError("a delivery status notification needs at least one recipient")
    for rcpt in recipients:
        _check_status(rcpt)
    rng = rng if rng is not None else random.SystemRandom()

    mta = _host(reporting_mta, ascii_only=True) or "localhost"
    sender = _address(original_sender)
    addresses = [_address(r.address) for r in recipients]
    # RFC 6533 3 and 4: a non-ASCII address needs the utf-8 address type, which only a
    # message/global-delivery-status may carry unencoded.
    global_report = not sender.isascii() or not all(a.isascii() for a in addresses)

    returned = _returned_part(original_message, include_body=include_body,
                              max_returned=max_returned)
    text = _human_text(recipients, addresses, mta=mta, postmaster=postmaster,
                       arrival_date=arrival_date, now=now, returned=returned,
                       include_body=include_body, utf8=global_report)
    status = _delivery_status(recipients, addresses, queue_id=queue_id, mta=mta,
                              sender=sender, arrival_date=arrival_date, now=now,
                              utf8=global_report)

    text_bytes = _crlf_lines(text)
    status_bytes = _crlf_lines(status)
    parts: list[tuple[list[str], bytes]] = [
        (["Content-Description: Notification",
          "Content-Type: text/plain; charset=" + ("us-ascii" if text_bytes.isascii() else "utf-8"),
          *([] if text_bytes.isascii() else ["Content-Transfer-Encoding: 8bit"])],
         text_bytes),
        (["Content-Description: Delivery report",
          "Content-Type: message/" + ("global-" if global_report else "") + "delivery-status",
          *([] if status_bytes.isascii() else ["Content-Transfer-Encoding: 8bit"])],
         status_bytes),
    ]
    if returned is not None:
        parts.append((returned.headers, returned.content))

    content = b"".join(body for _, body in parts)
    boundary = _boundary(rng, queue_id, content)
    eight_bit = not content.isascii()
    all_delayed = all(r.action == "delayed" for r in recipients)

    head = [
        f"Date: {_date(now)}",
        f"From: Mail Delivery System <MAILER-DAEMON@{mta}>",
        f"To: <{sender}>",
        f"Subject: {SUBJECT_DELAYED if all_delayed else SUBJECT_FAILED}",
        f"Message-ID: <{_atext(queue_id) or 'dsn'}.dsn.{rng.getrandbits(64):016x}@{mta}>",
    ]
    original_id = _original_message_id(original_message)
    if original_id:
        # Threading in the sender's mail reader, as Postfix does.
        head += [f"In-Reply-To: {original_id}", f"References: {original_id}"]
    head += [
        # RFC 3834 5: a notification is an automatic response; it must not be answered.
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        # RFC 6522 3: report-type names the report; Postfix keeps "delivery-status" for
        # the global form too, and readers accept it.
        "Content-Type: multipart/report; report-type=delivery-status;",
        f'\tboundary="{boundary}"',
    ]
    if eight_bit:
        # RFC 2045 6.4: a multipart holding 8bit parts is itself labelled 8bit.
        head.append("Content-Transfer-Encoding: 8bit")

    out = [_crlf_lines([*head, "", "This is a MIME-encapsulated message.", ""])]
    for part_headers, body in parts:
        out.append(_crlf_lines([f"--{boundary}", *part_headers, ""]))
        out.append(body)
        out.append(b"\r\n")  # the CRLF of the delimiter (RFC 2046 5.1.1)
    out.append(_crlf_lines([f"--{boundary}--"]))
    return b"".join(out)


# --- validation and cleaning -------------------------------------------------------------

def _check_status(rcpt: FailedRecipient) -> None:
    m = _STATUS.match(rcpt.status)
    if rcpt.action not in ("failed", "delayed"):
        raise ValueError(f"action must be 'failed' or 'delayed', not {rcpt.action!r}")
    if m is None:
        raise ValueError(f"status {rcpt.status!r} is not an RFC 3463 enhanced status code")
    # RFC 3464 2.3.3/2.3.4: Status is the last status seen. A failure is 5.x.x, or the last
    # 4.x.x when the relay gave up after transient errors (an expiry, as Postfix reports
    # it); a delay is 4.x.x.
    allowed = "45" if rcpt.action == "failed" else "4"
    if m.group(1) not in allowed:
        raise ValueError(f"status {rcpt.status} does not fit action {rcpt.action!r}")


def _clean_text(text: str, *, ascii_only: bool, limit: int = _MAX_DIAGNOSTIC) -> str:
    """Text from a remote server, made safe for one header field: no CR, LF or other
    control character (a header injection would otherwise start a field or a MIME part
    of its own), white space collapsed, bounded in length."""
    text = _SPACE_OR_CONTROL.sub(" ", text).strip()
    text = _SURROGATE.sub("?", text)  # undecodable bytes from the peer
    if ascii_only:
        text = _NON_ASCII.sub("?", text)
    if len(text) > limit:
        text = text[: limit - 4].rstrip() + " ..."
    return text


def _address(address: str) -> str:
    """An envelope address for a header field: the edge has validated it; control
    characters are removed all the same so that none reaches a header."""
    return _SURROGATE.sub("?", _CONTROL.sub("", address))


def _host(name: str, *, ascii_only: bool) -> str:
    """A host name for a ``dns;`` field (RFC 3464 2.1.2): A-labels when it is an IDN."""
    name = _clean_text(name, ascii_only=False, limit=255).replace(" ", "")
    if not name.isascii():
        try:
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            if ascii_only:
                name = _NON_ASCII.sub("?", name)
    return name


def _remote_mta(remote: str) -> str:
    """The name for Remote-MTA from "host[ip]:port" and its shorter forms."""
    m = _REMOTE.match(remote.strip())
    if m is None:
        return _host(remote, ascii_only=True)
    host, ip = m.group("host"), m.group("ip")
    if host and host.lower() != "unknown":
        return _host(host, ascii_only=True)
    if ip:
        return f"[{_host(ip, ascii_only=True)}]"
    return _host(remote, ascii_only=True)


def _atext(value: str) -> str:
    """Only RFC 5322 atext and dots, for an id-left."""
    return re.sub(r"[^A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]", "", value)[:64]


def _date(ts: float) -> str:
    """RFC 5322 3.3 date-time in UTC, "+0000" (never the obsolete "GMT")."""
    return format_datetime(datetime.fromtimestamp(ts, tz=UTC))


def _octets(text: str) -> int:
    return len(text.encode("utf-8"))


def _split_octets(word: str, limit: int) -> list[str]:
    """Cut `word` into pieces of at most `limit` UTF-8 octets, never inside a character."""
    pieces, current, size = [], [], 0
    for ch in word:
        n = _octets(ch)
        if size + n > limit and current:
            pieces.append("".join(current))
            current, size = [], 0
        current.append(ch)
        size += n
    pieces.append("".join(current))
    return pieces


def _fold(name: str, value: str) -> list[str]:
    """``name: value`` folded at its spaces to lines of at most 78 octets where it can
    (RFC 5322 2.2.3: a fold goes before existing white space, so unfolding gives the
    value back). A word too long for any line is split, which adds a space there."""
    lines: list[str] = []
    current = f"{name}:"
    for word in value.split(" "):
        for piece in _split_octets(word, _HARD_LIMIT - 10 - len(name)):
            if current == f"{name}:" or _octets(current) + 1 + _octets(piece) <= _SOFT_LIMIT:
                current += " " + piece
            else:
                lines.append(current)
                current = " " + piece
    lines.append(current)
    return lines


def _crlf_lines(lines: list[str]) -> bytes:
    return "".join(line + "\r\n" for line in lines).encode("utf-8")


def _boundary(rng: random.Random, queue_id: str, content: bytes) -> str:
    """A MIME boundary (RFC 2046 5.1.1) that occurs nowhere in the content."""
    while True:
        boundary = f"{_atext(queue_id)[:20].replace('=', '')}.{rng.getrandbits(128):032x}/dsn"
        if boundary.encode("ascii") not in content:
            return boundary


# --- part 2: message/delivery-status -----------------------------------------------------

def _typed_address(address: str) -> str:
    """RFC 3464 2.3.2 address-type; RFC 6533 3: "utf-8" (utf-8-address form, allowed in
    message/global-delivery-status) for a non-ASCII address."""
    return f"{'rfc822' if address.isascii() else 'utf-8'}; {address}"


def _delivery_status(
    recipients: list[FailedRecipient], addresses: list[str], *, queue_id: str, mta: str,
    sender: str, arrival_date: float, now: float, utf8: bool,
) -> list[str]:
    # RFC 3464 2.2: the per-message fields, then a blank line before each recipient block.
    lines = [
        f"Reporting-MTA: dns; {mta}",
        *_fold("X-Relay-Queue-ID", _clean_text(queue_id, ascii_only=True, limit=64)),
        f"X-Relay-Sender: {_typed_address(sender)}",
        f"Arrival-Date: {_date(arrival_date)}",
    ]
    for rcpt, address in zip(recipients, addresses, strict=True):
        lines += [
            "",
            f"Final-Recipient: {_typed_address(address)}",
            f"Action: {rcpt.action}",
            f"Status: {rcpt.status}",
        ]
        if rcpt.remote_mta:
            lines += _fold("Remote-MTA", f"dns; {_remote_mta(rcpt.remote_mta)}")
        if rcpt.diagnostic:
            # RFC 3464 2.3.6: diagnostic-type "smtp" for a reply of an SMTP server. In a
            # 7-bit report the text is made ASCII; the global form may carry UTF-8.
            diagnostic = _clean_text(rcpt.diagnostic, ascii_only=not utf8)
            if diagnostic:
                lines += _fold("Diagnostic-Code", f"smtp; {diagnostic}")
        lines.append(f"Last-Attempt-Date: {_date(rcpt.last_attempt or now)}")
        if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
            lines.append(f"Will-Retry-Until: {_date(rcpt.will_retry_until)}")
    return lines


# --- part 1: the human explanation -------------------------------------------------------

def _explain(status: str) -> str:
    _, subject, detail = status.split(".")
    return _DETAIL_TEXT.get(f"{subject}.{detail}") or _SUBJECT_TEXT.get(subject, "error")


def _recipient_paragraph(rcpt: FailedRecipient, address: str, *, utf8: bool) -> list[str]:
    diagnostic = _clean_text(rcpt.diagnostic, ascii_only=not utf8) if rcpt.diagnostic else ""
    if diagnostic and rcpt.remote_mta:
        reason = f"host {_remote_mta(rcpt.remote_mta)} said: {diagnostic}"
    elif diagnostic:
        reason = diagnostic
    else:
        reason = f"{_explain(rcpt.status)} ({rcpt.status})"
    if rcpt.action == "delayed" and rcpt.will_retry_until is not None:
        reason += f" (will be retried until {_date(rcpt.will_retry_until)})"
    return textwrap.wrap(f"<{address}>: {reason}", width=_TEXT_WIDTH,
                         subsequent_indent="    ", break_on_hyphens=False) or [""]


def _duration(seconds: float) -> str:
    minutes = max(int(seconds // 60), 0)
    if minutes < 120:
        return f"{minutes} minute(s)"
    hours = minutes // 60
    if hours < 48:
        return f"{hours} hour(s)"
    return f"{hours // 24} day(s)"


def _wrap(paragraph: str) -> list[str]:
    return textwrap.wrap(paragraph, width=_TEXT_WIDTH, break_on_hyphens=False)


def _human_text(
    recipients: list[FailedRecipient], addresses: list[str], *, mta: str,
    postmaster: str | None, arrival_date: float, now: float, returned: _Returned | None,
    include_body: bool, utf8: bool,
) -> list[str]:
    failed = [(r, a) for r, a in zip(recipients, addresses, strict=True) if r.action == "failed"]
    delayed = [(r, a) for r, a in zip(recipients, addresses, strict=True)
               if r.action == "delayed"]
    helper = _address(postmaster) if postmaster else f"postmaster@{mta}"
    if returned is None:
        attached = "Your message is not attached."
    elif returned.full:
        attached = "Your message is attached below."
    elif include_body:
        attached = ("Your message could not be returned in full (it is too large); its "
                    "headers are attached below.")
    else:
        attached = "The headers of your message are attached below."

    lines = [f"This is the mail system at host {mta}.", ""]
    if failed:
        lines += _wrap("I'm sorry to have to inform you that your message could not be "
                       f"delivered to one or more recipients. {attached}")
    else:
        banner = "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #"
        lines += ["#" * len(banner), banner, "#" * len(banner), ""]
        retry = [r.will_retry_until for r, _ in delayed if r.will_retry_until is not None]
        sentence = ("Your message has not been delivered to all of its recipients after "
                    f"{_duration(now - arrival_date)}.")
        if retry:
            sentence += f" It will be retried until {_date(max(retry))}."
        lines += _wrap(f"{sentence} {attached}")
    lines += [""]
    lines += _wrap(f"For further assistance, please send mail to <{helper}>. If you do "
                   "so, please include this problem report. You can delete your own text "
                   "from the attached returned message.")
    lines += ["", "                   The mail system"]
    for rcpt, address in failed:
        lines += ["", *_recipient_paragraph(rcpt, address, utf8=utf8)]
    if failed and delayed:
        lines += ["", *_wrap("Delivery to the following recipients is still being "
                             "retried; you do not need to resend your message to them:")]
    for rcpt, address in delayed:
        lines += ["", *_recipient_paragraph(rcpt, address, utf8=utf8)]
    return lines


# --- part 3: the original ----------------------------------------------------------------

@dataclass(frozen=True)
class _Returned:
    headers: list[str]   # the MIME part's own header lines
    content: bytes       # its content, every line ending in CRLF
    full: bool           # the whole message, or only its header section


def _normalise(data: bytes) -> bytes:
    """Every line ending as CRLF, the last line terminated."""
    data = _ANY_EOL.sub(b"\r\n", data)
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


def _split_header(raw: bytes) -> tuple[bytes, bytes | None]:
    """The raw header section (through the end of its last line) and the body (None when
    the message has no blank line)."""
    m = _ANY_EOL.match(raw)
    if m:  # a blank first line: no header section at all
        return b"", raw[m.end():]
    m = _HEADER_END.search(raw)
    if m is None:
        return raw, None
    first = _ANY_EOL.match(raw, m.start())
    assert first is not None
    return raw[: first.end()], raw[m.end():]


def _returned_part(original: bytes, *, include_body: bool, max_returned: int) -> _Returned | None:
    if max_returned <= 0:
        return None
    raw_head, _ = _split_header(original)
    if include_body and len(original) <= max_returned:
        whole = _returned_whole(original, raw_head)
        if whole is not None and len(whole.content) <= max_returned:
            return whole
    return _returned_headers(raw_head, max_returned)


def _returned_whole(original: bytes, raw_head: bytes) -> _Returned | None:
    """The whole message, unchanged but for line endings, or None when it cannot be
    returned as it is (a line too long, a NUL, a header section that is not UTF-8)."""
    message = _normalise(original)
    if b"\x00" in message or any(len(line) > _HARD_LIMIT
                                 for line in message.split(b"\r\n")):
        return None
    head = _normalise(raw_head)
    if head.isascii():
        content_type = "Content-Type: message/rfc822"
    else:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return None
        # RFC 6532 3.7: a message with UTF-8 header fields is a message/global.
        content_type = "Content-Type: message/global"
    headers = ["Content-Description: Undelivered Message", content_type]
    if not message.isascii():
        # RFC 2046 5.2.1: message/rfc822 may only be 7bit, 8bit or binary.
        headers.append("Content-Transfer-Encoding: 8bit")
    return _Returned(headers, message, full=True)


def _fold_long_line(line: bytes) -> list[bytes]:
    """A header line of more than 998 octets as several: folded before white space
    where there is some, otherwise split (the continuation starts with a space)."""
    out: list[bytes] = []
    while len(line) > _HARD_LIMIT:
        cut = max(line.rfind(b" ", 1, _HARD_LIMIT), line.rfind(b"\t", 1, _HARD_LIMIT))
        if cut > 0:
            out.append(line[:cut])
            line = line[cut:]
        else:
            cut = _HARD_LIMIT - 1
            while cut > 1 and line[cut] & _UTF8_TAIL_MASK == _UTF8_TAIL:  # not mid-character
                cut -= 1
            out.append(line[:cut])
            line = b" " + line[cut:]
    out.append(line)
    return out


def _returned_headers(raw_head: bytes, max_returned: int) -> _Returned:
    """The header section, cleaned and cut to at most `max_returned` octets."""
    # Normalising only makes data longer, so a prefix of this size is always enough; it
    # is cut back to its last line ending so that no partial line looks complete.
    limit = max_returned + 2
    rest_is_continuation = False
    if len(raw_head) > limit:
        cut = max(raw_head.rfind(b"\n", 0, limit), raw_head.rfind(b"\r", 0, limit)) + 1
        if cut == 0:  # one enormous line: keep its start, folded below
            cut = limit
        elif raw_head[cut - 1:cut] == b"\r" and raw_head[cut:cut + 1] == b"\n":
            cut += 1
        rest_is_continuation = raw_head[cut:cut + 1] in _WSP
        raw_head = raw_head[:cut]
    text = _normalise(raw_head).decode("utf-8", errors="replace").encode("utf-8")
    lines: list[bytes] = []
    for line in text.split(b"\r\n")[:-1]:
        lines += _fold_long_line(_BYTE_CONTROL.sub(b"", line))
    # Whole lines, not more than max_returned octets in all.
    kept, size = 0, 0
    while kept < len(lines) and size + len(lines[kept]) + 2 <= max_returned:
        size += len(lines[kept]) + 2
        kept += 1
    # A field whose continuation lines did not fit goes too, unless it is the first.
    next_is_continuation = lines[kept][:1] in _WSP if kept < len(lines) else rest_is_continuation
    if next_is_continuation:
        start = kept
        while start > 0 and lines[start - 1][:1] in _WSP:
            start -= 1
        if start > 1:
            kept = start - 1
    content = b"".join(line + b"\r\n" for line in lines[:kept])
    if content.isascii():
        headers = ["Content-Description: Undelivered Message Headers",
                   "Content-Type: text/rfc822-headers"]
    else:
        # RFC 6533 4: UTF-8 header fields are returned as message/global-headers.
        headers = ["Content-Description: Undelivered Message Headers",
                   "Content-Type: message/global-headers",
                   "Content-Transfer-Encoding: 8bit"]
    return _Returned(headers, content, full=False)


def _original_message_id(original: bytes) -> str | None:
    """The Message-ID of the original when it is a plain ASCII msg-id, for threading."""
    raw_head, _ = _split_header(original[: 256 * 1024])
    unfolded = re.sub(rb"(?:\r\n|\r|\n)(?=[ \t])", b"", raw_head)
    for line in _ANY_EOL.split(unfolded):
        name, colon, value = line.partition(b":")
        if colon and name.strip().lower() == b"message-id":
            text = value.decode("ascii", errors="replace").strip()
            return text if _MSGID.match(text) else None
    return None
