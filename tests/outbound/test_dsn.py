"""The delivery status notification (relay.outbound.dsn), read back with Python's email package.

Every result is parsed as a reader would (policy=email.policy.default); the
delivery-status fields are also read straight from the bytes, so the global
(UTF-8) form, which the email package does not split into blocks, is checked the same way.
"""

from __future__ import annotations

import email
import email.policy
import random
from dataclasses import dataclass
from email.message import EmailMessage
from email.parser import Parser
from email.utils import parsedate_to_datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.outbound.dsn import (
    SUBJECT_DELAYED,
    SUBJECT_FAILED,
    FailedRecipient,
    build_dsn,
)

ARRIVAL = 1_796_292_000.0          # 2026-12-03T10:00:00Z
NOW = ARRIVAL + 3 * 3600.0
ORIGINAL = (
    b"Received: from app1 (app1 [10.0.0.5])\r\n"
    b"\tby relay.example.test with ESMTP id 7F3A9C21D0\r\n"
    b"From: Shop <news@example.com>\r\n"
    b"To: a@example.net, b@example.org\r\n"
    b"Subject: Your order\r\n"
    b"Message-ID: <order-42@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"\r\n"
    b"Thank you for your order.\r\n"
)
USER_UNKNOWN = FailedRecipient(
    "a@example.net", "5.1.1", "550 5.1.1 <a@example.net>: Recipient address rejected: "
    "User unknown", "mx.example.net[192.0.2.7]:25")
EXPIRED = FailedRecipient("b@example.org", "4.4.7", None, None)
GREYLISTED = FailedRecipient(
    "c@example.org", "4.2.0", "451 4.2.0 Greylisted, try again later",
    "mx.example.org[192.0.2.8]:25", action="delayed", will_retry_until=ARRIVAL + 5 * 86400)


def dsn(**kw: object) -> bytes:
    args: dict[str, object] = {
        "queue_id": "7F3A9C21D0", "original_sender": "news@example.com",
        "recipients": [USER_UNKNOWN], "original_message": ORIGINAL,
        "reporting_mta": "relay.example.test", "arrival_date": ARRIVAL, "now": NOW,
        "rng": random.Random(7),
    }
    args.update(kw)
    out = build_dsn(**args)  # type: ignore[arg-type]
    assert out is not None
    return out


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


@dataclass
class Part:
    headers: EmailMessage
    content: bytes


def raw_parts(raw: bytes) -> list[Part]:
    """The parts of the report as bytes: the MIME headers parsed, the content exact."""
    boundary = parse(raw).get_boundary()
    assert boundary
    chunks = raw.split(b"\r\n--" + boundary.encode())
    assert chunks[-1] == b"--\r\n"
    parts = []
    for chunk in chunks[1:-1]:
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        parts.append(Part(parse(head + b"\r\n\r\n"), content))
    return parts


def status_blocks(raw: bytes) -> list[EmailMessage]:
    """The field blocks of the delivery-status part (per-message first), decoded as UTF-8."""
    text = raw_parts(raw)[1].content.decode("utf-8")
    parser = Parser(policy=email.policy.default)
    return [parser.parsestr(block + "\r\n", headersonly=True)  # type: ignore[misc]
            for block in text.split("\r\n\r\n") if block.strip()]


def flat(text: str) -> str:
    """Prose with its line breaks and indentation made single spaces."""
    return " ".join(text.split())


def lines(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\r\n")
    return raw[:-2].split(b"\r\n")


# --- the null reverse-path, and the caller's mistakes ----------------------------------------

def test_null_sender_gets_no_notification() -> None:
    # RFC 5321 4.5.5 / 6.1: never a notification about a message with a null reverse-path.
    assert build_dsn(queue_id="X", original_sender="", recipients=[USER_UNKNOWN],
                     original_message=ORIGINAL, reporting_mta="relay.example.test",
                     arrival_date=ARRIVAL, now=NOW) is None


@pytest.mark.parametrize(("recipients", "error"), [
    ([], "at least one recipient"),
    ([FailedRecipient("a@example.net", "5.1.1", None, None, action="relayed")], "action"),
    ([FailedRecipient("a@example.net", "2.0.0", None, None)], "does not fit"),
    ([FailedRecipient("a@example.net", "5.1.1", None, None, action="delayed")], "does not fit"),
    ([FailedRecipient("a@example.net", "550", None, None)], "RFC 3463"),
    ([FailedRecipient("a@example.net", "5.1.1\r\nX: y", None, None)], "RFC 3463"),
])
def test_caller_mistakes_raise(recipients: list[FailedRecipient], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        dsn(recipients=recipients)


# --- structure ---------------------------------------------------------------------------

def test_structure_and_top_level_headers() -> None:
    raw = dsn()
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    assert str(msg["From"]) == "Mail Delivery System <MAILER-DAEMON@relay.example.test>"
    assert msg["To"].addresses[0].addr_spec == "news@example.com"
    assert msg["Subject"] == SUBJECT_FAILED
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Content-Transfer-Encoding"] is None
    assert msg["In-Reply-To"] == msg["References"] == "<order-42@example.com>"
    assert parsedate_to_datetime(msg["Date"]).timestamp() == NOW
    assert msg["Date"].endswith("+0000")
    message_id = msg["Message-ID"]
    assert message_id.startswith("<7F3A9C21D0.dsn.")
    assert message_id.endswith("@relay.example.test>")
    assert not msg.defects
    assert all(not p.defects for p in msg.walk())
    # 7-bit when everything is ASCII (RFC 6522 / RFC 3464 content is ASCII text).
    assert raw.isascii()
    text = msg.get_body(("plain",))
    assert text is not None
    assert text.get_content_charset() == "us-ascii"


def test_same_rng_same_bytes_and_fresh_ids_otherwise() -> None:
    assert dsn(rng=random.Random(3)) == dsn(rng=random.Random(3))
    one, two = parse(dsn(rng=random.Random(3))), parse(dsn(rng=random.Random(4)))
    assert one["Message-ID"] != two["Message-ID"]
    assert one.get_boundary() != two.get_boundary()
    assert build_dsn(queue_id="Q", original_sender="s@example.com",
                     recipients=[EXPIRED], original_message=ORIGINAL,
                     reporting_mta="relay.example.test", arrival_date=ARRIVAL, now=NOW)


def test_boundary_never_occurs_in_the_content() -> None:
    first = parse(dsn(rng=random.Random(11))).get_boundary()
    assert first
    # The same random draw would give the same boundary; it is now in the original.
    hostile = ORIGINAL.replace(b"Subject: Your order", b"Subject: --" + first.encode())
    raw = dsn(rng=random.Random(11), original_message=hostile)
    boundary = parse(raw).get_boundary()
    assert boundary
    assert boundary != first
    assert len(raw_parts(raw)) == 3
    assert first.encode() in raw_parts(raw)[2].content


def test_human_text_names_each_recipient_and_its_reason() -> None:
    msg = parse(dsn(recipients=[USER_UNKNOWN, EXPIRED], postmaster="help@example.test"))
    text = msg.get_body(("plain",))
    assert text is not None
    body = text.get_content()
    assert "This is the mail system at host relay.example.test." in body
    assert "could not be delivered to one or more recipients" in flat(body)
    assert "<help@example.test>" in body
    assert "<a@example.net>: host mx.example.net said: 550 5.1.1" in body
    assert "<b@example.org>: delivery time expired (4.4.7)" in body
    assert "still being retried" not in body


# --- the delivery-status fields ------------------------------------------------------------

def test_per_message_fields() -> None:
    per_message = status_blocks(dsn())[0]
    assert per_message["Reporting-MTA"] == "dns; relay.example.test"
    assert per_message["X-Relay-Queue-ID"] == "7F3A9C21D0"
    assert per_message["X-Relay-Sender"] == "rfc822; news@example.com"
    assert parsedate_to_datetime(per_message["Arrival-Date"]).timestamp() == ARRIVAL


def test_per_recipient_fields_for_several_recipients() -> None:
    later = FailedRecipient("d@example.net", "5.7.1", "554 5.7.1 Rejected for policy",
                            "[192.0.2.9]:25", last_attempt=NOW - 60)
    raw = dsn(recipients=[USER_UNKNOWN, EXPIRED, GREYLISTED, later])
    blocks = status_blocks(raw)[1:]
    got = [(str(b["Final-Recipient"]), str(b["Action"]), str(b["Status"]),
            b["Remote-MTA"], b["Diagnostic-Code"]) for b in blocks]
    assert got == [
        ("rfc822; a@example.net", "failed", "5.1.1", "dns; mx.example.net",
         "smtp; 550 5.1.1 <a@example.net>: Recipient address rejected: User unknown"),
        # RFC 3464 2.3.4: an expiry keeps the last (transient) status, action failed.
        ("rfc822; b@example.org", "failed", "4.4.7", None, None),
        ("rfc822; c@example.org", "delayed", "4.2.0", "dns; mx.example.org",
         "smtp; 451 4.2.0 Greylisted, try again later"),
        ("rfc822; d@example.net", "failed", "5.7.1", "dns; [192.0.2.9]",
         "smtp; 554 5.7.1 Rejected for policy"),
    ]
    attempts = [parsedate_to_datetime(b["Last-Attempt-Date"]).timestamp() for b in blocks]
    assert attempts == [NOW, NOW, NOW, NOW - 60]
    assert [b["Will-Retry-Until"] is not None for b in blocks] == [False, False, True, False]
    assert parsedate_to_datetime(blocks[2]["Will-Retry-Until"]).timestamp() == ARRIVAL + 5 * 86400
    # The email package's own reading of message/delivery-status agrees.
    native = parse(raw).get_payload()[1].get_payload()
    assert [str(b["Final-Recipient"]) for b in native[1:]] == [g[0] for g in got]
    assert [str(b["Status"]) for b in native[1:]] == [g[2] for g in got]


@pytest.mark.parametrize(("remote", "field"), [
    ("mx.example.net[192.0.2.7]:25", "dns; mx.example.net"),
    ("mx.example.net[192.0.2.7]", "dns; mx.example.net"),
    ("mx.example.net", "dns; mx.example.net"),
    ("unknown[192.0.2.7]:25", "dns; [192.0.2.7]"),
    ("[2001:db8::25]:25", "dns; [2001:db8::25]"),
    ("smarthost.example.test:2526", "dns; smarthost.example.test"),
    ("bücher.example[192.0.2.7]:25", "dns; xn--bcher-kva.example"),
    (None, None),
])
def test_remote_mta_field(remote: str | None, field: str | None) -> None:
    rcpt = FailedRecipient("a@example.net", "5.1.1", "550 5.1.1 No such user", remote)
    assert status_blocks(dsn(recipients=[rcpt]))[1]["Remote-MTA"] == field


@pytest.mark.parametrize(("recipients", "subject"), [
    ([GREYLISTED], SUBJECT_DELAYED),
    ([GREYLISTED, USER_UNKNOWN], SUBJECT_FAILED),
    ([EXPIRED], SUBJECT_FAILED),
])
def test_subject_says_delayed_only_when_every_recipient_is(
        recipients: list[FailedRecipient], subject: str) -> None:
    msg = parse(dsn(recipients=recipients))
    assert msg["Subject"] == subject
    text = msg.get_body(("plain",))
    assert text is not None
    body = flat(text.get_content())
    if subject == SUBJECT_DELAYED:
        assert "WARNING ONLY" in body
        assert "after 3 hour(s)" in body
        assert "retried until Tue, 08 Dec 2026 10:00:00 +0000" in body
    else:
        assert "WARNING ONLY" not in body
        assert ("still being retried" in body) == (GREYLISTED in recipients)


def test_quoted_local_part_is_kept() -> None:
    rcpt = FailedRecipient('"john doe"@example.net', "5.1.1", "550 5.1.1 No such user", None)
    raw = dsn(recipients=[rcpt], original_sender='"shop team"@example.com')
    msg = parse(raw)
    assert msg["To"].addresses[0].addr_spec == '"shop team"@example.com'
    assert status_blocks(raw)[1]["Final-Recipient"] == 'rfc822; "john doe"@example.net'
    assert raw.isascii()


# --- UTF-8 (RFC 6532 / RFC 6533) -------------------------------------------------------------

UTF8_ORIGINAL = (
    "From: Bücherei <news@example.com>\r\n"
    "To: a@example.net\r\n"
    "Subject: Ihre Bestellung ist unterwegs – danke\r\n"
    "\r\n"
    "Grüße\r\n"
).encode()


def test_utf8_original_headers_are_returned_as_global_headers() -> None:
    raw = dsn(original_message=UTF8_ORIGINAL)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status", "message/global-headers"]
    assert msg["Content-Transfer-Encoding"] == "8bit"
    parts = raw_parts(raw)
    assert parts[2].headers["Content-Transfer-Encoding"] == "8bit"
    assert parts[2].content == UTF8_ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    returned = Parser(policy=email.policy.default).parsestr(parts[2].content.decode("utf-8"))
    assert returned["Subject"] == "Ihre Bestellung ist unterwegs – danke"
    # The report itself stays ASCII: only the returned headers carry UTF-8.
    assert parts[0].content.isascii()
    assert parts[1].content.isascii()


def test_utf8_recipient_gives_global_delivery_status() -> None:
    rcpt = FailedRecipient("jürgen@bücher.example", "5.1.1", "550 5.1.1 Unbekannt",
                           "mx.bücher.example[192.0.2.7]:25")
    raw = dsn(recipients=[rcpt, USER_UNKNOWN])
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/global-delivery-status", "text/rfc822-headers"]
    blocks = status_blocks(raw)
    # RFC 6533 3: the utf-8 address type, the address itself unencoded in the global form.
    assert blocks[1]["Final-Recipient"] == "utf-8; jürgen@bücher.example"
    assert blocks[1]["Remote-MTA"] == "dns; mx.xn--bcher-kva.example"
    assert blocks[2]["Final-Recipient"] == "rfc822; a@example.net"
    parts = raw_parts(raw)
    assert parts[0].headers.get_content_charset() == "utf-8"
    assert parts[0].headers["Content-Transfer-Encoding"] == "8bit"
    assert parts[1].headers["Content-Transfer-Encoding"] == "8bit"
    assert "<jürgen@bücher.example>" in parts[0].content.decode("utf-8")
    assert msg["Content-Transfer-Encoding"] == "8bit"


def test_utf8_sender() -> None:
    raw = dsn(original_sender="bestellung@bücher.example")
    assert status_blocks(raw)[0]["X-Relay-Sender"] == "utf-8; bestellung@bücher.example"
    assert parse(raw).get_payload()[1].get_content_type() == "message/global-delivery-status"
    assert b"To: <bestellung@b\xc3\xbccher.example>\r\n" in raw


def test_non_ascii_reply_text_in_a_7bit_report_becomes_ascii() -> None:
    rcpt = FailedRecipient("a@example.net", "5.1.1", "550 5.1.1 Benutzer unbekannt – ñ", None)
    raw = dsn(recipients=[rcpt])
    assert raw.isascii()
    assert status_blocks(raw)[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Benutzer unbekannt ? ?"


def test_original_headers_that_are_not_utf8_are_repaired() -> None:
    raw = dsn(original_message=b"Subject: caf\xe9\r\nFrom: a@example.com\r\n\r\nbody\r\n")
    parts = raw_parts(raw)
    assert parts[2].headers.get_content_type() == "message/global-headers"
    assert parts[2].content == "Subject: caf\ufffd\r\nFrom: a@example.com\r\n".encode()


# --- header injection ----------------------------------------------------------------------

INJECTION = (
    "550 5.1.1 no\r\nBcc: victim@example.org\r\n\r\n"
    "Final-Recipient: rfc822; forged@example.org\nX-Evil: 1\rY-Evil: 2\x00\x1b[31m"
    "\u2028Z-Evil: 3\x85W-Evil: 4\r\n--7F3A9C21D0\r\nContent-Type: text/html\r\n\r\n<b>"
)


@pytest.mark.parametrize("field", ["diagnostic", "remote_mta", "address"])
def test_injection_stays_inside_one_field(field: str) -> None:
    values = {"address": "a@example.net", "status": "5.1.1",
              "diagnostic": "550 5.1.1 No such user", "remote_mta": "mx.example.net"}
    values[field] = INJECTION if field != "address" else "a@example.net" + INJECTION
    raw = dsn(recipients=[FailedRecipient(**values), EXPIRED],
              reporting_mta="relay.example.test\r\nX-Evil: 0")
    msg = parse(raw)
    assert len(list(msg.iter_parts())) == 3
    for name in ("Bcc", "X-Evil", "Y-Evil", "Z-Evil", "W-Evil"):
        assert msg[name] is None
        assert not any(line.startswith(name.encode()) for line in lines(raw))
    assert not any(line.startswith(b"Final-Recipient: rfc822; forged") for line in lines(raw))
    assert b"\x00" not in raw
    assert b"\x1b" not in raw
    blocks = status_blocks(raw)
    assert len(blocks) == 3
    assert [sorted(b.keys()) for b in blocks[1:]][1] == [
        "Action", "Final-Recipient", "Last-Attempt-Date", "Status"]
    assert set(blocks[1].keys()) <= {
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date"}
    if field == "diagnostic":
        # The text survives, on one (folded) field, with the line breaks made spaces.
        diagnostic = str(blocks[1]["Diagnostic-Code"])
        assert diagnostic.startswith("smtp; 550 5.1.1 no Bcc: victim@example.org ")
        assert "X-Evil: 1 Y-Evil: 2" in diagnostic
    assert status_blocks(raw)[0]["Reporting-MTA"] == "dns; relay.example.testX-Evil:0"


# --- line length ---------------------------------------------------------------------------

def test_every_line_at_most_998_octets_and_ends_in_crlf() -> None:
    long_word = "x" * 5000
    long_utf8 = "ü" * 3000
    spaced = " ".join(["word"] * 2000)
    recipients = [
        FailedRecipient("a@example.net", "5.1.1", f"550 5.1.1 {long_word}", "mx.example.net"),
        FailedRecipient("b@example.net", "5.1.1", f"550 5.1.1 {spaced}", "mx.example.net"),
        FailedRecipient("ü@example.net", "5.1.1", f"550 5.1.1 {long_utf8}", "mx.example.net"),
    ]
    original = (b"Subject: " + b"y" * 3000 + b"\r\nX-Spaced: " + b"z " * 1500 + b"\r\n"
                b"X-Utf8: " + "é".encode() * 1500 + b"\r\n\r\nbody\r\n")
    raw = dsn(recipients=recipients, original_message=original)
    for line in lines(raw):
        assert len(line) <= 998
        assert b"\r" not in line
        assert b"\n" not in line
    blocks = status_blocks(raw)
    # Folding at spaces gives the text back; the bound (STYLE rule 5) keeps it finite.
    spaced_back = str(blocks[2]["Diagnostic-Code"])
    assert spaced_back.startswith("smtp; 550 5.1.1 word word word")
    assert spaced_back.endswith(" ...")
    assert len(spaced_back) <= 2010
    for block in blocks[1:]:
        assert str(block["Diagnostic-Code"]).isprintable()
    # The returned headers were folded, not cut, and the UTF-8 was not split.
    returned = raw_parts(raw)[2].content
    returned.decode("utf-8")
    assert returned.replace(b"\r\n ", b"").replace(b"\r\n", b"").count(b"y") == 3000


def test_original_bare_line_feeds_become_crlf() -> None:
    raw = dsn(original_message=b"Subject: lf\nFrom: a@example.com\r\n\nbody\n",
              include_body=True)
    part = raw_parts(raw)[2]
    assert part.headers.get_content_type() == "message/rfc822"
    assert part.content == b"Subject: lf\r\nFrom: a@example.com\r\n\r\nbody\r\n"


# --- what is returned of the original ------------------------------------------------------

def test_include_body_returns_the_whole_message() -> None:
    raw = dsn(include_body=True)
    msg = parse(raw)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "message/rfc822"
    assert returned["Content-Description"] == "Undelivered Message"
    assert raw_parts(raw)[2].content == ORIGINAL
    inner = returned.get_content()
    assert inner["Message-ID"] == "<order-42@example.com>"
    assert inner.get_content().rstrip() == "Thank you for your order."
    text = msg.get_body(("plain",))
    assert text is not None
    assert "Your message is attached below." in text.get_content()


def test_include_body_8bit_body_is_labelled() -> None:
    original = b"Subject: hi\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"
    part = raw_parts(dsn(include_body=True, original_message=original))[2]
    assert part.headers.get_content_type() == "message/rfc822"
    assert part.headers["Content-Transfer-Encoding"] == "8bit"
    assert part.content == original


def test_include_body_with_utf8_headers_is_message_global() -> None:
    part = raw_parts(dsn(include_body=True, original_message=UTF8_ORIGINAL))[2]
    assert part.headers.get_content_type() == "message/global"
    assert part.headers["Content-Transfer-Encoding"] == "8bit"
    assert part.content == UTF8_ORIGINAL


def test_too_large_message_returns_headers_only() -> None:
    body = b"".join(b"line %05d of a long body\r\n" % i for i in range(5000))
    original = ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n\r\n" + body
    raw = dsn(include_body=True, original_message=original, max_returned=64 * 1024)
    assert len(original) > 64 * 1024
    msg = parse(raw)
    part = raw_parts(raw)[2]
    # Postfix's rule: never cut a message inside its body (it would break its MIME).
    assert part.headers.get_content_type() == "text/rfc822-headers"
    assert part.headers["Content-Description"] == "Undelivered Message Headers"
    assert part.content == ORIGINAL.split(b"\r\n\r\n")[0] + b"\r\n"
    assert b"line 00000" not in raw
    text = msg.get_body(("plain",))
    assert text is not None
    assert "could not be returned in full (it is too large)" in flat(text.get_content())


def test_message_with_an_overlong_line_returns_headers_only() -> None:
    original = b"Subject: x\r\n\r\n" + b"a" * 1200 + b"\r\n"
    part = raw_parts(dsn(include_body=True, original_message=original))[2]
    assert part.headers.get_content_type() == "text/rfc822-headers"
    assert part.content == b"Subject: x\r\n"


def test_header_section_cut_at_a_field_boundary() -> None:
    fields = [b"X-Field-%03d: %s" % (i, b"v" * 40) for i in range(100)]
    folded = b"X-Folded: start\r\n" + b"".join(b"\tcontinued %03d\r\n" % i for i in range(50))
    head = b"\r\n".join(fields[:10]) + b"\r\n" + folded + b"\r\n".join(fields[10:]) + b"\r\n"
    original = head + b"\r\nbody\r\n"
    for limit in (300, 700, 1000, 2000, 5000):
        content = raw_parts(dsn(original_message=original, max_returned=limit))[2].content
        assert len(content) <= limit
        assert content.endswith(b"\r\n")
        assert head.startswith(content)
        if b"X-Folded" in content:
            # Never a field without the rest of its folded lines.
            assert b"\tcontinued 049\r\n" in content
    # The default bound is far above this header section: all of it comes back.
    assert raw_parts(dsn(original_message=original))[2].content == head


def test_first_field_alone_over_the_limit_is_cut_at_a_line() -> None:
    original = b"X-Big: a\r\n" + b"".join(b"\tb%04d\r\n" % i for i in range(400)) + b"\r\nx\r\n"
    content = raw_parts(dsn(original_message=original, max_returned=100))[2].content
    assert content.startswith(b"X-Big: a\r\n\tb0000\r\n")
    assert len(content) <= 100
    assert content.endswith(b"\r\n")


def test_message_without_body_or_headers() -> None:
    no_body = raw_parts(dsn(original_message=b"Subject: only headers\r\n"))[2]
    assert no_body.content == b"Subject: only headers\r\n"
    no_headers = raw_parts(dsn(original_message=b"\r\njust a body\r\n"))[2]
    assert no_headers.headers.get_content_type() == "text/rfc822-headers"
    assert no_headers.content == b""


def test_max_returned_zero_leaves_the_original_out() -> None:
    raw = dsn(max_returned=0, include_body=True)
    msg = parse(raw)
    assert [p.get_content_type() for p in msg.iter_parts()] == [
        "text/plain", "message/delivery-status"]
    assert b"Thank you for your order" not in raw
    assert b"Subject: Your order" not in raw


# --- whatever comes in, a well-formed report comes out -------------------------------------

@settings(max_examples=150, deadline=None)
@given(
    diagnostic=st.one_of(st.none(), st.text(max_size=3000)),
    remote=st.one_of(st.none(), st.text(max_size=300)),
    local=st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), min_size=1,
                  max_size=64),
    original=st.binary(max_size=4000),
    include_body=st.booleans(),
    max_returned=st.integers(min_value=0, max_value=5000),
)
def test_any_input_gives_a_well_formed_report(
        diagnostic: str | None, remote: str | None, local: str, original: bytes,
        include_body: bool, max_returned: int) -> None:
    rcpt = FailedRecipient(f"{local}@example.net", "5.1.1", diagnostic, remote)
    raw = dsn(recipients=[rcpt, EXPIRED], original_message=original,
              include_body=include_body, max_returned=max_returned)
    for line in lines(raw):
        assert len(line) <= 998
        assert b"\r" not in line
        assert b"\n" not in line
    msg = parse(raw)
    assert len(list(msg.iter_parts())) == (3 if max_returned > 0 else 2)
    assert set(msg.keys()) <= {"Date", "From", "To", "Subject", "Message-ID", "In-Reply-To",
                               "References", "Auto-Submitted", "MIME-Version",
                               "Content-Type", "Content-Transfer-Encoding"}
    blocks = status_blocks(raw)
    assert len(blocks) == 3
    assert [str(b["Status"]) for b in blocks[1:]] == ["5.1.1", "4.4.7"]
    assert set(blocks[1].keys()) <= {
        "Final-Recipient", "Action", "Status", "Remote-MTA", "Diagnostic-Code",
        "Last-Attempt-Date"}
    returned_ascii = True
    if max_returned > 0:
        assert len(raw_parts(raw)[2].content) <= max_returned
        returned_ascii = raw_parts(raw)[2].content.isascii()
    # 7-bit exactly when the addresses and the returned original are ASCII.
    assert raw.isascii() == (local.isascii() and returned_ascii)
