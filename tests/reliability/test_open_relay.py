"""Open-relay tests in the manner of the public testers (DESIGN.md invariant 6): a client
outside mynetworks, without AUTH, tries to relay through address tricks in the recipient and
in the sender. Every trick is refused with a 5xx and nothing reaches the downstream.

Loopback is an outsider here: mynetworks is 192.0.2.0/24. Two configurations:

- plain: no [[app]]; the relay refuses at MAIL already (550 5.7.1).
- intake: a marketing app is configured, so the relay takes in mail to its own
  unsubscribe@ address from anyone (RFC 2369 mailto): MAIL is accepted from outsiders and
  the decision moves to RCPT, as Postfix's smtpd_relay_restrictions. The same tricks must be
  refused at RCPT; only the unsubscribe address itself is accepted, and what is sent to it
  is taken in, never relayed.
"""

from __future__ import annotations

import asyncio

import pytest

from relay.app import Relay
from tests.conftest import StartRelay
from tests.support.downstream import Downstream
from tests.support.wire import Wire

OWN = "relay.test"   # the relay's hostname (tests/conftest.py)

# Twenty-odd tricks of the open-relay testers, aimed at victim@example.org.
TRICKS = [
    "victim@example.org",                           # plain
    f"victim%example.org@{OWN}",                    # percent hack
    "victim%example.org@[127.0.0.1]",
    f"@{OWN}:victim@example.org",                   # source route through us
    f"@{OWN},@mx.example.org:victim@example.org",
    "@[127.0.0.1]:victim@example.org",
    f'"victim@example.org"@{OWN}',                  # quoted @
    '"victim@example.org"@[127.0.0.1]',
    f'"victim%example.org"@{OWN}',
    f"example.org!victim@{OWN}",                    # bang paths
    "example.org!victim",
    f"{OWN}!example.org!victim",
    "victim@example.org.",                          # trailing dots
    f"victim@{OWN}.",
    "victim@[192.0.2.1]",                           # IP literals
    "victim@[127.0.0.1]",
    "victim@[IPv6:::1]",
    f"victim@example.org@{OWN}",                    # two @
    "victim@example.org@",
    "VICTIM@EXAMPLE.ORG",                           # case
    f"Victim@{OWN.upper()}",
    f"victim@{OWN}",                                # our own domain: not a local mailbox
    "victim@localhost",
    "victim",                                       # no domain at all
    f"postmaster@{OWN}",
    f"unsubscribe%example.org@{OWN}",               # riding on the intake address
    f'"unsubscribe"@{OWN}',
    f"unsubscribe@{OWN}.example.org",
    f"unsubscribe@example.org@{OWN}",
    f"victim+unsubscribe@{OWN}",
]
SENDERS = [
    "a@example.com",
    f"unsubscribe@{OWN}",                            # spoofing our own addresses
    f"postmaster@{OWN}",
    f"MAILER-DAEMON@{OWN}",
    "",                                              # the null sender
    f"a%example.com@{OWN}",
    f"@{OWN}:a@example.com",
    '"a@example.com"@[127.0.0.1]',
    "a@[127.0.0.1]",
]
# Ways testers try to pass for a trusted client: none of them may work.
IMPERSONATION = [
    "XCLIENT ADDR=192.0.2.10 NAME=trusted.example",
    "XFORWARD ADDR=192.0.2.10",
    "PROXY TCP4 192.0.2.10 192.0.2.1 40000 25",
]
OUTSIDER = {"server": {"mynetworks": ["192.0.2.0/24"]}}


async def start(start_relay: StartRelay, downstream: Downstream, intake: bool) -> Relay:
    sections = dict(OUTSIDER)
    if intake:
        sections["app"] = [{"name": "shop", "password_env": "OPEN_RELAY_APP_PASSWORD",
                            "from_domains": ["example.com"], "stream": "marketing"}]
    return await start_relay(downstream.port, **sections)


async def assert_nothing_relayed(relay: Relay, downstream: Downstream) -> None:
    await asyncio.sleep(0.5)
    assert downstream.messages == []
    assert not any(line.upper().startswith(b"MAIL") for _, line in downstream.commands)
    assert await relay.store.list() == []


@pytest.mark.parametrize("intake", [False, True], ids=["plain", "intake"])
async def test_recipient_tricks_are_refused(start_relay: StartRelay, downstream: Downstream,
                                            monkeypatch: pytest.MonkeyPatch,
                                            intake: bool) -> None:
    monkeypatch.setenv("OPEN_RELAY_APP_PASSWORD", "not-used-here-0123456789")
    relay = await start(start_relay, downstream, intake)
    wire = await Wire.open(*relay.smtp_addresses[0])
    assert (await wire.cmd("EHLO tester.example.org")).code == 250
    for line in IMPERSONATION:
        assert (await wire.cmd(line)).code >= 500, line
    results = {}
    for trick in TRICKS:
        mail = await wire.cmd("MAIL FROM:<tester@example.org>")
        rcpt = await wire.cmd(f"RCPT TO:<{trick}>")
        data = await wire.cmd("DATA")
        if data.code == 354:
            data = await wire.cmd(b"From: tester@example.org\r\nSubject: relay test\r\n\r\n"
                                  b"relay test\r\n.")
        results[trick] = (mail.code, rcpt.code, rcpt.enhanced, data.code)
        # The recipient is refused (or MAIL was), permanently, and DATA goes nowhere.
        assert rcpt.code >= 500 and rcpt.enhanced and rcpt.enhanced[0] == "5", (trick, results)
        assert data.code >= 500, (trick, results[trick])
        if intake:
            assert mail.code == 250, (trick, results[trick])    # the decision is at RCPT
        else:
            assert mail.code >= 500, (trick, results[trick])
        assert (await wire.cmd("RSET")).code == 250
    await wire.close()
    await assert_nothing_relayed(relay, downstream)
    print(f"\nopen relay ({'intake' if intake else 'plain'}): {len(TRICKS)} recipient tricks "
          f"refused: {sorted({(v[1], v[2]) for v in results.values()})}")


@pytest.mark.parametrize("intake", [False, True], ids=["plain", "intake"])
async def test_sender_tricks_do_not_open_the_relay(start_relay: StartRelay,
                                                   downstream: Downstream,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   intake: bool) -> None:
    monkeypatch.setenv("OPEN_RELAY_APP_PASSWORD", "not-used-here-0123456789")
    relay = await start(start_relay, downstream, intake)
    wire = await Wire.open(*relay.smtp_addresses[0])
    assert (await wire.cmd("EHLO relay.test")).code == 250      # pretending to be us
    for sender in SENDERS:
        mail = await wire.cmd(f"MAIL FROM:<{sender}>")
        rcpt = await wire.cmd("RCPT TO:<victim@example.org>")
        assert rcpt.code >= 500, (sender, mail.code, str(rcpt))
        if not intake:
            assert mail.code >= 500, (sender, str(mail))
        assert (await wire.cmd("RSET")).code == 250
    await wire.close()
    await assert_nothing_relayed(relay, downstream)


async def test_only_the_exact_unsubscribe_address_is_taken_in(start_relay: StartRelay,
                                                              downstream: Downstream,
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    monkeypatch.setenv("OPEN_RELAY_APP_PASSWORD", "not-used-here-0123456789")
    relay = await start(start_relay, downstream, intake=True)
    wire = await Wire.open(*relay.smtp_addresses[0])
    assert (await wire.cmd("EHLO tester.example.org")).code == 250
    assert (await wire.cmd("MAIL FROM:<tester@example.org>")).code == 250
    accepted = []
    for rcpt in [f"unsubscribe@{OWN}", *TRICKS]:
        reply = await wire.cmd(f"RCPT TO:<{rcpt}>")
        if reply.code == 250:
            accepted.append(rcpt)
        else:
            assert reply.code >= 500, (rcpt, str(reply))
    assert accepted == [f"unsubscribe@{OWN}"]
    # A message to it (with the victims refused) is taken in by the relay, not relayed.
    assert (await wire.cmd("DATA")).code == 354
    reply = await wire.cmd(b"From: tester@example.org\r\nTo: victim@example.org\r\n"
                           b"Subject: unsubscribe not-a-token\r\n\r\nrelay test\r\n.")
    assert reply.code == 250, str(reply)
    await wire.close()
    await assert_nothing_relayed(relay, downstream)
