"""The cases of ../shared/cases, each played over SMTP against a running relay.

Each test asserts the replies the .expect file asks for, and what reached (or did not
reach) the downstream. DKIM parts of the cases are checked in the signing tests.
"""

from __future__ import annotations

import base64
import email
import email.policy
from pathlib import Path

from relay.app import Relay
from tests.conftest import wait_events
from tests.support.downstream import Downstream
from tests.support.mail import assert_relayed, split_received
from tests.support.transcript import Reply, parse, play


def codes(replies: list[Reply]) -> list[int]:
    return [r.code for r in replies]


async def run_case(cases_dir: Path, name: str, relay: Relay) -> list[list[Reply]]:
    host, port = relay.smtp_addresses[0]
    return await play(parse(cases_dir / name), host, port)


async def assert_nothing_queued(relay: Relay) -> None:
    assert await relay.store.list() == []
    assert await relay.store.events() == []


async def test_case_01_smuggling_lf_dot_crlf(cases_dir, downstream: Downstream,
                                             start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "01-smuggle-lf-dot-crlf.smtp", relay)
    # One final reply for the data, a permanent rejection; no reply to the smuggled commands.
    assert codes(replies) == [220, 250, 250, 250, 354, 550, 221]
    assert replies[5].enhanced == "5.6.0"
    await assert_nothing_queued(relay)
    assert downstream.commands == []


async def test_case_02_bare_cr_is_refused(cases_dir, downstream: Downstream,
                                          start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "02-bare-cr-body-dkim.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 550, 221]
    assert replies[5].enhanced == "5.6.0"
    await assert_nothing_queued(relay)


async def test_case_04_mixed_line_endings_are_refused(cases_dir, downstream: Downstream,
                                                      start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "04-mixed-eol-dkim.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 550, 221]
    assert replies[5].enhanced == "5.6.0"
    await assert_nothing_queued(relay)


async def test_case_05_long_line_one_reply_nothing_forwarded(cases_dir, downstream: Downstream,
                                                             start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "05-long-body-line.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 554, 221]
    assert replies[5].enhanced == "5.6.0"
    await assert_nothing_queued(relay)


async def test_case_09_smtputf8_address(cases_dir, downstream: Downstream,
                                        start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "09-smtputf8-address.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 553, 250, 221]
    assert replies[6].enhanced == "5.6.7"
    [msg] = await downstream.wait_messages(1)
    assert msg.raw_mail_line.startswith("MAIL FROM:<jörg@example.com>".encode())
    assert "SMTPUTF8" in msg.mail_options
    events = await wait_events(relay, 1)
    assert [e[2] for e in events] == ["delivered"]


async def test_case_10_utf8_header_and_8bit_body(cases_dir, downstream: Downstream,
                                                 start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "10-utf8-header-8bitmime.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 221]
    [msg] = await downstream.wait_messages(1)
    assert {"BODY=8BITMIME", "SMTPUTF8"} <= set(msg.mail_options)
    assert "Subject: Grüße aus Köln\r\n".encode() in msg.data
    assert msg.data.endswith("Schöne Grüße\r\n".encode())


async def test_case_11_null_sender(cases_dir, downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "11-null-sender.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 221]
    [msg] = await downstream.wait_messages(1)
    assert msg.raw_mail_line.split(b" SIZE=")[0].rstrip(b"\r\n") == b"MAIL FROM:<>"
    assert b"List-Unsubscribe" not in msg.data
    assert [e[2] for e in await wait_events(relay, 1)] == ["delivered"]


async def test_case_12_quoted_local_parts_byte_for_byte(cases_dir, downstream: Downstream,
                                                        start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "12-quoted-local-part.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 250, 354, 250, 221]
    [msg] = await downstream.wait_messages(1)
    assert msg.raw_rcpt_lines == [b'RCPT TO:<"odd user"@example.net>\r\n',
                                  b'RCPT TO:<"a@b"@example.net>\r\n']


async def test_case_17_disconnect_mid_data(cases_dir, downstream: Downstream,
                                           start_relay) -> None:
    relay = await start_relay(downstream.port)
    first, second = await run_case(cases_dir, "17-disconnect-mid-data.smtp", relay)
    assert codes(first) == [220, 250, 250, 250, 354]
    assert codes(second) == [220, 250, 250, 250, 354, 250, 221]
    [msg] = await downstream.wait_messages(1)
    assert b"Subject: after the drop\r\n" in msg.data
    events = await wait_events(relay, 1)
    assert len(events) == 1 and len(downstream.messages) == 1


async def test_case_24_empty_body(cases_dir, downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "24-empty-body-dkim.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 354, 250, 250, 250, 354, 250, 221]
    got = await downstream.wait_messages(2)
    # the two messages are delivered concurrently: tell them apart by subject
    a, b = sorted(got, key=lambda m: b"Subject: only blank lines" in m.data)
    # A: headers only; everything forwarded is still in the header section
    parsed = email.message_from_bytes(a.data, policy=email.policy.SMTP)
    assert parsed["Subject"] == "no body" and parsed.get_payload() == ""
    assert split_received(a.data)[1].startswith(
        b"From: News <news@example.com>\r\nTo: reader@example.net\r\nSubject: no body\r\n")
    assert b"\r\n\r\n" not in a.data
    # B: the body of empty lines arrives unchanged
    assert_relayed(b.data, b"From: News <news@example.com>\r\nTo: reader@example.net\r\n"
                   b"Subject: only blank lines\r\n\r\n\r\n\r\n")


async def test_case_26_source_route(cases_dir, downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port)
    [replies] = await run_case(cases_dir, "26-source-route.smtp", relay)
    assert codes(replies) == [220, 250, 250, 250, 553, 354, 250, 221]
    [msg] = await downstream.wait_messages(1)
    assert msg.rcpt_tos == ["reader@example.net"]
    assert msg.raw_rcpt_lines == [b"RCPT TO:<reader@example.net>\r\n"]


async def test_case_19_auth_edge_cases(cases_dir, downstream: Downstream, start_relay,
                                       monkeypatch) -> None:
    monkeypatch.setenv("TEST_RELAYUSER_PASSWORD", "example-password")
    relay = await start_relay(
        downstream.port,
        server={"mynetworks": ["192.0.2.0/24"], "auth_require_tls": False},
        app=[{"name": "relayuser", "password_env": "TEST_RELAYUSER_PASSWORD"}])
    [replies] = await run_case(cases_dir, "19-auth-edge-cases.smtp", relay)
    got = codes(replies)
    assert got[:3] + got[4:] == [220, 250, 530, 334, 501, 501, 334, 235, 503, 250, 221]
    # "AUTH PLAIN =" (empty credentials, RFC 4954 4): refused, either way, never a 334
    assert (replies[3].code, replies[3].enhanced) in ((535, "5.7.8"), (501, "5.5.2"))
    assert any(line[4:].split()[:1] == ["AUTH"] and {"PLAIN", "LOGIN"} <= set(line.split())
               for line in replies[1].lines)
    assert replies[2].enhanced == "5.7.0"
    assert replies[4].lines == ["334 "]                 # empty challenge, with the space
    assert [r.enhanced for r in replies[5:7]] == ["5.7.0", "5.5.2"]
    # LOGIN with an initial response asks for the password, not the user name again
    assert base64.b64decode(replies[7].lines[0][4:]).startswith(b"Password")
    assert [r.enhanced for r in replies[8:10]] == ["2.7.0", "5.5.1"]
    await relay.stop(deadline=1)
    assert downstream.commands == []
