"""List-Unsubscribe (relay/policy/unsubscribe.py): tokens, header rendering and folding,
placement in the three modes. Pure functions; tables, not mocks."""

from __future__ import annotations

import base64
import email
import email.policy
import hashlib
import hmac
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.policy.unsubscribe import (
    CLOCK_SKEW,
    MAX_TOKEN_CHARS,
    TokenData,
    Tokens,
    apply_unsubscribe,
    token_from_subject,
    unsubscribe_headers,
)

SECRET = b"s" * 32
NOW = 1_800_000_000.0
DAY = 86400.0
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def tokens(secret: bytes = SECRET, lifetime: float = 30 * DAY) -> Tokens:
    return Tokens(secret, lifetime=lifetime, clock=lambda: NOW)


def headers(recipient: str = "alice@example.com", scope: str = "global",
            public_url: str = "https://relay.example.com",
            mail_domain: str = "relay.example.com") -> list[bytes]:
    return unsubscribe_headers(tokens=tokens(), recipient=recipient, scope=scope,
                               queue_id="7F3A9C21D0", public_url=public_url,
                               mail_domain=mail_domain)


def lines_of(message: bytes) -> list[bytes]:
    return message.split(b"\r\n")


def header_section(message: bytes) -> bytes:
    return message.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def field_values(message: bytes, name: str) -> list[str]:
    parsed = email.message_from_bytes(message, policy=email.policy.compat32)
    return [re.sub(r"\s+", " ", v) for v in parsed.get_all(name, [])]


# --- tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(("recipient", "scope", "queue_id"), [
    ("alice@example.com", "global", "7F3A9C21D0"),
    ("Bob.Smith+tag@Example.COM", "example.com", ""),
    ("jörg@bücher.example", "newsletter", "Q1"),
    ('"odd local"@example.com', "list:weekly", "ABCDEF0123"),
    ("a" * 64 + "@" + "d" * 190, "s" * 255, "q" * 255),
])
def test_token_round_trip(recipient: str, scope: str, queue_id: str) -> None:
    t = tokens()
    token = t.make(recipient, scope, queue_id)
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token)
    assert len(token) <= MAX_TOKEN_CHARS
    assert t.verify(token) == TokenData(recipient, scope, queue_id, int(NOW))


def test_token_is_short_for_a_typical_address() -> None:
    # 128-bit tag plus a compact payload: a URL path, not a paragraph.
    assert len(tokens().make("alice@example.com", "global", "7F3A9C21D0")) <= 80


def test_every_character_changed_is_refused() -> None:
    t = tokens()
    token = t.make("alice@example.com", "global", "7F3A9C21D0")
    for i, ch in enumerate(token):
        for other in {ALPHABET[(ALPHABET.index(ch) + 1) % 64], ALPHABET[ALPHABET.index(ch) ^ 1]}:
            forged = token[:i] + other + token[i + 1:]
            assert t.verify(forged) is None, (i, ch, other)


def test_every_decoded_byte_flipped_is_refused() -> None:
    t = tokens()
    token = t.make("alice@example.com", "global", "7F3A9C21D0")
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            forged = raw[:i] + bytes((raw[i] ^ bit,)) + raw[i + 1:]
            encoded = base64.urlsafe_b64encode(forged).rstrip(b"=").decode()
            assert t.verify(encoded) is None, (i, bit)


def test_truncated_and_extended_tokens_are_refused() -> None:
    t = tokens()
    token = t.make("alice@example.com", "global", "7F3A9C21D0")
    for cut in range(len(token)):
        assert t.verify(token[:cut]) is None
    for extra in ("A", "AA", "AAAA", "=", "==", " ", "\n", ".", token):
        assert t.verify(token + extra) is None
    assert t.verify(" " + token) is None


@pytest.mark.parametrize(("age", "valid"), [
    (0, True),
    (30 * DAY, True),
    (30 * DAY + 1, False),
    (365 * DAY, False),
    (-CLOCK_SKEW, True),  # another node's clock a little ahead
    (-CLOCK_SKEW - 1, False),
])
def test_expiry(age: float, valid: bool) -> None:
    t = tokens()
    token = t.make("alice@example.com", "global", "Q", now=NOW - age)
    assert (t.verify(token, now=NOW) is not None) is valid


def test_expiry_follows_the_clock() -> None:
    clock = [NOW]
    t = Tokens(SECRET, lifetime=60, clock=lambda: clock[0])
    token = t.make("alice@example.com", "global", "Q")
    assert t.verify(token) is not None
    clock[0] += 61
    assert t.verify(token) is None


def test_another_secret_is_refused() -> None:
    token = tokens().make("alice@example.com", "global", "Q")
    assert tokens(b"t" * 32).verify(token) is None
    assert tokens(SECRET + b"x").verify(token) is None


@pytest.mark.parametrize("garbage", [
    "", "A", "AA", "AAA", "AAAA", "=", "====", "....", "%00", "\x00" * 40, "ä" * 40,
    "AAAA" * 10, "A" * (MAX_TOKEN_CHARS + 4), "A" * 10_000_000, "\ud800" * 30,
    "u/../../etc/passwd", "<script>", "AQ==", "AQ", "-" * 64, "_" * 65,
    "AWsRhMQR\nYWxp", "AWsRhMQR YWxp",
])
def test_garbage_is_refused_without_raising(garbage: str) -> None:
    assert tokens().verify(garbage) is None


@pytest.mark.parametrize("not_a_string", [None, 1, b"AAAA", ["A"], object()])
def test_non_strings_are_refused(not_a_string: object) -> None:
    assert tokens().verify(not_a_string) is None


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_arbitrary_text_is_refused(text: str) -> None:
    assert tokens().verify(text) is None


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=300))
def test_arbitrary_base64_is_refused(raw: bytes) -> None:
    token = base64.urlsafe_b64encode(raw).rstrip(b"=").decode()
    assert tokens().verify(token) is None


def test_a_token_with_a_valid_tag_but_another_version_is_refused() -> None:
    # Built by hand with the right key: the version octet is checked after the tag.
    t = tokens()
    raw = base64.urlsafe_b64decode(t.make("a@b.example", "global", "Q") + "==")
    payload = b"\x02" + raw[1:-16]
    tag = hmac.new(SECRET, b"relay/unsubscribe\x00" + payload, hashlib.sha256).digest()[:16]
    forged = base64.urlsafe_b64encode(payload + tag).rstrip(b"=").decode()
    assert t.verify(forged) is None
    same = b"\x01" + raw[1:-16]  # and the hand-built one with the right version verifies
    tag = hmac.new(SECRET, b"relay/unsubscribe\x00" + same, hashlib.sha256).digest()[:16]
    assert t.verify(base64.urlsafe_b64encode(same + tag).rstrip(b"=").decode()) is not None


@pytest.mark.parametrize(("recipient", "scope", "queue_id", "now"), [
    ("", "global", "Q", NOW),
    ("a@b.example", "", "Q", NOW),
    ("a" * 256, "global", "Q", NOW),
    ("a@b.example", "s" * 256, "Q", NOW),
    ("a@b.example", "global", "q" * 256, NOW),
    ("\ud800@b.example", "global", "Q", NOW),
    ("a@b.example", "global", "Q", -1),
    ("a@b.example", "global", "Q", 2.0**32),
])
def test_make_refuses_what_a_token_cannot_carry(recipient: str, scope: str, queue_id: str,
                                                now: float) -> None:
    with pytest.raises(ValueError):
        tokens().make(recipient, scope, queue_id, now=now)


@pytest.mark.parametrize(("secret", "lifetime"), [
    (b"", 60), (b"short", 60), (b"x" * 15, 60), ("a string secret" * 4, 60),
    (b"x" * 32, 0), (b"x" * 32, -1),
])
def test_constructor_refuses_weak_settings(secret: object, lifetime: float) -> None:
    with pytest.raises(ValueError):
        Tokens(secret, lifetime=lifetime)  # type: ignore[arg-type]


@pytest.mark.parametrize(("subject", "found"), [
    ("unsubscribe TOKENTOKENTOKEN12", "TOKENTOKENTOKEN12"),
    ("Re: Unsubscribe   TOKENTOKENTOKEN12", "TOKENTOKENTOKEN12"),
    ("UNSUBSCRIBE TOKEN-TOKEN_TOKEN12 please", "TOKEN-TOKEN_TOKEN12"),
    ("unsubscribe", None),
    ("hello", None),
    ("unsubscribe short", None),
])
def test_token_from_subject(subject: str, found: str | None) -> None:
    assert token_from_subject(subject) == found


def test_the_mailto_subject_carries_a_verifiable_token() -> None:
    lu = headers()[0].decode()
    subject = re.search(r"\?subject=([^>]*)>", lu)
    assert subject is not None
    token = token_from_subject(subject.group(1).replace("%20", " "))
    assert token is not None
    assert tokens().verify(token) == TokenData("alice@example.com", "global", "7F3A9C21D0",
                                               int(NOW))


# --- header rendering -----------------------------------------------------------------


def test_headers_render_both_fields() -> None:
    lu, post = headers()
    assert post == b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    assert lu.startswith(b"List-Unsubscribe: <https://relay.example.com/u/")
    assert lu.endswith(b"\r\n")
    unfolded = lu.replace(b"\r\n", b"").decode()
    uris = re.findall(r"<([^<>]*)>", unfolded)
    assert len(uris) == 2
    https, mailto = uris
    token = https.rsplit("/u/", 1)[1]
    assert tokens().verify(token) is not None
    assert mailto == f"mailto:unsubscribe@relay.example.com?subject=unsubscribe%20{token}"
    # RFC 2369 2: a comma separates the bracketed URLs.
    assert re.fullmatch(r"List-Unsubscribe: <[^<>]+>, <[^<>]+>", unfolded)


def test_public_url_with_a_path_and_a_trailing_slash() -> None:
    lu = headers(public_url="https://example.com/relay/")[0]
    assert lu.startswith(b"List-Unsubscribe: <https://example.com/relay/u/")


@pytest.mark.parametrize("recipient", [
    "alice@example.com",
    "a@b.c",
    "a-much-longer-local-part.with.dots+and-tag@a-long-subdomain.example.co.uk",
    "x" * 64 + "@" + "y" * 180 + ".example",
])
@pytest.mark.parametrize("public_url", ["https://r.ex", "https://relay.example.com/path"])
def test_folding_keeps_lines_short_where_a_fold_point_exists(recipient: str,
                                                             public_url: str) -> None:
    lu = headers(recipient=recipient, public_url=public_url)[0]
    lines = lu[:-2].split(b"\r\n")
    for i, line in enumerate(lines):
        assert b"\n" not in line and b"\r" not in line
        assert len(line) <= 998  # RFC 5322 2.1.1: MUST
        if len(line) > 78:
            # Over 78 only when the line holds a single URI: no fold point inside it.
            assert line.count(b"<") == 1, line
        if i:
            assert line.startswith(b" ")  # RFC 5322 2.2.3: continuation begins with WSP
    # Each URI is folded onto its own line when they would not share 78 columns.
    assert len(lines) == 2


def test_short_uris_share_a_line() -> None:
    # Only possible with a short token: fold logic seen directly through merge.
    message = b"From: a@b\r\nList-Unsubscribe: <mailto:x@y>\r\n\r\n"
    new = [b"List-Unsubscribe: <mailto:u@d>\r\n",
           b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"]
    out = apply_unsubscribe(message, new, "merge")
    assert b"List-Unsubscribe: <mailto:x@y>, <mailto:u@d>\r\n" in out


@pytest.mark.parametrize(("public_url", "mail_domain"), [
    ("ftp://relay.example.com", "relay.example.com"),
    ("relay.example.com", "relay.example.com"),
    ("https://relay.example.com/a b", "relay.example.com"),
    ("https://relay.example.com/a,b", "relay.example.com"),
    ("https://relay.example.com/>", "relay.example.com"),
    ("https://relay.example.com\r\nBcc: x@y", "relay.example.com"),
    ("https://relay.example.com", "relay.example.com\r\nBcc: x@y"),
    ("https://relay.example.com", "relay.example.com>"),
    ("https://relay.example.com", ""),
    ("https://relay.example.com", "-bad-.example"),
])
def test_header_injection_is_refused(public_url: str, mail_domain: str) -> None:
    with pytest.raises(ValueError):
        headers(public_url=public_url, mail_domain=mail_domain)


# --- placement ------------------------------------------------------------------------

BODY = b"Hello,\r\nList-Unsubscribe: <mailto:in-the-body@x>\r\n\r\nnot a header\r\n"
PLAIN = b"From: news@example.com\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\n" + BODY
WITH_APP = (b"From: news@example.com\r\n"
            b"list-unsubscribe: <mailto:leave@example.com?subject=x>,\r\n"
            b"\t<https://example.com/leave?u=1>\r\n"
            b"To: alice@example.com\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
            b"Subject: hi\r\n\r\n" + BODY)


def ours() -> list[bytes]:
    return headers()


def test_replace_adds_ours_at_the_end_of_the_header_section() -> None:
    out = apply_unsubscribe(PLAIN, ours(), "replace")
    assert out == (b"From: news@example.com\r\nTo: alice@example.com\r\nSubject: hi\r\n"
                   + b"".join(ours()) + b"\r\n" + BODY)


@pytest.mark.parametrize("mode", ["replace", "keep", "merge"])
def test_a_message_without_the_header_gets_ours_in_every_mode(mode: str) -> None:
    assert apply_unsubscribe(PLAIN, ours(), mode) == apply_unsubscribe(PLAIN, ours(),
                                                                       "replace")


def test_replace_removes_theirs_with_continuation_lines() -> None:
    out = apply_unsubscribe(WITH_APP, ours(), "replace")
    head = header_section(out)
    assert b"leave" not in head
    assert b"\t<https://example.com" not in head
    assert head == (b"From: news@example.com\r\nTo: alice@example.com\r\nSubject: hi\r\n"
                    + b"".join(ours()))
    assert out.endswith(b"\r\n\r\n" + BODY)
    assert len(field_values(out, "List-Unsubscribe")) == 1
    assert len(field_values(out, "List-Unsubscribe-Post")) == 1


def test_keep_leaves_the_app_header_alone() -> None:
    assert apply_unsubscribe(WITH_APP, ours(), "keep") == WITH_APP


def test_keep_without_their_list_unsubscribe_drops_a_stray_post() -> None:
    message = (b"From: a@example.com\r\nList-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
               b"\r\nbody\r\n")
    out = apply_unsubscribe(message, ours(), "keep")
    assert out == b"From: a@example.com\r\n" + b"".join(ours()) + b"\r\nbody\r\n"


def test_merge_puts_their_uris_first_then_ours() -> None:
    out = apply_unsubscribe(WITH_APP, ours(), "merge")
    [value] = field_values(out, "List-Unsubscribe")
    uris = re.findall(r"<([^<>]*)>", value)
    our_uris = re.findall(r"<([^<>]*)>", ours()[0].replace(b"\r\n", b"").decode())
    # RFC 8058 3.1: one HTTPS URI, ours; their mailto stays, in front.
    assert uris == ["mailto:leave@example.com?subject=x", *our_uris]
    assert field_values(out, "List-Unsubscribe-Post") == ["List-Unsubscribe=One-Click"]
    head = header_section(out)
    assert head.startswith(b"From: news@example.com\r\nTo: alice@example.com\r\n"
                           b"Subject: hi\r\nList-Unsubscribe: <mailto:leave@example.com")
    assert head.endswith(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    assert out.endswith(b"\r\n\r\n" + BODY)
    for line in lines_of(head):
        assert len(line) <= 78 or line.count(b"<") == 1


def test_merge_deduplicates_and_joins_several_fields() -> None:
    lu = ours()[0]
    our_mailto = re.findall(rb"<(mailto:[^<>]*)>", lu.replace(b"\r\n", b""))[0]
    message = (b"From: a@example.com\r\n"
               b"List-Unsubscribe: <mailto:one@example.com>, (a comment) <mailto:two@ex\r\n"
               b" ample.com>\r\n"
               b"List-Unsubscribe : <mailto:one@example.com>, <" + our_mailto + b">\r\n"
               b"\r\nbody")
    out = apply_unsubscribe(message, ours(), "merge")
    [value] = field_values(out, "List-Unsubscribe")
    uris = re.findall(r"<([^<>]*)>", value)
    assert uris[:3] == ["mailto:one@example.com", "mailto:two@example.com",
                        our_mailto.decode()]
    assert len(uris) == 4 and uris[3].startswith("https://relay.example.com/u/")
    assert b"List-Unsubscribe :" not in out
    assert out.endswith(b"\r\n\r\nbody")


def test_merge_of_an_app_header_without_uris_is_ours_alone() -> None:
    message = b"From: a@example.com\r\nList-Unsubscribe: nonsense\r\n\r\nbody\r\n"
    assert apply_unsubscribe(message, ours(), "merge") == apply_unsubscribe(message, ours(),
                                                                            "replace")


@pytest.mark.parametrize("mode", ["replace", "keep", "merge"])
@pytest.mark.parametrize("message", [
    b"From: a@example.com\r\nSubject: no body\r\n",
    b"From: a@example.com\r\nSubject: no body, no final CRLF",
])
def test_headers_only_message(mode: str, message: bytes) -> None:
    out = apply_unsubscribe(message, ours(), mode)
    start = message if message.endswith(b"\r\n") else message + b"\r\n"
    assert out == start + b"".join(ours())
    assert b"\r\n\r\n" not in out  # still headers only: no body appears


@pytest.mark.parametrize("mode", ["replace", "merge"])
def test_headers_only_message_ending_in_the_removed_field(mode: str) -> None:
    message = b"From: a@example.com\r\nList-Unsubscribe: <mailto:x@example.com>"
    out = apply_unsubscribe(message, ours(), mode)
    assert out.startswith(b"From: a@example.com\r\nList-Unsubscribe: <")
    assert out.endswith(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
    assert len(field_values(out, "List-Unsubscribe")) == 1


def test_empty_header_section_and_empty_message() -> None:
    assert apply_unsubscribe(b"\r\nbody", ours(), "replace") == b"".join(ours()) + b"\r\nbody"
    assert apply_unsubscribe(b"", ours(), "replace") == b"".join(ours())


def test_body_lines_that_look_like_headers_are_not_touched() -> None:
    for mode in ("replace", "keep", "merge"):
        out = apply_unsubscribe(PLAIN, ours(), mode)
        assert out.endswith(b"\r\n\r\n" + BODY)
        assert out.count(b"in-the-body") == 1


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="mode"):
        apply_unsubscribe(PLAIN, ours(), "append")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from([
    b"From: a@example.com\r\n", b"List-Unsubscribe: <mailto:x@example.com>\r\n",
    b"LIST-UNSUBSCRIBE-POST: List-Unsubscribe=One-Click\r\n", b"\t<mailto:y@example.com>\r\n",
    b"Subject: s\r\n", b"list-unsubscribe:<https://a.example/u>,\r\n", b" folded\r\n",
]), max_size=12), st.sampled_from(["replace", "merge"]), st.binary(max_size=40))
def test_one_of_each_and_the_body_intact(head: list[bytes], mode: str, body: bytes) -> None:
    message = b"".join(head) + b"\r\n" + body
    out = apply_unsubscribe(message, ours(), mode)
    assert out.endswith(b"\r\n" + body)
    section = out[:len(out) - len(body) - 2]
    names = [line.split(b":", 1)[0].lower() for line in section.split(b"\r\n")
             if line and line[:1] not in b" \t"]
    assert names.count(b"list-unsubscribe") == 1
    assert names.count(b"list-unsubscribe-post") == 1
    assert section.endswith(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n")
