"""Reply texts and codes (STYLE rule 4), aiosmtpd's built-in replies made precise, and the
one function that reads a next hop's reply (STYLE rule 3)."""

from __future__ import annotations

import re

import pytest

from relay import replies
from relay.outbound.classify import Action, Category, SmtpReply, classify, parse_reply
from relay.replies import CATALOGUE, Reply, with_enhanced_code

# RFC 3463 section 2: class "." subject "." detail; subject and detail 1 to 3 digits.
ENHANCED = re.compile(r"^([245])\.(0|[1-9]\d{0,2})\.(0|[1-9]\d{0,2})$")


def test_the_catalogue_holds_every_reply() -> None:
    assert len(CATALOGUE) >= 30
    assert CATALOGUE["R451_QUEUE_WRITE"] is replies.R451_QUEUE_WRITE
    assert all(name.startswith("R") for name in CATALOGUE)


@pytest.mark.parametrize(("name", "reply"), sorted(CATALOGUE.items()))
def test_every_reply_has_valid_codes_and_text(name: str, reply: Reply) -> None:
    assert isinstance(reply.code, int)
    assert reply.code // 100 in (2, 4, 5), name
    assert 200 <= reply.code <= 559, name
    m = ENHANCED.match(reply.enhanced)
    assert m, f"{name}: {reply.enhanced!r} is not class.subject.detail (RFC 3463)"
    assert m.group(1) == str(reply.code)[0], f"{name}: class differs from the basic code"
    assert reply.text.strip() == reply.text and reply.text, name
    assert "\r" not in reply.text and "\n" not in reply.text, name
    assert reply.text.isascii(), name
    # The name says the basic code (R4XX_* names a class, not a code).
    digits = re.match(r"^R(\d)(\d\d|XX)_", name)
    assert digits, name
    assert digits.group(1) == str(reply.code)[0], name
    if digits.group(2) != "XX":
        assert int(name[1:4]) == reply.code, name


@pytest.mark.parametrize(("name", "reply"), sorted(CATALOGUE.items()))
def test_every_reply_formats_into_one_wire_line(name: str, reply: Reply) -> None:
    fields = {f: "x" for f in re.findall(r"{(\w+)}", reply.text)}
    line = reply.format(**fields)
    assert line.startswith(f"{reply.code} {reply.enhanced} "), name
    assert "{" not in line and "}" not in line, name
    assert with_enhanced_code(line) == line, name   # already carries its code: untouched
    assert len(line.encode()) + 2 <= 512             # RFC 5321 4.5.3.1.5: reply line length
    if not fields:
        assert str(reply) == line


def test_permanent() -> None:
    assert replies.R550_RELAY_DENIED.permanent
    assert not replies.R451_QUEUE_WRITE.permanent
    assert not replies.R250_OK.permanent


@pytest.mark.parametrize(("line", "expected"), [
    # aiosmtpd 1.4's own replies, as it pushes them
    ("500 Error: bad syntax", "500 5.5.2 Error: bad syntax"),
    ("500 Command line too long", "500 5.5.2 Command line too long"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Error: strict ASCII mode"),
    ('500 Error: command "FOO" not recognized', '500 5.5.1 Error: command "FOO" not recognized'),
    ("501 Syntax: HELO hostname", "501 5.5.4 Syntax: HELO hostname"),
    ("501 Syntax: MAIL FROM: <address>", "501 5.5.4 Syntax: MAIL FROM: <address>"),
    ("501 Error: SMTPUTF8 takes no arguments", "501 5.5.4 Error: SMTPUTF8 takes no arguments"),
    ("502 EXPN not implemented", "502 5.5.1 EXPN not implemented"),
    ("503 Error: need MAIL command", "503 5.5.1 Error: need MAIL command"),
    ("503 Error: nested MAIL command", "503 5.5.1 Error: nested MAIL command"),
    ("503 Error: need RCPT command", "503 5.5.1 Error: need RCPT command"),
    ("503 Error: send HELO first", "503 5.5.1 Error: send HELO first"),
    ("530 Must issue a STARTTLS command first", "530 5.7.0 Must issue a STARTTLS command first"),
    ("552 Error: Too much mail data", str(replies.R552_TOO_BIG)),
    ("500 Line too long (see RFC5321 4.5.3.1.6)", str(replies.R554_LINE_TOO_LONG)),
    ("250 OK", "250 2.0.0 OK"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("454 TLS not available", "454 4.0.0 TLS not available"),
    ("421 Service not available", "421 4.4.2 Service not available"),
    # left alone: no enhanced code belongs on these (RFC 2034 section 3)
    ("354 End data with <CR><LF>.<CR><LF>", "354 End data with <CR><LF>.<CR><LF>"),
    ("220 relay.test ESMTP relay 0.1.0", "220 relay.test ESMTP relay 0.1.0"),
    ("220 Ready to start TLS", "220 Ready to start TLS"),
    ("334 VXNlcm5hbWU6", "334 VXNlcm5hbWU6"),
    # left alone: they already carry an enhanced code
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Error: malformed address"),
    ("530 5.7.0 Authentication required", "530 5.7.0 Authentication required"),
    ("504 5.5.4 Unrecognized authentication type", "504 5.5.4 Unrecognized authentication type"),
    ("421 4.7.0 HELO sent too many times", "421 4.7.0 HELO sent too many times"),
    ("235 2.7.0 Authentication successful", "235 2.7.0 Authentication successful"),
    ("250 2.0.0 Ok: queued as 7F3A9C21D0", "250 2.0.0 Ok: queued as 7F3A9C21D0"),
    ("451 4.3.0 Error: queue file write error", "451 4.3.0 Error: queue file write error"),
    # not reply lines at all
    ("", ""), ("OK", "OK"), ("25", "25"),
])
def test_with_enhanced_code(line: str, expected: str) -> None:
    assert with_enhanced_code(line) == expected


def test_with_enhanced_code_keeps_the_continuation_mark() -> None:
    assert with_enhanced_code("250-Help follows") == "250-2.0.0 Help follows"


# --- parse_reply and classify ------------------------------------------------------------------

@pytest.mark.parametrize(("code", "message", "enhanced", "text"), [
    (250, "2.0.0 Ok: queued as ABC", "2.0.0", "Ok: queued as ABC"),
    (250, "Ok", None, "Ok"),
    (550, "5.1.1 <x@example.net>: Recipient address rejected: User unknown",
     "5.1.1", "<x@example.net>: Recipient address rejected: User unknown"),
    (550, ("5.1.1 The email account that you tried to reach does not exist.\n"
           "5.1.1 Please try double-checking the recipient's email address.\n"
           "5.1.1 https://support.example/mail/?p=NoSuchUser"),
     "5.1.1", ("The email account that you tried to reach does not exist. Please try "
               "double-checking the recipient's email address. https://support.example/mail/"
               "?p=NoSuchUser")),
    (451, "first line without a code\r\n4.7.1 greylisted, try later", "4.7.1",
     "first line without a code greylisted, try later"),
    (550, "5.7.1 first\n5.7.1 second\nlast line has no code", None,
     "5.7.1 first 5.7.1 second last line has no code"),
    (550, "4.1.1 class does not match the basic code", None,
     "4.1.1 class does not match the basic code"),
    (556, "5.1.10 Recipient address has null MX", "5.1.10",
     "Recipient address has null MX"),
    (421, "", None, ""),
    (550, "\n\n5.2.2 mailbox full\n\n", "5.2.2", "mailbox full"),
])
def test_parse_reply(code: int, message: str, enhanced: str | None, text: str) -> None:
    assert parse_reply(code, message) == SmtpReply(code, enhanced, text)


def test_smtp_reply_str() -> None:
    assert str(SmtpReply(550, "5.1.1", "unknown")) == "550 5.1.1 unknown"
    assert str(SmtpReply(250, None, "Ok")) == "250 Ok"
    assert str(SmtpReply(421, None, "")) == "421"


@pytest.mark.parametrize(("code", "message", "category", "action", "suppress"), [
    (250, "2.0.0 Ok", Category.DELIVERED, Action.DELIVERED, False),
    (251, "User not local; will forward", Category.DELIVERED, Action.DELIVERED, False),
    (550, "5.1.1 User unknown", Category.HARD, Action.BOUNCE, True),
    (556, "5.1.10 null MX", Category.HARD, Action.BOUNCE, True),
    (550, "5.7.1 Message rejected as spam", Category.CONTENT, Action.BOUNCE, False),
    (554, "5.7.1 Service unavailable; client host blocked", Category.BLOCK, Action.BOUNCE,
     False),
    (552, "5.2.2 Mailbox full", Category.SOFT, Action.DEFER, False),
    (552, "5.3.4 Message too big", Category.RELAY_SIDE, Action.BOUNCE, False),
    (550, "5.6.0 Malformed message", Category.CONTENT, Action.BOUNCE, False),
    (450, "4.1.1 user lookup failed, try later", Category.UNKNOWN, Action.DEFER, False),
    (450, "4.2.1 Mailbox busy", Category.SOFT, Action.DEFER, False),
    (451, "4.7.1 Greylisted", Category.BLOCK, Action.DEFER, False),
    (421, "4.7.0 Too many connections", Category.RATE_LIMITED, Action.DEFER, False),
    (421, "Too many messages from your IP", Category.RATE_LIMITED, Action.DEFER, False),
    (451, "4.3.0 Local error", Category.UNKNOWN, Action.DEFER, False),
    (550, "Mailbox unavailable", Category.HARD, Action.BOUNCE, True),
    (554, "5.0.0 Transaction failed", Category.UNKNOWN, Action.BOUNCE, False),
    (550, "5.1.2 Bad destination system address", Category.UNKNOWN, Action.BOUNCE, False),
])
def test_classify(code: int, message: str, category: Category, action: Action,
                  suppress: bool) -> None:
    verdict = classify(parse_reply(code, message))
    assert (verdict.category, verdict.action, verdict.suppress) == (category, action, suppress)


@pytest.mark.parametrize(("enhanced", "suppress"), [
    ("5.1.1", True), ("5.1.10", True),
    ("5.7.1", False), ("5.2.2", False), ("5.3.4", False), ("5.1.2", False), ("5.1.3", False),
    ("5.1.0", False), ("5.7.26", False), ("5.4.4", False), ("5.0.0", False),
])
def test_only_replies_about_the_recipient_suppress(enhanced: str, suppress: bool) -> None:
    """Invariant 5: user unknown and null MX suppress; policy, size, reputation never."""
    assert classify(SmtpReply(550, enhanced, "x")).suppress is suppress
    assert classify(SmtpReply(450, "4" + enhanced[1:], "x")).suppress is False
    assert classify(SmtpReply(250, "2.0.0", "x")).suppress is False
