"""VERP return paths: round trip, tampering, case folding, the 64-octet local part."""

from __future__ import annotations

import base64
import re
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.outbound.verp import MAC_BYTES, MAX_LOCAL_PART, Verp
from relay.queue import new_queue_id

DOMAIN = "bounce.example.com"
QID = "7F3A9C21D04B2E"
RCPTS = ["nobody@example.net", "other@example.net", "a.very.long.local.part." * 8
         + "x@a-rather-long-subdomain.of.a-long-domain-name.example.net"]
# RFC 5321 4.1.2 Dot-string made of RFC 5322 atext; base32 needs only a-z, 2-7 and "+".
DOT_ATOM = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*")


@pytest.fixture
def verp() -> Verp:
    return Verp(secrets.token_bytes(32), domain=DOMAIN)


def known(mapping: dict[str, list[str]]) -> Callable[[str], list[str]]:
    return lambda queue_id: mapping.get(queue_id, [])


def test_round_trip(verp: Verp) -> None:
    candidates = known({QID: RCPTS})
    for rcpt in RCPTS:
        address = verp.return_path(QID, rcpt)
        assert address.startswith("bounces+") and address.endswith("@" + DOMAIN)
        assert verp.verify(address, candidates) == (QID, rcpt)
        assert verp.queue_id(address) == QID
    # Angle brackets as in a RCPT TO argument, and a trailing root dot on the domain.
    address = verp.return_path(QID, RCPTS[0])
    assert verp.verify(f"<{address}>", candidates) == (QID, RCPTS[0])
    assert verp.verify(address + ".", candidates) == (QID, RCPTS[0])


def test_token_shape(verp: Verp) -> None:
    address = verp.return_path(QID, RCPTS[0])
    local = address.rpartition("@")[0]
    token = local.partition("+")[2]
    assert DOT_ATOM.fullmatch(local)
    assert re.fullmatch(r"[a-z2-7]+", token)              # lowercase base32, no padding
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    assert raw[:-MAC_BYTES] == QID.encode() and len(raw) - len(QID) == MAC_BYTES >= 10


@pytest.mark.parametrize("fold", [str.upper, str.lower, str.title, str.swapcase])
def test_case_folding(verp: Verp, fold: Callable[[str], str]) -> None:
    """Some MTAs fold the local part (or the whole address): the token still verifies."""
    address = verp.return_path(QID, RCPTS[0])
    assert verp.verify(fold(address), known({QID: RCPTS})) == (QID, RCPTS[0])


def test_recipient_domain_case_does_not_matter(verp: Verp) -> None:
    address = verp.return_path(QID, "Nobody@Example.NET")
    assert verp.verify(address, known({QID: ["Nobody@example.net"]})) == \
        (QID, "Nobody@example.net")
    # The local part is case-sensitive (RFC 5321 2.4): another local part is another rcpt.
    assert verp.verify(address, known({QID: ["nobody@example.net"]})) is None


def test_picks_the_right_recipient(verp: Verp) -> None:
    address = verp.return_path(QID, RCPTS[1])
    assert verp.verify(address, known({QID: RCPTS})) == (QID, RCPTS[1])
    assert verp.verify(address, known({QID: [RCPTS[0], RCPTS[2]]})) is None
    assert verp.verify(address, known({})) is None      # queue ID no longer known


def _flip(token: str, at: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz234567"
    return token[:at] + alphabet[(alphabet.index(token[at]) + 1) % 32] + token[at + 1:]


def test_tampering(verp: Verp) -> None:
    address = verp.return_path(QID, RCPTS[0])
    local, _, domain = address.rpartition("@")
    prefix, _, token = local.partition("+")
    candidates = known({QID: RCPTS, "7F3A9C21D04B2F": RCPTS})
    for at in range(len(token)):
        forged = f"{prefix}+{_flip(token, at)}@{domain}"
        assert verp.verify(forged, candidates) is None, at
    # Another queue ID with the original MAC.
    raw = base64.b32decode(token.upper() + "=" * (-len(token) % 8))
    moved = base64.b32encode(b"7F3A9C21D04B2F" + raw[-MAC_BYTES:]).decode().rstrip("=").lower()
    assert verp.verify(f"{prefix}+{moved}@{domain}", candidates) is None
    # Right token, wrong domain or prefix; a different secret.
    assert verp.verify(f"{prefix}+{token}@example.com", candidates) is None
    assert verp.verify(f"returns+{token}@{domain}", candidates) is None
    other = Verp(secrets.token_bytes(32), domain=DOMAIN)
    assert other.verify(address, candidates) is None


@pytest.mark.parametrize("garbage", [
    "", "@", "bounces@bounce.example.com", "bounces+@bounce.example.com",
    "bounces+!!!@bounce.example.com", "bounces+a@bounce.example.com",
    "bounces+aaaaaaaa@bounce.example.com", "bounces+" + "a" * 80 + "@bounce.example.com",
    "bounces+\udcff@bounce.example.com", "nobody@example.net", "<>",
    "bounces+0189@bounce.example.com", "bounces+" + "7" * 56 + "@bounce.example.com",
])
def test_garbage_is_none(verp: Verp, garbage: str) -> None:
    assert verp.verify(garbage, known({QID: RCPTS})) is None
    assert verp.queue_id(garbage) is None or verp.verify(garbage, known({})) is None


def test_rotation() -> None:
    old, new = secrets.token_bytes(32), secrets.token_bytes(32)
    before = Verp(old, domain=DOMAIN).return_path(QID, RCPTS[0])
    after = Verp(new, domain=DOMAIN, previous=[old])
    assert after.verify(before, known({QID: RCPTS})) == (QID, RCPTS[0])
    assert Verp(new, domain=DOMAIN).verify(before, known({QID: RCPTS})) is None
    assert after.return_path(QID, RCPTS[0]) != before   # new tokens use the new secret


def test_local_part_within_64_octets(verp: Verp) -> None:
    for _ in range(200):
        queue_id = new_queue_id()
        assert len(queue_id) == 14
        for rcpt in RCPTS:
            local = verp.return_path(queue_id, rcpt).rpartition("@")[0]
            assert len(local) <= MAX_LOCAL_PART
            assert len(local) == 47  # bounces + "+" + 39 base32 characters
    # The longest queue ID that fits, and one more.
    longest = "Q" * verp.max_queue_id
    assert len(verp.return_path(longest, RCPTS[0]).rpartition("@")[0]) <= MAX_LOCAL_PART
    with pytest.raises(ValueError, match="too long"):
        verp.return_path(longest + "Q", RCPTS[0])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"secret": b"short", "domain": DOMAIN}, "at least 16"),
    ({"secret": b"k" * 32, "domain": "bad domain"}, "domain"),
    ({"secret": b"k" * 32, "domain": DOMAIN, "prefix": "a+b"}, "prefix"),
    ({"secret": b"k" * 32, "domain": DOMAIN, "prefix": ""}, "prefix"),
])
def test_bad_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Verp(**kwargs)


def test_bad_queue_id(verp: Verp) -> None:
    with pytest.raises(ValueError, match="printable"):
        verp.return_path("has space", RCPTS[0])
    with pytest.raises(ValueError, match="printable"):
        verp.return_path("", RCPTS[0])


@settings(max_examples=200, deadline=None)
@given(queue_id=st.from_regex(r"[0-9A-F]{1,25}", fullmatch=True),
       local=st.from_regex(r"[A-Za-z0-9.+_-]{1,64}", fullmatch=True),
       fold=st.sampled_from([str.upper, str.lower, str]))
def test_round_trip_property(queue_id: str, local: str,
                             fold: Callable[[str], str]) -> None:
    verp = Verp(b"k" * 32, prefix="b", domain=DOMAIN)
    rcpt = f"{local}@example.net"
    address = verp.return_path(queue_id, rcpt)
    assert len(address.rpartition("@")[0]) <= MAX_LOCAL_PART
    assert verp.verify(fold(address), lambda q: [rcpt] if q == queue_id else []) == \
        (queue_id, rcpt)
