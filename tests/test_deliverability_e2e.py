"""Suppression, List-Unsubscribe with one-click, and DKIM, end to end: real SMTP in, real
SMTP out, real HTTP, real SQLite, signatures checked by dkimpy, Mail::DKIM and mailauth against a
DNS server on loopback."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import aiosmtplib
import dkim
import pytest
import pytest_asyncio

from relay.app import Relay
from relay.outbound.dkim import DkimKey, generate_private_key, write_private_key
from relay.suppression import GLOBAL, Reason, Suppression
from tests.conftest import CORPUS, wait_events
from tests.support.dkimverify import assert_independent_pass, dkimpy_results, zone
from tests.support.dns import LoopbackDNS
from tests.support.downstream import Downstream
from tests.support.transcript import parse, play
from tests.test_cases import codes
from tests.test_lifecycle import free_port

FROM = "news@example.com"


def message(subject: str = "news", extra: str = "") -> bytes:
    return (f"From: News <{FROM}>\r\nTo: reader@example.net\r\nSubject: {subject}\r\n"
            f"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\nMessage-ID: <{subject}@example.com>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain\r\n{extra}\r\n"
            "Hello.\r\n").encode()


@pytest.fixture(scope="module")
def key_files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("dkim")
    rsa, ed = folder / "example.com.s1.pem", folder / "example.com.s2.pem"
    write_private_key(rsa, generate_private_key("rsa"))
    write_private_key(ed, generate_private_key("ed25519"))
    return rsa, ed


@pytest_asyncio.fixture
async def dns(key_files) -> LoopbackDNS:
    keys = [DkimKey.load("example.com", "s1", key_files[0]),
            DkimKey.load("example.com", "s2", key_files[1])]
    async with LoopbackDNS(zone(keys)) as server:
        yield server


@pytest.fixture
def marketing(downstream: Downstream, key_files, start_relay):
    """start(**sections) -> a relay sending marketing mail, signing with two keys, with its
    HTTP listener on a known port (public_url must name it)."""

    async def start(**sections) -> Relay:
        http_port = free_port()
        base = {
            "server": {"default_stream": "marketing"},
            "http": {"listen": f"127.0.0.1:{http_port}",
                     "public_url": f"http://127.0.0.1:{http_port}"},
            "dkim": [{"domain": "example.com", "selector": "s1", "key": str(key_files[0])},
                     {"domain": "example.com", "selector": "s2", "key": str(key_files[1])}],
        }
        for name, value in sections.items():
            base[name] = {**base.get(name, {}), **value} if isinstance(value, dict) else value
        return await start_relay(downstream.port, **base)

    return start


async def send(relay: Relay, rcpts: list[str], data: bytes, sender: str = FROM) -> None:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail(sender, rcpts, data)


def header(data: bytes, name: bytes) -> bytes | None:
    """The unfolded value of a header field (first occurrence)."""
    head = data.split(b"\r\n\r\n", 1)[0]
    m = re.search(rb"(?im)^" + re.escape(name) + rb":[ \t]*([^\r\n]*(?:\r\n[ \t][^\r\n]*)*)", head)
    return re.sub(rb"\r\n[ \t]", b" ", m.group(1)) if m else None


def one_click_url(data: bytes) -> str:
    value = header(data, b"List-Unsubscribe")
    assert value is not None
    return re.search(rb"<(https?://[^>]+)>", value).group(1).decode()


async def test_marketing_mail_gets_signed_per_recipient_list_unsubscribe(
        marketing, downstream: Downstream, dns: LoopbackDNS, tmp_path) -> None:
    relay = await marketing()
    await send(relay, ["a@example.net", "b@example.net"], message())
    got = await downstream.wait_messages(2)
    assert sorted(m.rcpt_tos[0] for m in got) == ["a@example.net", "b@example.net"]
    urls = {one_click_url(m.data) for m in got}
    assert len(urls) == 2                              # a token of its own per recipient
    for m in got:
        assert header(m.data, b"List-Unsubscribe-Post") == b"List-Unsubscribe=One-Click"
        assert b"mailto:unsubscribe@relay.test?subject=unsubscribe%20" in header(
            m.data, b"List-Unsubscribe")
        assert m.data.count(b"\r\nList-Unsubscribe:") == 1
        # both keys signed, List-Unsubscribe(-Post) covered and over-signed
        assert await dkimpy_results(m.data, dns.port) == [True, True]
        sig = header(m.data, b"DKIM-Signature").replace(b" ", b"").lower()
        h = re.search(rb"h=([^;]+)", sig).group(1).split(b":")
        assert h.count(b"list-unsubscribe") == 2 and h.count(b"list-unsubscribe-post") == 2
        assert h.count(b"from") == 2
    await assert_independent_pass([m.data for m in got], dns.port, tmp_path, 2)


async def test_transactional_mail_has_no_list_unsubscribe_and_one_transaction(
        marketing, downstream: Downstream, dns: LoopbackDNS) -> None:
    relay = await marketing(server={"default_stream": "transactional"})
    await send(relay, ["a@example.net", "b@example.net"], message("receipt"))
    [m] = await downstream.wait_messages(1)
    assert m.rcpt_tos == ["a@example.net", "b@example.net"]
    assert header(m.data, b"List-Unsubscribe") is None
    assert await dkimpy_results(m.data, dns.port) == [True, True]


async def test_one_click_post_suppresses_and_get_does_not(marketing,
                                                          downstream: Downstream) -> None:
    relay = await marketing()
    await send(relay, ["reader@example.net"], message())
    [m] = await downstream.wait_messages(1)
    url = one_click_url(m.data)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:        # link scanners fetch GETs
            assert resp.status == 200
            assert "<form" in await resp.text()
        assert relay.suppressions.check("reader@example.net") is None
        form = {"List-Unsubscribe": "One-Click"}
        for _ in range(2):                       # repeating it is harmless
            async with http.post(url, data=form) as resp:
                assert resp.status == 200
    entry = relay.suppressions.check("reader@example.net")
    assert entry is not None and entry.reason is Reason.UNSUBSCRIBE
    events = await wait_events(relay, 2)
    assert ("reader@example.net", "unsubscribe") in [(e[1], e[2]) for e in events]
    # the next message to that address is refused at RCPT, naming the reason
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as err:
            await c.sendmail(FROM, ["reader@example.net"], message("again"))
    [refusal] = err.value.recipients
    assert refusal.code == 550 and refusal.message.startswith("5.7.1")
    assert "unsubscribe" in refusal.message


async def test_forged_and_expired_tokens_are_refused(marketing) -> None:
    relay = await marketing()
    base = relay.cfg.http.public_url
    good = relay.tokens.make("x@example.net", GLOBAL, "Q1")
    expired = relay.tokens.make("x@example.net", GLOBAL, "Q1",
                                now=time.time() - relay.cfg.unsubscribe.token_lifetime - 3600)
    forged = good[:-4] + ("AAAA" if good[-4:] != "AAAA" else "BBBB")
    form = {"List-Unsubscribe": "One-Click"}
    bodies = set()
    async with aiohttp.ClientSession() as http:
        for token in (forged, expired, "not-a-token"):
            async with http.post(f"{base}/u/{token}", data=form) as resp:
                assert resp.status in (400, 404)
                bodies.add(await resp.text())
        async with http.get(f"{base}/healthz") as resp:
            assert resp.status == 200
    assert len(bodies) == 1                      # never says which part was wrong
    assert relay.suppressions.count() == 0


async def test_suppression_between_accept_and_send_is_honoured(
        marketing, downstream: Downstream) -> None:
    downstream.script("EOD", "451 4.3.0 later", times=1)
    relay = await marketing(queue={"retry": ["1s"]})
    await send(relay, ["late@example.net"], message())
    await wait_events(relay, 1)                  # the first attempt was deferred
    await asyncio.to_thread(relay.suppressions.add, Suppression(
        "late@example.net", GLOBAL, Reason.COMPLAINT, "test", time.time()))
    events = await wait_events(relay, 2)
    assert [e[2] for e in events] == ["deferred", "suppressed"]
    assert downstream.messages == []
    assert await relay.store.list() == []


async def test_accept_and_drop_mode(marketing, downstream: Downstream) -> None:
    relay = await marketing(suppression={"at_rcpt": "drop"})
    relay.suppressions.add(Suppression("gone@example.net", GLOBAL, Reason.MANUAL, "", 1.0))
    await send(relay, ["gone@example.net", "here@example.net"], message())
    events = {e[1]: e[2] for e in await wait_events(relay, 2)}
    assert events == {"gone@example.net": "suppressed", "here@example.net": "delivered"}
    assert [m.rcpt_tos for m in downstream.messages] == [["here@example.net"]]


async def test_unsubscribe_by_mail(marketing, downstream: Downstream) -> None:
    relay = await marketing()
    await send(relay, ["reader@example.net"], message())
    [m] = await downstream.wait_messages(1)
    mailto = re.search(rb"mailto:([^?]+)\?subject=unsubscribe%20([^>]+)>",
                       header(m.data, b"List-Unsubscribe"))
    address, token = mailto.group(1).decode(), mailto.group(2).decode()
    reply = (f"From: reader@example.net\r\nTo: {address}\r\n"
             f"Subject: unsubscribe {token}\r\n\r\n\r\n").encode()
    await send(relay, [address], reply, sender="reader@example.net")
    entry = relay.suppressions.check("reader@example.net")
    assert entry is not None and entry.reason is Reason.UNSUBSCRIBE
    assert [e[2] for e in await wait_events(relay, 2)] == ["delivered", "unsubscribe"]
    await asyncio.sleep(0.2)
    assert len(downstream.messages) == 1         # the unsubscribe mail was not relayed
    assert await relay.store.list() == []


async def test_hard_bounce_suppresses_and_policy_5xx_does_not(marketing,
                                                              downstream: Downstream) -> None:
    downstream.script("RCPT", "550 5.1.1 no such user", match="dead@", times=None)
    downstream.script("RCPT", "550 5.7.1 policy block", match="blocked@", times=None)
    relay = await marketing()
    await send(relay, ["dead@example.net", "blocked@example.net"], message())
    await wait_events(relay, 2)
    for _ in range(100):
        if relay.suppressions.count():
            break
        await asyncio.sleep(0.02)
    entry = relay.suppressions.check("dead@example.net")
    assert entry is not None and entry.reason is Reason.HARD_BOUNCE and "5.1.1" in entry.detail
    assert relay.suppressions.check("blocked@example.net") is None     # invariant 5


async def test_case_15_pipelining_with_suppressed_and_bad_rcpts(
        cases_dir, downstream: Downstream, start_relay, dns: LoopbackDNS, key_files) -> None:
    relay = await start_relay(downstream.port, dkim=[
        {"domain": "example.com", "selector": "s1", "key": str(key_files[0])}])
    relay.suppressions.add(Suppression("gone@example.net", GLOBAL, Reason.UNSUBSCRIBE, "", 1.0))
    host, port = relay.smtp_addresses[0]
    [replies] = await play(parse(cases_dir / "15-pipelining-mixed-rcpt.smtp"), host, port)
    got = codes(replies)
    assert got[:7] == [220, 250, 250, 250, 550, 553, 354]
    assert got[7] == 250                          # group 1 message accepted
    assert got[8:10] == [250, 550]                # group 2: MAIL, suppressed RCPT
    assert got[10] in (503, 554)                  # DATA with no valid recipient
    assert 500 <= got[11] < 600 and got[12] == 221
    assert replies[4].enhanced == "5.7.1" and "unsubscribe" in replies[4].text
    [m] = await downstream.wait_messages(1)
    assert (m.mail_from, m.rcpt_tos) == ("news@example.com", ["reader@example.net"])
    assert await dkimpy_results(m.data, dns.port) == [True]
    await asyncio.sleep(0.2)
    assert len(downstream.messages) == 1
    assert [(e.address, e.reason) for e in relay.suppressions.list()] == [
        ("gone@example.net", Reason.UNSUBSCRIBE)]


async def test_case_16_size_growth_from_our_headers(cases_dir, start_relay, key_files) -> None:
    async with Downstream(size_limit=10300) as ds:
        relay = await start_relay(ds.port, server={"max_message_size": 10240}, dkim=[
            {"domain": "example.com", "selector": "s1", "key": str(key_files[0])},
            {"domain": "example.com", "selector": "s2", "key": str(key_files[1])}])
        host, port = relay.smtp_addresses[0]
        [replies] = await play(parse(cases_dir / "16-size-limit-growth.smtp"), host, port)
        assert codes(replies) == [220, 250, 552, 250, 250, 354, 552, 250, 250, 354, 250, 221]
        assert replies[2].enhanced == replies[6].enhanced == "5.3.4"
        # C fit our limit but not the next hop's after signing: bounced as 5.3.4, the
        # sender is told, and the recipient is not suppressed (it is not its fault).
        [notice] = await ds.wait_messages(1)
        assert notice.rcpt_tos == ["news@example.com"] and b"Status: 5.3.4" in notice.data
        events = await wait_events(relay, 2)
        assert [e[2] for e in events if e[1] == "reader@example.net"] == ["bounced"]
        assert relay.suppressions.count() == 0


@pytest.mark.parametrize("case", ["10-utf8-header-8bitmime.smtp", "24-empty-body-dkim.smtp"])
async def test_cases_10_and_24_signed_and_verified(cases_dir, case, marketing,
                                                   downstream: Downstream, dns: LoopbackDNS,
                                                   tmp_path) -> None:
    relay = await marketing(server={"default_stream": "transactional"})
    host, port = relay.smtp_addresses[0]
    [replies] = await play(parse(cases_dir / case), host, port)
    assert all(r.code < 400 for r in replies)
    count = codes(replies).count(354)
    got = await downstream.wait_messages(count)
    for m in got:
        assert await dkimpy_results(m.data, dns.port) == [True, True]
        if b"Subject: no body" in m.data or b"only blank lines" in m.data:
            bh = re.search(rb"bh=([^;]+);", header(m.data, b"DKIM-Signature").replace(
                b" ", b"")).group(1)
            assert bh == b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="   # RFC 6376 3.4.4
    await assert_independent_pass([m.data for m in got], dns.port, tmp_path, 2)


async def test_corpus_through_the_relay_verifies(marketing, downstream: Downstream,
                                                 dns: LoopbackDNS, tmp_path) -> None:
    relay = await marketing(server={"default_stream": "transactional"})
    host, port = relay.smtp_addresses[0]
    accepted = 0
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        for path in sorted(CORPUS.glob("msg_*.txt")):
            data = re.sub(rb"\r?\n", b"\r\n", path.read_bytes())
            data = data if data.endswith(b"\r\n") else data + b"\r\n"
            try:
                await c.sendmail(FROM, ["reader@example.net"], data)
                accepted += 1
            except aiosmtplib.SMTPDataError as exc:
                assert exc.code == 550 and re.match(r"5\.6\.\d ", exc.message), exc
    assert accepted >= 30
    got = await downstream.wait_messages(accepted, timeout=30)
    for m in got:
        results = await dkimpy_results(m.data, dns.port)
        # signed when the From domain has keys (example.com); others go unsigned
        if b"example.com" in (header(m.data, b"From") or b"").lower():
            assert results == [True, True]
    signed = [m.data for m in got if m.data.startswith(b"DKIM-Signature")]
    await assert_independent_pass(signed, dns.port, tmp_path, 2)


def test_unreadable_dkim_key_stops_the_relay(tmp_path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f"""
[server]
listen = ["127.0.0.1:{free_port()}"]
[outbound]
smarthost = "127.0.0.1:9"
[http]
listen = ""
[[dkim]]
domain = "example.com"
selector = "s1"
key = "{bad}"
""")
    for command in ("check-config", "serve"):
        out = subprocess.run([sys.executable, "-m", "relay", command, "--config", str(cfg)],
                             capture_output=True, text=True, timeout=60, check=False)
        assert out.returncode != 0, (command, out)
        assert "dkim" in out.stderr and str(bad) in out.stderr


def test_dkim_verifier_would_catch_a_change(key_files) -> None:
    """Guard for the tests above: the verifier really rejects a modified signed body."""
    from relay.outbound.dkim import Signer

    key = DkimKey.load("example.com", "s1", key_files[0])
    signed = Signer([key]).sign(message())
    record = key.txt_record().encode()

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        return record

    assert dkim.verify(signed, dnsfunc=dnsfunc)
    assert not dkim.verify(signed.replace(b"Hello.", b"Hellp."), dnsfunc=dnsfunc)
