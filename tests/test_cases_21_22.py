"""Cases 21 and 22 of ../shared/cases over real SMTP: client -> relay -> scripted next hop.

Case 22: nine permanent-looking replies, of which only two are about the recipient; the
suppression store ends as exactly {r6, r8}. Case 21: a next hop that defers with 4xx on
every attempt; the recipient is deferred, then expires, and is never suppressed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiosmtplib

from relay.app import Relay
from relay.outbound.classify import Action, Category, SmtpReply, Verdict, classify, parse_reply
from tests.conftest import wait_events
from tests.support.downstream import Downstream

Event = tuple[str, str, str, str]   # (queue_id, recipient, event, reply)


def message(rcpt: str, subject: str) -> bytes:
    return (f"From: News <news@example.com>\r\nTo: {rcpt}\r\nSubject: {subject}\r\n"
            "\r\nhi\r\n").encode()


async def send(port: int, rcpt: str, subject: str) -> None:
    """One session per message, as in the cases: EHLO, MAIL, RCPT, DATA, QUIT."""
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=port) as client:
        await client.sendmail("news@example.com", [rcpt], message(rcpt, subject))


def stored(reply: str) -> SmtpReply:
    """The reply of an event row ("550 5.1.1 text"), parsed as the relay parsed it."""
    return parse_reply(int(reply[:3]), reply[4:])


def verdict(event: Event) -> Verdict:
    return classify(stored(event[3]))


async def events_until(relay: Relay, done: Callable[[list[Event]], bool],
                       timeout: float = 15.0) -> list[Event]:
    """Poll the relay's event log until done(events) holds."""
    end = time.monotonic() + timeout
    while True:
        events = await wait_events(relay, 0)
        if done(events):
            return events
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s; events: {events}")
        await asyncio.sleep(0.02)


# --- case 22 ----------------------------------------------------------------------------------

R1 = ("550-5.7.1 [192.0.2.10] Message refused: content scored as\r\n"
      "550-5.7.1 probable bulk spam. Details:\r\n"
      "550 5.7.1 https://support.example.net/unsolicited\r\n")
R2 = ("554 5.7.0 The sender has exceeded its allowed number of outgoing messages. "
      "Try again later.\r\n")
RCPT_REPLIES = {
    "r3": "550 Rejected: exceeded hourly sending limit\r\n",
    "r4": "550 5.2.0 Mail refused, sending server blocked (ref 506)\r\n",
    "r5": "550 5.1.90 Daily limit for message recipients reached\r\n",
    "r6": "550-5.1.1 No mailbox by that name here;\r\n"
          "550 5.1.1 please verify the recipient address.\r\n",
    "r7": "552 5.2.2 Mailbox full\r\n",
    "r8": "556 5.1.10 Recipient domain has a null MX\r\n",
    "r9": "550 5.7.1 Recipient address rejected: access denied\r\n",
}

# The .expect's classification, and the event the relay records for the first attempt:
# "deferred" where the category retries (rate-limited, soft), "bounced" otherwise.
CASE_22 = {
    "r1": (Category.CONTENT, "bounced"),
    "r2": (Category.RATE_LIMITED, "deferred"),
    "r3": (Category.RATE_LIMITED, "deferred"),
    "r4": (Category.BLOCK, "bounced"),
    "r5": (Category.RATE_LIMITED, "deferred"),
    "r6": (Category.HARD, "bounced"),
    "r7": (Category.SOFT, "deferred"),
    "r8": (Category.HARD, "bounced"),
    "r9": (Category.BLOCK, "bounced"),
}


async def test_case_22_only_replies_about_the_recipient_suppress(
        downstream: Downstream, start_relay) -> None:
    downstream.script("EOD", R1, match="r1@example.net", times=None)
    downstream.script("MAIL", R2, times=1)        # r2 goes first, alone: its MAIL gets this
    for name, reply in RCPT_REPLIES.items():
        downstream.script("RCPT", reply, match=f"<{name}@example.net>", times=None)
    # A long retry: each recipient is attempted once here, so its first event is its verdict.
    relay = await start_relay(downstream.port, queue={"retry": ["1h"], "lifetime": "5d"})
    port = relay.smtp_addresses[0][1]

    await send(port, "r2@example.net", "reply classification")
    await events_until(relay, lambda evs: any(e[1] == "r2@example.net" for e in evs))
    for name in ("r1", *RCPT_REPLIES):
        await send(port, f"{name}@example.net", "reply classification")
    rcpts = {f"{name}@example.net" for name in CASE_22}
    events = await events_until(relay, lambda evs: rcpts <= {e[1] for e in evs})
    first = {}
    for event in events:
        first.setdefault(event[1], event)

    got = {name: (verdict(first[f"{name}@example.net"]).category,
                  first[f"{name}@example.net"][2]) for name in CASE_22}
    assert got == CASE_22
    for name in CASE_22:
        v = verdict(first[f"{name}@example.net"])
        assert v.suppress is (name in ("r6", "r8"))
        assert v.throttle is (v.category is Category.RATE_LIMITED)
        assert v.action is (Action.DEFER if CASE_22[name][1] == "deferred" else Action.BOUNCE)

    # RFC 5321 4.2: a multi-line reply is one event, its text joined, the enhanced code of
    # its last line; a reply without an enhanced code is classified from code and text.
    assert first["r1@example.net"][3] == (
        "550 5.7.1 [192.0.2.10] Message refused: content scored as probable bulk spam. "
        "Details: https://support.example.net/unsolicited")
    assert first["r6@example.net"][3] == (
        "550 5.1.1 No mailbox by that name here; please verify the recipient address.")
    assert stored(first["r3@example.net"][3]).enhanced is None

    # The suppression store after the run: exactly {r6, r8} (invariant 5).
    await events_until(relay, lambda _: relay.suppressions.count() >= 2)
    # the five bounces' notices to the sender are delivered, so every outcome is settled
    await events_until(relay, lambda evs: sum(
        e[1] == "news@example.com" and e[2] == "delivered" for e in evs) >= 5)
    assert {(e.address, str(e.reason)) for e in relay.suppressions.list()} == {
        ("r6@example.net", "hard-bounce"), ("r8@example.net", "hard-bounce")}


# --- case 21 ----------------------------------------------------------------------------------

TSS04 = ("421 4.7.0 [TSS04] Mail from 192.0.2.10 is deferred for now because of complaints; "
         "see https://postmaster.example.org/tss04\r\n")
BUSY = "451 4.7.500 Server busy, try again later\r\n"


async def test_case_21_repeated_4xx_deferrals_never_suppress(
        downstream: Downstream, start_relay) -> None:
    # Attempts alternate: 451 4.7.500 to MAIL, then 250 to MAIL and 421 [TSS04] to RCPT
    # (the next hop closes after the 421). The sender's notice (MAIL FROM:<>) is not matched.
    for _ in range(20):
        downstream.script("MAIL", BUSY, match="news@example.com", times=1)
        downstream.script("MAIL", "250 2.1.0 ok", match="news@example.com", times=1)
    downstream.script("RCPT", TSS04, match="<reader@example.net>", times=None)
    relay = await start_relay(downstream.port, queue={"retry": ["100ms"], "lifetime": "1s"})
    port = relay.smtp_addresses[0][1]
    await send(port, "reader@example.net", "deferred")

    events = await events_until(relay, lambda evs: any(
        e[1] == "reader@example.net" and e[2] == "expired" for e in evs))
    mine = [e for e in events if e[1] == "reader@example.net"]
    assert [e[2] for e in mine] == ["deferred"] * (len(mine) - 1) + ["expired"]
    assert len(mine) >= 3
    replies = [stored(e[3]) for e in mine]
    assert {(r.code, r.enhanced) for r in replies} == {(421, "4.7.0"), (451, "4.7.500")}
    assert all("[TSS04]" in r.text for r in replies if r.code == 421)
    for event in mine:
        v = verdict(event)
        assert (v.category, v.action, v.suppress, v.throttle) == (
            Category.RATE_LIMITED, Action.DEFER, False, True)

    # Giving up: a "failed" notice to the sender with the last 4.x.x status, not 5.1.1.
    [notice] = await downstream.wait_messages(1)
    assert (notice.mail_from, notice.rcpt_tos) == ("", ["news@example.com"])
    assert b"Action: failed" in notice.data
    assert f"Status: {replies[-1].enhanced}".encode() in notice.data
    await events_until(relay, lambda evs: any(e[1] == "news@example.com" for e in evs))

    # Suppression store: no entry for reader@example.net, after any number of attempts.
    assert relay.suppressions.check("reader@example.net") is None
    assert relay.suppressions.list() == []
