"""The event log end to end, and the statistics over it.

A real relay delivers to a scripted downstream that answers in several categories; the
store's event rows are checked afterwards (category, app, campaign on every row). The
statistics arithmetic and its warnings are tables.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from relay.events import Event, Stats, format_table, read_stats, record, with_app_totals
from relay.outbound.classify import classify, parse_reply
from relay.policy.access import hash_password
from relay.suppression import GLOBAL, Reason, Suppression
from tests.support.downstream import Downstream

PASSWORD = "events-test-password"


def message(extra: str = "") -> bytes:
    return (f"From: Shop <news@example.com>\r\nTo: r@example.net\r\nSubject: s\r\n{extra}"
            "\r\nbody\r\n").encode()


def category_of(reply: str) -> str:
    """What the classifier (the one place that interprets replies) calls this reply."""
    code, _, text = reply.partition(" ")
    return str(classify(parse_reply(int(code), text)).category)


async def rows_of(relay: Relay, queue_id: str, count: int) -> list[Event]:
    async def have() -> list[Event]:
        return [e for e in await relay.store.event_rows() if e.queue_id == queue_id]

    end = time.monotonic() + 10
    while len(rows := await have()) < count:
        assert time.monotonic() < end, f"timed out waiting for {count} events: {rows}"
        await _sleep()
    return rows


async def _sleep() -> None:
    await asyncio.sleep(0.02)


async def queue_id_of(relay: Relay, recipient: str) -> str:
    end = time.monotonic() + 10
    while True:
        for qid, rcpt, _, _ in await relay.store.events():
            if rcpt == recipient:
                return qid
        assert time.monotonic() < end, f"no event for {recipient}"
        await _sleep()


RCPT_REPLIES = {
    "gone@example.net": "550 5.1.1 The email account that you tried to reach does not exist",
    "full@example.net": "452 4.2.2 The recipient's inbox is out of storage space",
    "blocked@example.net": "554 5.7.1 Service unavailable; client host blocked using a list",
}


async def test_every_outcome_is_one_row_with_its_category_and_campaign(
        downstream: Downstream, start_relay) -> None:
    for rcpt, reply in RCPT_REPLIES.items():
        downstream.script("RCPT", reply, match=rcpt, times=None)
    relay = await start_relay(downstream.port)
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail("news@example.com", ["ok@example.net", *RCPT_REPLIES],
                         message("X-Relay-Campaign: spring\r\n"))
    qid = await queue_id_of(relay, "ok@example.net")
    rows = await rows_of(relay, qid, 4)
    first = {e.recipient: e for e in reversed(rows)}    # the first event of each recipient
    got = {r: (e.event, e.category, e.campaign, e.app) for r, e in first.items()}
    assert got == {
        "ok@example.net": ("delivered", "delivered", "spring", ""),
        "gone@example.net": ("bounced", "hard", "spring", ""),
        "full@example.net": ("deferred", category_of(RCPT_REPLIES["full@example.net"]),
                             "spring", ""),
        "blocked@example.net": ("bounced", category_of(RCPT_REPLIES["blocked@example.net"]),
                                "spring", ""),
    }
    assert first["gone@example.net"].reply.startswith("550 5.1.1 ")
    assert all(e.queue_id == qid and e.id > 0 and e.ts > 0 for e in rows)
    # the short form is the same rows
    assert [(e.queue_id, e.recipient, e.event, e.reply) for e in rows] == [
        tuple(t) for t in await relay.store.events(qid)]


async def test_expiry_is_one_event_with_the_last_category(downstream: Downstream,
                                                          start_relay) -> None:
    downstream.script("RCPT", "451 4.3.0 Temporary System Problem. Try again later",
                      times=None)
    relay = await start_relay(downstream.port, queue={"lifetime": "1s", "retry": ["200ms"]})
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail("news@example.com", ["late@example.net"], message())
    qid = await queue_id_of(relay, "late@example.net")
    end = time.monotonic() + 10
    while not any(e.event == "expired" for e in await relay.store.event_rows()):
        assert time.monotonic() < end
        await _sleep()
    rows = [e for e in await relay.store.event_rows() if e.queue_id == qid]
    assert [e.event for e in rows][-1] == "expired"
    assert {e.event for e in rows[:-1]} == {"deferred"}
    expected = category_of("451 4.3.0 Temporary System Problem. Try again later")
    assert {e.category for e in rows} == {expected}


async def test_an_app_s_events_carry_its_name_and_suppressions_have_no_category(
        downstream: Downstream, start_relay) -> None:
    relay = await start_relay(
        downstream.port,
        server={"mynetworks": ["192.0.2.0/24"], "auth_require_tls": False},
        suppression={"at_rcpt": "drop"},
        app=[{"name": "shop", "password_hash": hash_password(PASSWORD, iterations=1000),
              "from_domains": ["example.com"]}])
    relay.suppressions.add(Suppression("dropped@example.net", GLOBAL, Reason.MANUAL,
                                       "by hand", time.time()))
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, start_tls=False) as c:
        await c.login("shop", PASSWORD)
        await c.sendmail("news@example.com", ["ok@example.net", "dropped@example.net"],
                         message("X-Relay-Campaign: autumn\r\n"))
    qid = await queue_id_of(relay, "ok@example.net")
    rows = await rows_of(relay, qid, 2)
    assert sorted((e.recipient, e.event, e.category, e.campaign, e.app) for e in rows) == [
        ("dropped@example.net", "suppressed", "", "autumn", "shop"),
        ("ok@example.net", "delivered", "delivered", "autumn", "shop")]
    # a complaint about it, recorded later, is counted for the same app and campaign
    await record(relay.store, "complaint", "ok@example.net", queue_id=qid, reply="ARF")
    (complaint,) = [e for e in await relay.store.event_rows() if e.event == "complaint"]
    assert (complaint.app, complaint.campaign) == ("shop", "autumn")


# --- the statistics ---------------------------------------------------------------------------

def stats(**counts: int) -> Stats:
    s = Stats("shop", "spring")
    for name, n in counts.items():
        setattr(s, name, n)
    return s


@pytest.mark.parametrize(("counts", "sent", "bounce", "hard", "soft", "complaint", "unsub"), [
    ({}, 0, None, None, None, None, None),
    ({"delivered": 100}, 100, 0.0, 0.0, 0.0, 0.0, 0.0),
    ({"delivered": 90, "bounced": 8, "hard": 5, "soft": 2, "expired": 2},
     100, 0.08, 0.05, 0.02, 0.0, 0.0),
    ({"delivered": 1000, "complaints": 4, "unsubscribes": 10}, 1000, 0.0, 0.0, 0.0, 0.004,
     0.01),
    ({"deferred": 7, "suppressed": 3}, 0, None, None, None, None, None),  # not attempts
    ({"bounced": 2, "hard": 2, "complaints": 1}, 2, 1.0, 1.0, 0.0, None, None),
])
def test_rates(counts: dict[str, int], sent: int, bounce: float | None, hard: float | None,
               soft: float | None, complaint: float | None, unsub: float | None) -> None:
    s = stats(**counts)
    assert (s.sent, s.bounce_rate, s.hard_rate, s.soft_rate, s.complaint_rate,
            s.unsubscribe_rate) == (sent, bounce, hard, soft, complaint, unsub)


@pytest.mark.parametrize(("counts", "warned"), [
    ({"delivered": 98, "bounced": 2}, []),                      # exactly 2 %: not over
    ({"delivered": 97, "bounced": 3}, ["bounce rate 3.00% is over 2.00%"]),
    ({"delivered": 97, "expired": 3}, []),                      # expiries are not bounces
    ({"delivered": 1000, "complaints": 3}, []),                 # exactly 0.3 %
    ({"delivered": 1000, "complaints": 4}, ["complaint rate 0.40% is over 0.30%"]),
    ({"delivered": 50, "bounced": 50, "complaints": 1},
     ["bounce rate 50.00% is over 2.00%", "complaint rate 2.00% is over 0.30%"]),
    ({"complaints": 5}, []),                                    # nothing delivered: no rate
])
def test_warnings(counts: dict[str, int], warned: list[str]) -> None:
    lines = stats(**counts).warnings()
    assert len(lines) == len(warned)
    for line, text in zip(lines, warned, strict=True):
        assert line.startswith("WARNING: app shop, campaign spring: ")
        assert text in line


def test_app_totals_and_table() -> None:
    rows = [Stats("", "", delivered=5), Stats("news", "a", delivered=10, bounced=1, hard=1),
            Stats("news", "b", delivered=30, deferred=2, complaints=1),
            Stats("shop", "", delivered=7)]
    out = with_app_totals(rows)
    assert [(r.app, r.campaign) for r in out] == [
        ("", ""), ("news", "a"), ("news", "b"), ("news", "*"), ("shop", "")]
    total = out[3]
    assert (total.sent, total.delivered, total.bounced, total.deferred, total.complaints) == (
        41, 40, 1, 2, 1)
    lines = format_table(out).splitlines()
    assert lines[0].split() == ["app", "campaign", "sent", "delivered", "deferred", "bounce%",
                                "hard%", "soft%", "complaint%", "unsub%"]
    assert lines[1].split() == ["-", "-", "5", "5", "0", "0.00%", "0.00%", "0.00%", "0.00%",
                                "0.00%"]
    assert lines[4].split() == ["news", "*", "41", "40", "2", "2.44%", "2.44%", "0.00%",
                                "2.50%", "0.00%"]
    assert len({len(line) for line in lines}) == 1     # columns line up


def test_event_json_has_every_field() -> None:
    e = Event(id=3, ts=1.5, queue_id="Q", recipient="r@example.net", event="bounced",
              category="hard", reply="550 5.1.1 x", campaign="c", app="a")
    assert e.to_json() == {"id": 3, "ts": 1.5, "queue_id": "Q", "recipient": "r@example.net",
                           "event": "bounced", "category": "hard", "reply": "550 5.1.1 x",
                           "campaign": "c", "app": "a"}


def test_read_stats_of_a_file_without_events_table(tmp_path: Path) -> None:
    db = tmp_path / "empty.db"
    sqlite3.connect(db).close()
    assert read_stats(db) == []
