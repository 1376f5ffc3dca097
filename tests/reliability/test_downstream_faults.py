"""A downstream that misbehaves at random: every recipient still ends in the right terminal
state, nothing stays in the queue and no lease is left behind (DESIGN.md invariant 2).

Fifty single-recipient messages go through a relay whose smarthost is a scripted downstream.
Each recipient has a fate drawn from a seeded random.Random:

- "ok":        no fault, delivered at once;
- "transient": 1-3 transient faults (421, 451, 452, a drop before or after the final dot,
               a stall past the relay's 1 s command_timeout, multi-line replies), then
               delivered;
- "permanent": perhaps a transient fault, then a 550 (at MAIL, RCPT or the final dot):
               bounced;
- "never":     the same transient fault for ever: expired after the 3 s lifetime.

Connection-level faults (421 greeting, a greeting stall past connect_timeout, a dropped
connection) hit whichever deliveries connect first. Two more relays require STARTTLS
towards a downstream whose certificate they do not trust, and towards one that offers no
STARTTLS at all: their recipients expire, and not one MAIL command is sent in plaintext.
"""

from __future__ import annotations

import asyncio
import collections
import random
import time
from pathlib import Path

import aiosmtplib
import pytest

from relay.app import Relay
from relay.queue import State
from tests.conftest import StartRelay
from tests.support.downstream import Downstream, _Action, self_signed_contexts

SEED = 20261203
MESSAGES = 50
STALL = "stall:1.5"      # past the relay's outbound command_timeout of 1 s

# (stage, action): transient faults. Every one of them is injected at least once.
TRANSIENT = [
    ("MAIL", "421-close"),
    ("MAIL", "451 4.3.0 try again later"),
    ("RCPT", "421-close"),
    ("RCPT", "451 4.3.0 greylisted, try again"),
    ("RCPT", "452 4.2.2 mailbox full"),
    ("RCPT", "452-4.5.3 too many recipients\r\n452 4.5.3 this session"),
    ("DATA", "drop"),                                   # before the final dot
    ("DATA", "451 4.3.0 not now"),
    ("EOD", "drop"),                                    # after the final dot
    ("EOD", "421-close"),
    ("EOD", "451-4.3.0 queue write failed\r\n451 4.3.0 try later"),
    ("EOD", "452 4.3.1 insufficient system storage"),
    ("RCPT", STALL),
    ("EOD", STALL),
]
PERMANENT = [
    ("MAIL", "550 5.7.1 sender refused by policy"),
    ("RCPT", "550-5.1.1 no such user\r\n550 5.1.1 here"),
    ("RCPT", "550 5.7.1 relaying denied"),
    ("EOD", "550 5.7.1 message refused"),
]
NEVER = [
    ("RCPT", "451 4.3.0 greylisted for ever"),
    ("EOD", "452 4.3.1 still full"),
    ("DATA", "drop"),
    ("EOD", "drop"),
    ("MAIL", "421-close"),
    ("RCPT", STALL),
]
CONNECT_FAULTS = [("421 4.3.2 too busy", 2), (STALL, 1), ("drop", 1)]
TERMINAL = {"delivered", "bounced", "expired", "suppressed", "deleted"}
EXPECTED = {"ok": "delivered", "transient": "delivered", "permanent": "bounced",
            "never": "expired"}


def kind_of(action: _Action) -> str:
    if action.kind != "reply":
        return action.kind
    return action.reply[:3]


class CountingDownstream(Downstream):
    """The scripted downstream, counting every scripted action that fired, per stage."""

    def __init__(self, **kw: object) -> None:
        super().__init__(**kw)  # type: ignore[arg-type]
        self.fired: collections.Counter[tuple[str, str]] = collections.Counter()

    def next_action(self, stage: str, text: str) -> _Action | None:
        action = super().next_action(stage, text)
        if action is not None:
            self.fired[(stage, kind_of(action))] += 1
        return action


def sender(i: int) -> str:
    return f"s{i}@example.com"


def rcpt(i: int) -> str:
    return f"rcpt-{i}@example.net"


def match_for(stage: str, i: int) -> str:
    # MAIL sees "FROM:<s7@...>", RCPT "TO:<rcpt-7@...>", DATA/EOD "s7@... rcpt-7@...".
    # Matching the recipient at DATA/EOD keeps a rule off the bounce notice to s7@.
    return {"MAIL": f"<{sender(i)}", "RCPT": f"<{rcpt(i)}"}.get(stage, f" {rcpt(i)}")


def plan_faults(ds: Downstream, rng: random.Random) -> dict[int, str]:
    """Script the downstream; return each message's fate."""
    fates: dict[int, str] = {}
    for i in range(MESSAGES):
        if i < len(TRANSIENT):
            fate = "transient"       # the first ones cover every transient kind once
        elif i < len(TRANSIENT) + len(PERMANENT):
            fate = "permanent"
        elif i < len(TRANSIENT) + len(PERMANENT) + len(NEVER):
            fate = "never"
        else:
            fate = rng.choices(["ok", "transient", "permanent", "never"], [25, 45, 20, 10])[0]
        fates[i] = fate
        steps: list[tuple[str, str, int | None]] = []
        if fate == "transient":
            first = TRANSIENT[i] if i < len(TRANSIENT) else rng.choice(TRANSIENT)
            steps.append((*first, 1))
            quick = [f for f in TRANSIENT if f[1] != STALL]    # one stall at most each
            steps += [(*rng.choice(quick), 1) for _ in range(rng.randint(0, 2))]
        elif fate == "permanent":
            if rng.random() < 0.5:
                steps.append((*rng.choice([f for f in TRANSIENT if f[1] != STALL]), 1))
            k = i - len(TRANSIENT)
            last = PERMANENT[k] if 0 <= k < len(PERMANENT) else rng.choice(PERMANENT)
            steps.append((*last, None))
        elif fate == "never":
            k = i - len(TRANSIENT) - len(PERMANENT)
            never = NEVER[k] if 0 <= k < len(NEVER) else rng.choice(NEVER[:-1])
            steps.append((*never, None))
        for stage, action, times in steps:
            ds.script(stage, action, times=times, match=match_for(stage, i))
    for action, times in CONNECT_FAULTS:
        ds.script("CONNECT", action, times=times)
    return fates


def message(i: int) -> bytes:
    return (f"From: {sender(i)}\r\nTo: {rcpt(i)}\r\nSubject: fault {i}\r\n"
            f"Message-ID: <fault-{i}@example.com>\r\n\r\nbody {i}\r\n").encode()


async def send_all(relay: Relay, count: int) -> None:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port, timeout=10) as client:
        for i in range(count):
            await client.sendmail(sender(i), [rcpt(i)], message(i))


async def wait_empty(relay: Relay, timeout: float) -> None:
    end = time.monotonic() + timeout
    while await relay.store.list():
        assert time.monotonic() < end, \
            f"queue not empty after {timeout}s: {await relay.store.list()}"
        await asyncio.sleep(0.1)


def terminal_events(events: list[tuple[str, str, str, str]]) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = collections.defaultdict(list)
    for _qid, address, event, reply in events:
        if event in TERMINAL:
            out[address].append((event, reply))
    return out


def section(tmp_path: Path, name: str) -> dict[str, dict[str, object]]:
    return {"queue": {"path": str(tmp_path / f"{name}.db"), "retry": ["100ms"],
                      "lifetime": "3s"},
            "suppression": {"path": str(tmp_path / f"{name}-suppression.db")}}


@pytest.mark.parametrize("ehlo_extra", [[], ["PIPELINING"]], ids=["one-by-one", "pipelined"])
async def test_random_downstream_faults_end_in_the_right_states(
        tmp_path: Path, start_relay: StartRelay, ehlo_extra: list[str]) -> None:
    rng = random.Random(SEED)
    server_ctx, _ = self_signed_contexts("localhost")
    outbound = {"command_timeout": "1s", "connect_timeout": "1s", "max_connections": 10}
    # The main downstream with and without RFC 2920 PIPELINING (the relay pipelines MAIL,
    # RCPT and DATA when offered): the same faults, the same terminal states.
    async with CountingDownstream(ehlo_extra=ehlo_extra) as ds, \
            CountingDownstream(starttls_context=server_ctx) as ds_tls, \
            CountingDownstream() as ds_notls:
        fates = plan_faults(ds, rng)
        relay = await start_relay(ds.port, outbound=outbound, **section(tmp_path, "a"))
        tls_out = {**outbound, "tls": "starttls"}
        relay_tls = await start_relay(ds_tls.port, outbound={
            **tls_out, "smarthost": f"localhost:{ds_tls.port}"}, **section(tmp_path, "b"))
        relay_notls = await start_relay(ds_notls.port, outbound=tls_out,
                                        **section(tmp_path, "c"))
        await asyncio.gather(send_all(relay, MESSAGES), send_all(relay_tls, 3),
                             send_all(relay_notls, 3))
        await asyncio.gather(wait_empty(relay, 30), wait_empty(relay_tls, 30),
                             wait_empty(relay_notls, 30))

        tls_faults = {"untrusted certificate": 0, "no STARTTLS offered": 0}
        for name, r, d in (("untrusted certificate", relay_tls, ds_tls),
                           ("no STARTTLS offered", relay_notls, ds_notls)):
            events = await r.store.events()
            final = terminal_events(events)
            tls_faults[name] = sum(1 for e in events if e[2] == "deferred" and "4.7.5" in e[3])
            for i in range(3):
                [(event, reply)] = final[rcpt(i)]
                assert event == "expired", (name, i, event, reply)
                assert "4.7.5" in reply, (name, i, reply)
            # Never a word of the envelope in plaintext (RFC 3207 4.1: required TLS).
            assert not any(line.upper().startswith((b"MAIL", b"RCPT", b"DATA"))
                           for _, line in d.commands), name
            assert d.messages == []
            assert await r.store.counts() == {}

        events = await relay.store.events()
        final = terminal_events(events)
        arrived = collections.Counter(r for m in ds.messages for r in m.rcpt_tos)
        outcomes: collections.Counter[str] = collections.Counter()
        for i, fate in fates.items():
            got = final.get(rcpt(i), [])
            # Invariant 2: exactly one terminal state, the right one.
            assert len(got) == 1, (i, fate, got)
            event, reply = got[0]
            assert event == EXPECTED[fate], (i, fate, event, reply)
            outcomes[event] += 1
            if event == "delivered":
                assert arrived[rcpt(i)] >= 1, (i, fate)
            else:
                assert arrived[rcpt(i)] == 0, (i, fate, event)
        # Every bounce and expiry told its sender (RFC 3464), and those notices went out.
        notices = sum(1 for f in fates.values() if f in ("permanent", "never"))
        assert sum(1 for m in ds.messages if m.mail_from == "") == notices
        assert [e for e in events if e[1].startswith("s") and e[2] in TERMINAL
                and e[2] != "delivered"] == []
        # Nothing stuck: no message left, no lease left.
        assert await relay.store.list() == []
        assert await relay.store.counts() == {}
        assert State.ACTIVE.value not in await relay.store.counts()

    fired = ds.fired
    by_kind: collections.Counter[str] = collections.Counter()
    for (stage, kind), n in fired.items():
        label = {"drop": {"DATA": "drop before the final dot", "EOD": "drop after the final dot",
                          "CONNECT": "drop at connect"}.get(stage, f"drop at {stage}"),
                 "stall": "stall past the timeout"}.get(kind, kind)
        by_kind[label] += n
    by_kind["TLS: untrusted certificate"] = tls_faults["untrusted certificate"]
    by_kind["TLS: no STARTTLS offered"] = tls_faults["no STARTTLS offered"]
    print(f"\ndownstream faults injected ({sum(by_kind.values())} in all, seed {SEED}):")
    for label, n in sorted(by_kind.items()):
        print(f"  {label:<30} {n}")
    print("  per stage: " + ", ".join(f"{s} {k}: {n}" for (s, k), n in sorted(fired.items())))
    print(f"outcomes of {MESSAGES} recipients: {dict(outcomes)}; fates {dict(collections.Counter(fates.values()))}")
    for kind in ("421", "451", "452", "550", "drop before the final dot",
                 "drop after the final dot", "stall past the timeout",
                 "TLS: untrusted certificate", "TLS: no STARTTLS offered"):
        assert by_kind[kind] >= 1, (kind, dict(by_kind))


async def test_a_refused_data_command_does_not_poison_the_next_message(
        start_relay: StartRelay) -> None:
    """A 4xx to the DATA command (no 354) leaves the server's transaction open (Postfix and
    aiosmtpd both keep MAIL and RCPT): a client that reuses the connection must RSET first,
    or the next, innocent message gets "503 nested MAIL command" and bounces."""
    async with Downstream() as ds:
        ds.script("DATA", "451 4.3.0 not now", times=1)
        relay = await start_relay(ds.port, outbound={"max_connections": 1})
        host, port = relay.smtp_addresses[0]
        for i in (1, 2):
            async with aiosmtplib.SMTP(hostname=host, port=port) as client:
                await client.sendmail(sender(i), [rcpt(i)], message(i))
            await ds.wait_until(lambda: any(b"DATA" in line for _, line in ds.commands))
        await ds.wait_until(lambda: any(rcpt(2) in m.rcpt_tos for m in ds.messages),
                            what="arrival of the second message")
        await ds.wait_until(lambda: any(rcpt(1) in m.rcpt_tos for m in ds.messages),
                            what="arrival of the first message, retried")
        end = time.monotonic() + 5
        while time.monotonic() < end:
            events = await relay.store.events()
            if {e[1] for e in events if e[2] == "delivered"} >= {rcpt(1), rcpt(2)}:
                break
            await asyncio.sleep(0.05)
        assert [e[2] for e in events if e[1] == rcpt(2)] == ["delivered"], events
