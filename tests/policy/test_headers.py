"""Header policy (relay/policy/headers.py): refusals, removals, control headers, added
headers, folding, fidelity, and the python-email corpus. Tables, not mocks."""

from __future__ import annotations

import random
import re
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.policy.headers import (
    BAD_HEADER,
    HEADER_LINE_TOO_LONG,
    HEADER_TOO_LONG,
    MAX_HEADER_SECTION,
    MULTIPLE_FROM,
    NO_FROM,
    REFUSALS,
    HeaderResult,
    HeaderRules,
    apply_header_rules,
    sanitize_token,
)
from tests.conftest import CORPUS

RULES = HeaderRules()
NOW = 1_780_000_000.0
DATE = f"Date: {format_datetime(datetime.fromtimestamp(NOW, UTC))}".encode()
MESSAGE_ID = re.compile(rb"^Message-ID: <([0-9a-f]{32})@relay\.test>$")
FEEDBACK = b"Feedback-ID: none:shop:marketing:relay"
TOKEN = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
CRLF = b"\r\n"


def msg(*headers: str | bytes, body: bytes | None = b"Hello.\r\n") -> bytes:
    """A message from header lines (CRLF added); body None means headers only."""
    head = b"".join((h.encode() if isinstance(h, str) else h) + CRLF for h in headers)
    return head if body is None else head + CRLF + body


def run(message: bytes, rules: HeaderRules = RULES, *, app: str | None = "shop",
        hostname: str = "relay.test", stream: str = "marketing", seed: int = 7) -> HeaderResult:
    """The policy with fixed time and randomness."""
    return apply_header_rules(message, rules, app=app, hostname=hostname, now=NOW,
                              stream=stream, rng=random.Random(seed))


def split(message: bytes) -> tuple[list[bytes], bytes | None]:
    """Header lines (without CRLF) and the body (None when there is no blank line)."""
    if message.startswith(CRLF):
        return [], message[2:]
    head, sep, body = message.partition(b"\r\n\r\n")
    if not sep:
        return (head.removesuffix(CRLF).split(CRLF) if head else []), None
    return head.split(CRLF), body


def accepted(result: HeaderResult) -> bytes:
    """The new message of an accepted result."""
    assert result.refusal is None, result.refusal
    assert result.message is not None
    return result.message


def added_lines(original: bytes, result: bytes) -> list[bytes]:
    """The header lines of `result` after those of `original`, which must be its prefix."""
    before, _ = split(original)
    after, _ = split(result)
    assert after[:len(before)] == before
    return after[len(before):]


def unfold(lines: list[bytes]) -> list[bytes]:
    """RFC 5322 2.2.3: join continuation lines to their field."""
    fields: list[bytes] = []
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            fields[-1] += line
        else:
            fields.append(line)
    return fields


BASE = ("From: Shop <news@example.com>", "To: reader@example.net", "Subject: Spring sale",
        "Message-ID: <abc@example.com>", f"Date: {format_datetime(datetime.fromtimestamp(0, UTC))}")

# --- refusals -------------------------------------------------------------------------------


def _big_header(size: int, *, body: bool = True) -> bytes:
    """A message whose header section is exactly `size` octets (CRLFs included)."""
    lines = [b"From: a@example.com\r\n"]
    remaining = size - len(lines[0])
    while remaining:
        chunk = min(900, remaining)
        if 0 < remaining - chunk < 13:
            chunk = remaining - 13
        lines.append(b"X-Filler: " + b"a" * (chunk - 12) + CRLF)
        remaining -= chunk
    head = b"".join(lines)
    assert len(head) == size
    return head + (b"\r\nbody\r\n" if body else b"")


REFUSED = [
    ("no header at all", b"", NO_FROM),
    ("only a body", b"\r\nHello.\r\n", NO_FROM),
    ("no From", msg("To: a@example.net", "Subject: x"), NO_FROM),
    ("Sender is not From", msg("Sender: a@example.com", "Subject: x"), NO_FROM),
    ("Resent-From is not From", msg("Resent-From: a@example.com"), NO_FROM),
    ("From only in the body", msg("To: a@example.net", body=b"From: a@example.com\r\n"),
     NO_FROM),
    ("two From", msg("From: a@example.com", "From: b@example.com"), MULTIPLE_FROM),
    ("two From, case differs", msg("From: a@example.com", "fROM: b@example.com"),
     MULTIPLE_FROM),
    ("three From", msg("From: a@x.org", "To: c@y.org", "FROM: b@x.org", "from: c@x.org"),
     MULTIPLE_FROM),
    ("mbox From_ line first", msg("From MAILER-DAEMON Fri Apr 06 16:46:09 2001",
                                  "From: a@example.com"), BAD_HEADER),
    ("continuation first", msg("\tcontinued", "From: a@example.com"), BAD_HEADER),
    ("space continuation first", msg(" continued", "From: a@example.com"), BAD_HEADER),
    ("text first", msg("Hello there", "From: a@example.com"), BAD_HEADER),
    ("body without blank line", msg("From: a@example.com", "Subject: x",
                                    "counter to RFC 5322, no blank line here", body=None),
     BAD_HEADER),
    ("space before colon (obsolete syntax)", msg("From: a@example.com", "Subject : x"),
     BAD_HEADER),
    ("colon first", msg("From: a@example.com", ": no name"), BAD_HEADER),
    ("UTF-8 in a field name", msg("From: a@example.com", "Sübject: x"), BAD_HEADER),
    ("control character in a field name", msg("From: a@example.com", b"X-\x01: x"), BAD_HEADER),
    ("DEL in a field name", msg("From: a@example.com", b"X-\x7f: x"), BAD_HEADER),
    ("header section over 64 KiB", _big_header(MAX_HEADER_SECTION + 1), HEADER_TOO_LONG),
    ("headers only, over 64 KiB", _big_header(MAX_HEADER_SECTION + 1, body=False),
     HEADER_TOO_LONG),
    ("one huge line, no CRLF", b"From: " + b"a" * MAX_HEADER_SECTION, HEADER_TOO_LONG),
    ("unfoldable token over 998", msg("From: a@example.com", "X-Token: " + "t" * 998),
     HEADER_LINE_TOO_LONG),
    ("unfoldable continuation", msg("From: a@example.com", "X-Token: a", "\t" + "t" * 999),
     HEADER_LINE_TOO_LONG),
    ("only trailing spaces to fold at", msg("From: a@example.com", "X-T: " + "t" * 993 + " " * 9),
     HEADER_LINE_TOO_LONG),
    ("long From without whitespace", msg("From: " + "a" * 1000 + "@example.com"),
     HEADER_LINE_TOO_LONG),
]


@pytest.mark.parametrize(("message", "refusal"), [c[1:] for c in REFUSED],
                         ids=[c[0] for c in REFUSED])
def test_refused(message: bytes, refusal: str) -> None:
    result = run(message)
    assert result.refusal == refusal
    assert result.refusal in REFUSALS
    assert result.message is None


ALLOWED = [
    ("one From", msg("From: a@example.com")),
    ("From and Sender", msg("From: a@example.com", "Sender: b@example.com")),
    ("From with a Resent-From", msg("Resent-From: r@example.com", "From: a@example.com")),
    ("lower-case from", msg("from: a@example.com")),
    ("From folded", msg("From: Someone", "\t<a@example.com>")),
    ("From in the body too", msg("From: a@example.com", body=b"From: b@example.com\r\n")),
    ("header section of exactly 64 KiB", _big_header(MAX_HEADER_SECTION)),
    ("headers only, exactly 64 KiB", _big_header(MAX_HEADER_SECTION, body=False)),
    ("empty body", msg("From: a@example.com", body=b"")),
    ("headers only", msg("From: a@example.com", body=None)),
    ("headers only, no final CRLF", b"From: a@example.com"),
    ("line of exactly 998", msg("From: a@example.com", "X-Long: " + "t" * 990)),
    ("whitespace-only continuation (obs-FWS)", msg("From: a@example.com", "X-A: b", "\t ")),
    ("empty field value", msg("From: a@example.com", "X-Empty:")),
    ("no space after colon", msg("From:a@example.com", "Subject:x")),
    ("all printable name characters",
     msg("From: a@example.com", "!\"#$%&'()*+,-./09;<=>?@AZ[\\]^_`az{|}~: x")),
    ("raw UTF-8 value", msg("From: Jörg <jörg@bücher.de>", "Subject: Grüße 😀")),
    ("long body line", msg("From: a@example.com", body=b"x" * 5000 + CRLF)),
    ("body looks like headers", msg("From: a@example.com", body=b"Bcc: x\r\nX-Relay-A: b\r\n")),
]


@pytest.mark.parametrize("message", [c[1] for c in ALLOWED], ids=[c[0] for c in ALLOWED])
def test_allowed(message: bytes) -> None:
    result = run(message)
    out = accepted(result)
    # the body is never touched; nothing but added header lines differs
    assert split(out)[1] == split(message)[1]
    assert all(MESSAGE_ID.match(line) or line in (DATE, FEEDBACK)
               for line in added_lines(message, out))


# --- fidelity -------------------------------------------------------------------------------

FIDELITY = [
    ("plain", msg(*BASE)),
    ("folded Received with tabs",
     msg("Received: from a.example (a.example [192.0.2.1])", "\tby b.example with ESMTP",
         "\tfor <r@example.net>; Tue, 1 Dec 2026 10:00:00 +0000", *BASE)),
    ("raw UTF-8", msg(*BASE, "Subject: Grüße, 日本語 😀", "X-Name: Jörg")),
    ("encoded word", msg(*BASE, "X-Subject: =?utf-8?q?Gr=C3=BC=C3=9Fe?=")),
    ("trailing whitespace kept", msg(*BASE, "X-Trail: value  \t")),
    ("odd spacing kept", msg(*BASE, "X-Odd:value", "X-Spaces:    a   b")),
    ("duplicate ordinary headers kept", msg(*BASE, "Received: a", "Received: b",
                                            "Comments: 1", "Comments: 2")),
    ("existing DKIM-Signature kept", msg(*BASE, "DKIM-Signature: v=1; a=rsa-sha256; d=ex.com;",
                                         "\t s=s1; bh=abc=; b=def", "\t ghi=")),
    ("line of exactly 998", msg(*BASE, "X-Long: " + "word " * 198)),
    ("headers only", msg(*BASE, body=None)),
    ("headers only, no final CRLF", msg(*BASE, body=None)[:-2]),
    ("empty body", msg(*BASE, body=b"")),
    ("body with CRLFCRLF runs", msg(*BASE, body=b"\r\n\r\nx\r\n\r\n")),
]


@pytest.mark.parametrize("message", [c[1] for c in FIDELITY], ids=[c[0] for c in FIDELITY])
def test_fidelity_nothing_to_do_is_byte_identical(message: bytes) -> None:
    # No app: no Feedback-ID; Message-ID and Date present: nothing to add.
    result = run(message, app=None)
    assert accepted(result) == message
    assert result.message_id == "abc@example.com"


@pytest.mark.parametrize("message", [c[1] for c in FIDELITY], ids=[c[0] for c in FIDELITY])
def test_fidelity_only_added_lines_differ(message: bytes) -> None:
    stripped = re.sub(rb"(?m)^(Message-ID|Date): [^\r]*\r\n", b"", message)
    if not stripped.endswith(CRLF) and not stripped.endswith(b"\r\n\r\n"):
        stripped = re.sub(rb"\r\n(Message-ID|Date): [^\r]*$", b"", stripped)
    result = run(stripped)
    out = accepted(result)
    added = added_lines(stripped, out)
    assert len(added) == 3
    assert MESSAGE_ID.match(added[0])
    assert added[1:] == [DATE, FEEDBACK]
    assert split(out)[1] == split(stripped)[1]
    assert result.message_id == MESSAGE_ID.match(added[0])[1].decode() + "@relay.test"
    # headers only stays headers only: no blank line, no body created
    assert (b"\r\n\r\n" in out) == (b"\r\n\r\n" in stripped or stripped.startswith(CRLF))


# --- added headers ---------------------------------------------------------------------------

def test_added_headers_go_last_in_fixed_order() -> None:
    message = msg("From: a@example.com", "Subject: x", body=b"body\r\n")
    out = accepted(run(message))
    lines, body = split(out)
    assert lines[:2] == [b"From: a@example.com", b"Subject: x"]
    assert MESSAGE_ID.match(lines[2])
    assert lines[3:] == [DATE, FEEDBACK]
    assert body == b"body\r\n"


def test_added_headers_are_deterministic_with_rng_and_random_without() -> None:
    message = msg("From: a@example.com")
    assert run(message, seed=1).message == run(message, seed=1).message
    assert run(message, seed=1).message != run(message, seed=2).message
    free = [apply_header_rules(message, RULES, app=None, hostname="relay.test", now=NOW,
                               stream="marketing").message_id for _ in range(2)]
    assert free[0] != free[1]
    assert all(re.fullmatch(r"[0-9a-f]{32}@relay\.test", m) for m in free)


def test_date_is_rfc5322_with_numeric_zone() -> None:
    out = accepted(run(msg("From: a@example.com")))
    date = next(line for line in split(out)[0] if line.startswith(b"Date:"))
    assert date == b"Date: " + format_datetime(datetime.fromtimestamp(NOW, UTC)).encode()
    assert re.fullmatch(rb"Date: \w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", date)


EXISTING = [
    ("Message-ID kept", "Message-ID: <x.1@example.com>", "x.1@example.com", b"Message-ID:"),
    ("lower-case message-id", "message-id: <x.2@example.com>", "x.2@example.com",
     b"Message-ID:"),
    ("Message-Id with comment", "Message-Id: (c) <x.3@example.com> ", "x.3@example.com",
     b"Message-ID:"),
    ("Message-ID without brackets", "Message-ID: bare@example.com", "bare@example.com",
     b"Message-ID:"),
    ("DATE upper case", "DATE: Tue, 1 Dec 2026 10:00:00 +0000", None, b"Date:"),
]


@pytest.mark.parametrize(("header", "message_id", "not_added"), [c[1:] for c in EXISTING],
                         ids=[c[0] for c in EXISTING])
def test_existing_message_id_and_date_are_kept(header: str, message_id: str | None,
                                               not_added: bytes) -> None:
    message = msg("From: a@example.com", header)
    result = run(message)
    added = added_lines(message, accepted(result))
    assert not any(line.startswith(not_added) for line in added)
    if message_id is not None:
        assert result.message_id == message_id


def test_empty_message_id_is_replaced_not_doubled() -> None:
    message = msg("From: a@example.com", "Message-ID:  ")
    result = run(message)
    lines = split(accepted(result))[0]
    ids = [line for line in lines if line.lower().startswith(b"message-id:")]
    assert len(ids) == 1
    assert MESSAGE_ID.match(ids[0])
    assert result.message_id.endswith("@relay.test")


@pytest.mark.parametrize(("rules", "expected"), [
    (HeaderRules(add_message_id=False), [DATE, FEEDBACK]),
    (HeaderRules(add_date=False), ["id", FEEDBACK]),
    (HeaderRules(feedback_id=False), ["id", DATE]),
    (HeaderRules(add_message_id=False, add_date=False, feedback_id=False), []),
], ids=["no message-id", "no date", "no feedback-id", "nothing"])
def test_rules_switch_added_headers_off(rules: HeaderRules, expected: list) -> None:
    message = msg("From: a@example.com")
    result = run(message, rules)
    added = added_lines(message, accepted(result))
    assert len(added) == len(expected)
    for line, want in zip(added, expected, strict=True):
        assert MESSAGE_ID.match(line) if want == "id" else line == want
    if not rules.add_message_id:
        assert result.message_id == ""


FEEDBACK_CASES = [
    ("default campaign", [], "shop", "marketing", b"Feedback-ID: none:shop:marketing:relay"),
    ("campaign from control", ["X-Relay-Campaign: spring-sale"], "shop", "marketing",
     b"Feedback-ID: spring-sale:shop:marketing:relay"),
    ("existing replaced", ["Feedback-ID: old:x:y:z"], "shop", "transactional",
     b"Feedback-ID: none:shop:transactional:relay"),
    ("existing replaced, any case", ["feedback-id: old", "FEEDBACK-ID: older"], "app1",
     "marketing", b"Feedback-ID: none:app1:marketing:relay"),
    ("parts sanitised", ["X-Relay-Campaign: a:b c"], "sh:op", "mark eting",
     b"Feedback-ID: abc:shop:marketing:relay"),
]


@pytest.mark.parametrize(("headers", "app", "stream", "expected"),
                         [c[1:] for c in FEEDBACK_CASES], ids=[c[0] for c in FEEDBACK_CASES])
def test_feedback_id(headers: list[str], app: str, stream: str, expected: bytes) -> None:
    out = accepted(run(msg("From: a@example.com", *headers), app=app, stream=stream))
    lines = split(out)[0]
    feedback = [line for line in lines if line.lower().startswith(b"feedback-id:")]
    assert feedback == [expected]
    assert lines[-1] == expected


@pytest.mark.parametrize(("app", "rules"), [(None, RULES), ("", RULES),
                                            ("shop", HeaderRules(feedback_id=False))],
                         ids=["no app", "empty app", "switched off"])
def test_existing_feedback_id_kept_when_not_adding(app: str | None, rules: HeaderRules) -> None:
    message = msg("From: a@example.com", "Feedback-ID: theirs:1:2:x", "Message-ID: <a@b>",
                  "Date: x")
    assert accepted(run(message, rules, app=app)) == message


# --- removal and control headers ------------------------------------------------------------

REMOVAL = [
    ("Bcc with continuation lines", ["From: a@x.org", "Bcc: b@x.org,", "\tc@x.org,",
                                     " d@x.org", "To: e@x.org"], RULES,
     ["From: a@x.org", "To: e@x.org"]),
    ("case-insensitive", ["From: a@x.org", "BCC: b@x.org", "x-originating-ip: [1.2.3.4]",
                          "X-ORIGINATING-IP: [1.2.3.5]"], RULES, ["From: a@x.org"]),
    ("names that only look alike stay", ["From: a@x.org", "Bcc-Note: x",
                                         "X-Originating-IPv6: y", "XBcc: z"], RULES,
     ["From: a@x.org", "Bcc-Note: x", "X-Originating-IPv6: y", "XBcc: z"]),
    ("prefix entry", ["From: a@x.org", "X-Internal-Id: 1", "x-internal-trace: 2", "\tmore",
                      "X-Internals: 3"], HeaderRules(remove=("X-Internal-*",)),
     ["From: a@x.org", "X-Internals: 3"]),
    ("nothing configured", ["From: a@x.org", "Bcc: b@x.org"], HeaderRules(remove=()),
     ["From: a@x.org", "Bcc: b@x.org"]),
    ("control headers always go", ["X-Relay-Campaign: c", "From: a@x.org",
                                   "x-relay-stream: marketing", "\tfolded", "X-Relayed: keep"],
     RULES, ["From: a@x.org", "X-Relayed: keep"]),
    ("another control prefix", ["From: a@x.org", "X-Relay-A: 1", "X-Ctl-B: 2"],
     HeaderRules(control_prefix="X-Ctl-"), ["From: a@x.org", "X-Relay-A: 1"]),
    ("last header removed, headers only", ["From: a@x.org", "Bcc: b@x.org"], RULES,
     ["From: a@x.org"]),
]


@pytest.mark.parametrize(("headers", "rules", "kept"), [c[1:] for c in REMOVAL],
                         ids=[c[0] for c in REMOVAL])
@pytest.mark.parametrize("body", [b"Body\r\nBcc: in the body stays\r\n", None],
                         ids=["with body", "headers only"])
def test_removal(headers: list[str], rules: HeaderRules, kept: list[str],
                 body: bytes | None) -> None:
    off = HeaderRules(remove=rules.remove, control_prefix=rules.control_prefix,
                      add_message_id=False, add_date=False, feedback_id=False)
    out = accepted(run(msg(*headers, body=body), off))
    assert out == msg(*kept, body=body)


def test_removal_of_last_line_without_crlf() -> None:
    out = accepted(run(b"From: a@x.org\r\nBcc: b@x.org\r\n\tc@x.org",
                       HeaderRules(add_message_id=False, add_date=False)))
    assert out == b"From: a@x.org\r\n" + FEEDBACK + CRLF


CONTROL = [
    ("read and lower-cased", ["X-Relay-Campaign: spring-sale", "X-RELAY-STREAM: marketing"],
     {"campaign": "spring-sale", "stream": "marketing"}),
    ("first wins", ["X-Relay-Campaign: one", "x-relay-campaign: two"], {"campaign": "one"}),
    ("unfolded and stripped", ["X-Relay-Campaign:   spring", "\t-sale  "],
     {"campaign": "spring-sale"}),
    ("sanitised", ["X-Relay-Campaign: Spring Sale! 2026/05"], {"campaign": "SpringSale202605"}),
    ("64 characters at most", ["X-Relay-Campaign: " + "c" * 100], {"campaign": "c" * 64}),
    ("UTF-8 dropped", ["X-Relay-Tag: grüße"], {"tag": "gre"}),
    ("empty value", ["X-Relay-Campaign:"], {"campaign": ""}),
    ("bare prefix ignored", ["X-Relay-: x"], {}),
    ("none", ["Subject: x"], {}),
]


@pytest.mark.parametrize(("headers", "control"), [c[1:] for c in CONTROL],
                         ids=[c[0] for c in CONTROL])
def test_control_headers_read(headers: list[str], control: dict[str, str]) -> None:
    result = run(msg("From: a@x.org", *headers))
    assert result.control == control
    assert not any(line.lower().startswith(b"x-relay-")
                   for line in split(accepted(result))[0])


INJECTION = [
    ("folded CRLF in campaign", ["X-Relay-Campaign: a", " Bcc: victim@example.net"], {}),
    ("colon and semicolon", ["X-Relay-Campaign: a:b;c=d"], {}),
    ("raw CR byte in value", [b"X-Relay-Campaign: a\rBcc: x"], {}),
    ("NUL and escapes", [b"X-Relay-Campaign: a\x00\x1b[0m%0d%0aBcc:x"], {}),
    ("app with CRLF", [], {"app": "shop\r\nBcc: victim@example.net"}),
    ("stream with CRLF", [], {"stream": "m\r\nBcc: victim@example.net"}),
    ("app with colon", [], {"app": "a:b:c:d:e"}),
    ("hostname with CRLF", [], {"hostname": "relay.test\r\nBcc: victim@example.net"}),
    ("hostname with brackets", [], {"hostname": "relay.test>\r\n<x"}),
    ("UTF-8 line separator", ["X-Relay-Campaign: a\u2028Bcc: x"], {}),
]


@pytest.mark.parametrize(("headers", "kwargs"), [c[1:] for c in INJECTION],
                         ids=[c[0] for c in INJECTION])
def test_injection_through_control_values_is_impossible(headers: list, kwargs: dict) -> None:
    result = run(msg("From: a@x.org", *headers), **kwargs)
    out = accepted(result)
    lines = split(out)[0]
    assert all(TOKEN.match(value) for value in result.control.values())
    assert not any(line.lower().startswith(b"bcc") for line in lines)
    assert all(re.fullmatch(rb"[\x21-\x39\x3b-\x7e]+:[^\r\n]*", line) for line in lines)
    feedback = [line for line in lines if line.startswith(b"Feedback-ID:")]
    assert len(feedback) == 1
    parts = feedback[0].removeprefix(b"Feedback-ID: ").split(b":")
    assert len(parts) == 4
    assert all(re.fullmatch(rb"[A-Za-z0-9._-]{1,64}", part) for part in parts)
    assert re.fullmatch(r"[0-9a-f]{32}@[A-Za-z0-9.-]+", result.message_id)


@pytest.mark.parametrize(("value", "token"), [
    ("spring-sale_2026.v1", "spring-sale_2026.v1"), ("a\r\nBcc: x", "aBccx"),
    ("", ""), ("ä" * 10, ""), ("x" * 65, "x" * 64), ("<>;:,\"' \t", ""),
])
def test_sanitize_token(value: str, token: str) -> None:
    assert sanitize_token(value) == token


# --- From addresses -------------------------------------------------------------------------

FROM = [
    ("bare", "a@example.com", ["a@example.com"]),
    ("display name", '"Shop, Inc." <news@Example.COM>', ["news@Example.COM"]),
    ("comment", "a@example.com (the shop)", ["a@example.com"]),
    ("list", "a@example.com, B <b@example.org>", ["a@example.com", "b@example.org"]),
    ("quoted local part", '"a b"@example.com', ['"a b"@example.com']),
    ("encoded word", "=?utf-8?q?J=C3=B6rg?= <j@example.de>", ["j@example.de"]),
    ("UTF-8", "Jörg <jörg@bücher.de>", ["jörg@bücher.de"]),
    ("group", "Team: a@x.org, b@y.org;", ["a@x.org", "b@y.org"]),
    ("empty group", "undisclosed-recipients:;", []),
    ("no address", "foo", []),
    ("garbage", "<<>>@@", []),
]


@pytest.mark.parametrize(("value", "addresses"), [c[1:] for c in FROM],
                         ids=[c[0] for c in FROM])
def test_from_addresses(value: str, addresses: list[str]) -> None:
    assert run(msg("From: " + value)).from_addresses == addresses


def test_from_addresses_of_a_folded_from() -> None:
    assert run(msg("From: Shop", "\t<news@example.com>")).from_addresses == ["news@example.com"]


# --- folding --------------------------------------------------------------------------------

FOLDING = [
    ("subject of words", "Subject: " + " ".join(["word"] * 700), 998),
    ("tabs", "X-T: " + "\t".join(["abc"] * 600), 998),
    ("runs of whitespace", "X-T: " + "   ".join(["abcdefghij"] * 200), 998),
    ("one split point", "X-T: " + "a" * 990 + " " + "b" * 10, 998),
    ("split right after the colon", "X-T: " + "a" * 996, 998),
    ("UTF-8 counted in octets", "Subject: " + " ".join(["grüße"] * 300), 998),
    ("999 octets", "X-Long: " + "t" * 985 + " abcde", 998),
    ("narrow limit", "Subject: " + " ".join(f"w{i}" for i in range(100)), 78),
    ("ends in whitespace", "X-T: " + "word " * 300, 998),
]


@pytest.mark.parametrize(("line", "limit"), [c[1:] for c in FOLDING],
                         ids=[c[0] for c in FOLDING])
def test_folding(line: str, limit: int) -> None:
    raw = line.encode()
    assert len(raw) > limit
    message = msg("From: a@example.com", "X-Before: b", raw, "X-After: c")
    rules = HeaderRules(max_line=limit, add_message_id=False, add_date=False,
                        feedback_id=False)
    out = accepted(run(message, rules))
    lines = split(out)[0]
    assert all(len(line) <= limit for line in lines)
    assert all(line.strip(b" \t") for line in lines)  # RFC 5322 3.2.2: no WSP-only line
    assert unfold(lines) == [b"From: a@example.com", b"X-Before: b", raw, b"X-After: c"]
    assert split(out)[1] == split(message)[1]


def test_only_the_long_line_of_a_field_is_folded() -> None:
    short = "\tshort continuation  "
    long_line = "\t" + " ".join(["x"] * 600)
    message = msg("From: a@example.com", "X-F: first", short, long_line, "\tlast")
    out = accepted(run(message, app=None))
    lines = split(out)[0]
    assert lines[:3] == [b"From: a@example.com", b"X-F: first", short.encode()]
    assert b"\tlast" in lines
    assert unfold(lines)[1] == b"X-F: first" + short.encode() + long_line.encode() + b"\tlast"


@settings(max_examples=200, deadline=None)
@given(tokens=st.lists(st.text("abcXYZ09.-ü", min_size=1, max_size=40), min_size=1,
                       max_size=60),
       separators=st.lists(st.sampled_from([" ", "\t"]), min_size=60, max_size=60),
       limit=st.integers(min_value=14, max_value=120))
def test_folding_property(tokens: list[str], separators: list[str], limit: int) -> None:
    value = "".join(sep + tok for sep, tok in zip(separators, tokens, strict=False))
    raw = b"X-P:" + value.encode()
    rules = HeaderRules(max_line=limit, add_message_id=False, add_date=False,
                        feedback_id=False)
    message = msg("From: a@x.org", raw)
    result = run(message, rules, app=None)
    # with single WSP separators a fold exists exactly when every WSP+token fits a line
    feasible = all(len(sep.encode() + tok.encode()) <= limit
                   for sep, tok in zip(separators, tokens, strict=False))
    if not feasible:
        assert result.refusal == HEADER_LINE_TOO_LONG
        return
    lines = split(accepted(result))[0]
    assert all(len(line) <= limit for line in lines)
    assert all(line.strip(b" \t") for line in lines)
    assert unfold(lines) == [b"From: a@x.org", raw]
    if len(raw) <= limit:
        assert lines == [b"From: a@x.org", raw]


# --- headers only, UTF-8, case --------------------------------------------------------------

@pytest.mark.parametrize("message", [
    b"From: a@example.com\r\nSubject: x\r\n",
    b"From: a@example.com\r\nSubject: x",
    b"Subject: x\r\nFrom: a@example.com\r\n\tfolded",
], ids=["final CRLF", "no final CRLF", "folded last line, no final CRLF"])
def test_headers_only_gets_headers_and_no_body(message: bytes) -> None:
    out = accepted(run(message))
    assert out.startswith(message)
    assert b"\r\n\r\n" not in out
    assert out.endswith(FEEDBACK + CRLF)
    tail = out[len(message):].removeprefix(CRLF).split(CRLF)
    assert MESSAGE_ID.match(tail[0])
    assert tail[1:] == [DATE, FEEDBACK, b""]


def test_raw_utf8_headers_are_preserved_byte_for_byte() -> None:
    headers = ["From: Jörg Müller <jörg@bücher.de>", "Subject: Grüße aus Köln 😀",
               "X-Nihon: 日本語の値", "Message-ID: <ü@example.com>", "Date: x"]
    message = msg(*headers, body="Grüße\r\n".encode())
    result = run(message, app=None)
    assert accepted(result) == message
    assert result.from_addresses == ["jörg@bücher.de"]
    assert result.message_id == "ü@example.com"


def test_invalid_utf8_in_a_value_is_preserved() -> None:
    message = msg(b"From: a@example.com", b"Subject: \xff\xfe broken", "Message-ID: <a@b>",
                  "Date: x")
    assert accepted(run(message, app=None)) == message


@pytest.mark.parametrize(("headers", "present"), [
    (["FROM: a@x.org", "MESSAGE-ID: <m@x>", "DATE: d"], True),
    (["from: a@x.org", "message-id: <m@x>", "date: d"], True),
    (["From: a@x.org"], False),
], ids=["upper", "lower", "missing"])
def test_case_insensitive_names(headers: list[str], present: bool) -> None:
    message = msg(*headers)
    added = added_lines(message, accepted(run(message, app=None)))
    assert (added == []) is present


# --- the python-email corpus ----------------------------------------------------------------

MESSAGES = sorted(CORPUS.glob("msg_*.txt")) if CORPUS.is_dir() else []

# Every refusal in the corpus, with the line that makes it legitimate.
CORPUS_REFUSALS = {
    "msg_11.txt": (NO_FROM, b"Content-Type: message/rfc822"),  # outer header has no From
    "msg_18.txt": (NO_FROM, b"Content-Type: text/plain"),  # a MIME entity, no From
    "msg_19.txt": (BAD_HEADER, b"Send Ppp mailing list submissions to"),  # body, no header
    "msg_25.txt": (BAD_HEADER, b"From MAILER-DAEMON Fri Apr 06 16:46:09 2001"),  # mbox From_
    "msg_35.txt": (BAD_HEADER, b"counter to RFC 2822, there's no separating newline here"),
    "msg_37.txt": (NO_FROM, b"Content-Type: multipart/mixed"),  # a MIME entity, no From
    "msg_38.txt": (NO_FROM, b"MIME-Version: 1.0"),  # a MIME entity, no From
    "msg_39.txt": (NO_FROM, b"MIME-Version: 1.0"),  # a MIME entity, no From
    "msg_40.txt": (NO_FROM, b"MIME-Version: 1.0"),  # a MIME entity, no From
    "msg_43.txt": (BAD_HEADER, b"From SRS0=aO/p=ON=bag.python.org=None@bounce2.pobox.com"),
}


def as_sent(path: Path) -> bytes:
    """The corpus is stored with LF endings; the edge hands over CRLF."""
    return re.sub(rb"\r?\n", b"\r\n", path.read_bytes())


def test_corpus_is_there() -> None:
    assert len(MESSAGES) >= 40, f"corpus not found at {CORPUS}"
    assert set(CORPUS_REFUSALS) <= {p.name for p in MESSAGES}


@pytest.mark.parametrize("path", MESSAGES, ids=[p.name for p in MESSAGES])
def test_corpus_message(path: Path) -> None:
    data = as_sent(path)
    result = run(data)
    expected = CORPUS_REFUSALS.get(path.name)
    print(f"{path.name}: {result.refusal or 'accepted'}")
    if expected is not None:
        refusal, evidence = expected
        assert result.refusal == refusal
        head = data.partition(b"\r\n\r\n")[0]
        assert evidence in head
        if refusal == NO_FROM:
            assert not re.search(rb"(?im)^from:", head)
        else:  # the evidence is a header-section line that is not a field
            line = next(line for line in head.split(CRLF) if line.startswith(evidence))
            assert not re.match(rb"[\x21-\x39\x3b-\x7e]+:", line)
        return
    out = accepted(result)
    # the body part (after the first CRLFCRLF) is byte-identical
    assert out.partition(b"\r\n\r\n")[2] == data.partition(b"\r\n\r\n")[2]
    # the original header section is kept as it was; only our lines are added after it
    added = added_lines(data, out)
    assert all(MESSAGE_ID.match(line) or line in (DATE, FEEDBACK) for line in added)
    assert added[-1] == FEEDBACK
    assert all(len(line) <= 998 for line in split(out)[0])
    assert len(result.from_addresses) <= 1
