"""Envelope paths and mailboxes (RFC 5321 4.1.2, 4.5.3.1; RFC 6531 3.3), as tables."""

from __future__ import annotations

import pytest

from relay import replies
from relay.address import canonical, check_mailbox, domain_of, parse_path
from relay.replies import Reply

LABEL63 = "d" * 63


@pytest.mark.parametrize(("arg", "mailbox"), [
    ("<a@example.net>", "a@example.net"),
    ("<>", ""),                                              # the null reverse-path
    (" <a@example.net>", "a@example.net"),
    ("<a@example.net> SIZE=1000 BODY=8BITMIME", "a@example.net"),
    # quoted local parts go on exactly as written, brackets and quotes inside included
    ('<"odd user"@example.net>', '"odd user"@example.net'),
    ('<"a>b"@example.net>', '"a>b"@example.net'),
    ('<"a\\"b"@example.net>', '"a\\"b"@example.net'),
    ('<"a\\\\"@example.net>', '"a\\\\"@example.net'),
    ('<"a b"@example.net> NOTIFY=NEVER', '"a b"@example.net'),
    # RFC 5321 4.1.1.3 and Appendix C: a source route is accepted and ignored
    ("<@hop1.example.org,@hop2.example.org:a@example.net>", "a@example.net"),
    ("<@hop1.example.org:a@example.net>", "a@example.net"),
    ("<@[192.0.2.1]:a@example.net>", "a@example.net"),
    ("<jörg@example.net>", "jörg@example.net"),              # judged later by check_mailbox
    ("<a@[IPv6:2001:db8::1]>", "a@[IPv6:2001:db8::1]"),
    # a common client error: no angle brackets; the first word is taken
    ("a@example.net", "a@example.net"),
    ("a@example.net SIZE=10", "a@example.net"),
])
def test_parse_path(arg: str, mailbox: str) -> None:
    assert parse_path(arg) == mailbox


@pytest.mark.parametrize("arg", [
    "",
    "   ",
    "<a@example.net",                          # no closing bracket
    '<"a@example.net>',                        # unterminated quoted string
    "<a@example.net>SIZE=10",                  # parameters need a space
    "<<a@example.net>>",
    "<@hop1.example.org a@example.net>",       # route without its colon
    "<@hop1.example.org,hop2.example.org:a@example.net>",  # hop without @
    "<@-bad-.example:a@example.net>",
])
def test_parse_path_refuses(arg: str) -> None:
    assert parse_path(arg) is None


def _domain(total: int) -> str:
    """A valid domain of exactly `total` octets (labels of at most 63)."""
    labels, left = [], total
    while left > 64:
        labels.append(LABEL63)
        left -= 64
    labels.append("e" * left)
    return ".".join(labels)


BAD_RCPT = replies.R501_BAD_RCPT
UTF8 = replies.R553_UTF8_NEEDS_SMTPUTF8
CTRL = replies.R501_CONTROL_CHARS

# (mailbox, reply without SMTPUTF8, reply with SMTPUTF8); None = accepted
MAILBOXES: list[tuple[str, Reply | None, Reply | None]] = [
    ("a@example.net", None, None),
    ("A.B-c+tag@Example.NET", None, None),
    ("!#$%&'*+/=?^_`{|}~-@example.net", None, None),
    ("a@123.example", None, None),
    ("a@xn--bcher-kva.example", None, None),
    # quoted local parts (RFC 5321 4.1.2 Quoted-string)
    ('"odd user"@example.net', None, None),
    ('"a@b"@example.net', None, None),
    ('"a\\"b"@example.net', None, None),
    ('""@example.net', None, None),
    ('"a"b"@example.net', BAD_RCPT, BAD_RCPT),
    ('"a\\', BAD_RCPT, BAD_RCPT),
    ('"a"x@example.net', BAD_RCPT, BAD_RCPT),
    # dot-strings
    ("a..b@example.net", BAD_RCPT, BAD_RCPT),
    (".a@example.net", BAD_RCPT, BAD_RCPT),
    ("a.@example.net", BAD_RCPT, BAD_RCPT),
    ("a b@example.net", BAD_RCPT, BAD_RCPT),
    ("a(comment)@example.net", BAD_RCPT, BAD_RCPT),
    ("a,b@example.net", BAD_RCPT, BAD_RCPT),
    # missing parts
    ("a", BAD_RCPT, BAD_RCPT),
    ("a@", BAD_RCPT, BAD_RCPT),
    ("@example.net", BAD_RCPT, BAD_RCPT),
    ("a@@example.net", BAD_RCPT, BAD_RCPT),
    # domains
    ("a@localhost", BAD_RCPT, BAD_RCPT),
    ("a@example.net.", BAD_RCPT, BAD_RCPT),
    ("a@.example.net", BAD_RCPT, BAD_RCPT),
    ("a@-bad.example", BAD_RCPT, BAD_RCPT),
    ("a@bad-.example", BAD_RCPT, BAD_RCPT),
    ("a@exa_mple.net", BAD_RCPT, BAD_RCPT),
    ("a@exa mple.net", BAD_RCPT, BAD_RCPT),
    # address literals (RFC 5321 4.1.3)
    ("a@[192.0.2.1]", None, None),
    ("a@[IPv6:2001:db8::1]", None, None),
    ("a@[IPv6:::1]", None, None),
    ("a@[300.1.1.1]", BAD_RCPT, BAD_RCPT),
    ("a@[192.0.2]", BAD_RCPT, BAD_RCPT),
    ("a@[2001:db8::1]", BAD_RCPT, BAD_RCPT),            # IPv6 needs its tag
    ("a@[IPv6:192.0.2.1]", BAD_RCPT, BAD_RCPT),
    ("a@[example.net]", BAD_RCPT, BAD_RCPT),
    ("a@[192.0.2.1", BAD_RCPT, BAD_RCPT),
    # non-ASCII: only with SMTPUTF8 (RFC 6531 3.4)
    ("jörg@example.net", UTF8, None),
    ("a@bücher.example", UTF8, None),
    ('"jö rg"@example.net', UTF8, None),
    ("用户@例子.广告", UTF8, None),
    ("jörg..x@example.net", UTF8, BAD_RCPT),
    ("jörg@bü_cher.example", UTF8, BAD_RCPT),
    ("\udcff@example.net", BAD_RCPT, BAD_RCPT),           # bytes that were not UTF-8
    # control characters, wherever they are
    ("a\x00@example.net", CTRL, CTRL),
    ("a\t@example.net", CTRL, CTRL),
    ("a@example.net\r\n", CTRL, CTRL),
    ("a@exam\rple.net", CTRL, CTRL),
    ("a@exam\x7fple.net", CTRL, CTRL),
    ('"a\x01b"@example.net', CTRL, CTRL),
    ("jö\x1brg@example.net", CTRL, CTRL),
    # length limits (RFC 5321 4.5.3.1): local part 64, path 256 with its brackets, label 63
    ("x" * 64 + "@example.net", None, None),
    ("x" * 65 + "@example.net", BAD_RCPT, BAD_RCPT),
    ("é" * 32 + "@example.net", UTF8, None),             # 64 octets
    ("é" * 33 + "@example.net", UTF8, BAD_RCPT),         # 66 octets
    ("x" * 64 + "@" + _domain(189), None, None),         # 254 octets
    ("x" * 64 + "@" + _domain(190), BAD_RCPT, BAD_RCPT),  # 255 octets
    ("a@" + LABEL63 + ".example", None, None),
    ("a@" + LABEL63 + "d.example", BAD_RCPT, BAD_RCPT),
    ("a@" + "ü" * 60 + ".example", UTF8, BAD_RCPT),       # its A-label is longer than 63
]


def _id(mailbox: str) -> str:
    text = ascii(mailbox)[1:-1]
    if len(text) <= 40:
        return text
    return f"{text[:16]}...{text[-12:]}({len(mailbox.encode('utf-8', 'surrogatepass'))} octets)"


ROWS = [pytest.param(*row, id=_id(row[0])) for row in MAILBOXES]


@pytest.mark.parametrize(("mailbox", "ascii_reply", "utf8_reply"), ROWS)
def test_check_mailbox(mailbox: str, ascii_reply: Reply | None,
                       utf8_reply: Reply | None) -> None:
    assert check_mailbox(mailbox, smtputf8=False, sender=False) == ascii_reply
    assert check_mailbox(mailbox, smtputf8=True, sender=False) == utf8_reply


@pytest.mark.parametrize(("mailbox", "ascii_reply", "utf8_reply"), ROWS)
def test_check_mailbox_for_a_sender(mailbox: str, ascii_reply: Reply | None,
                                    utf8_reply: Reply | None) -> None:
    """The same rules for MAIL FROM, with the sender's enhanced code (RFC 3463 X.1.7)."""
    def as_sender(reply: Reply | None) -> Reply | None:
        return replies.R501_BAD_SENDER if reply is BAD_RCPT else reply

    assert check_mailbox(mailbox, smtputf8=False, sender=True) == as_sender(ascii_reply)
    assert check_mailbox(mailbox, smtputf8=True, sender=True) == as_sender(utf8_reply)


@pytest.mark.parametrize(("mailbox", "canon", "domain"), [
    ("a@example.net", "a@example.net", "example.net"),
    ("a@Example.NET", "a@example.net", "example.net"),
    ("Reader.Name@EXAMPLE.net", "Reader.Name@example.net", "example.net"),  # RFC 5321 2.4
    ('"Odd User"@Example.Net', '"Odd User"@example.net', "example.net"),
    ('"x@Y"@Z.Example', '"x@Y"@z.example', "z.example"),
    ("a@[IPv6:2001:DB8::1]", "a@[ipv6:2001:db8::1]", "[ipv6:2001:db8::1]"),
    ("Jörg@BÜCHER.example", "Jörg@bücher.example", "bücher.example"),
    ("no-at-sign", "no-at-sign", ""),
    ("", "", ""),
])
def test_canonical_and_domain_of(mailbox: str, canon: str, domain: str) -> None:
    assert canonical(mailbox) == canon
    assert domain_of(mailbox) == domain
    assert canonical(canonical(mailbox)) == canonical(mailbox)
