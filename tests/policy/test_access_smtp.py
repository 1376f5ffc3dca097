"""Access, sender rules, rate limits and header rules, over real SMTP with real TLS
(certificates generated in the test)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import logging
import ssl

import aiosmtplib
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from relay.app import Relay
from relay.policy.access import hash_password
from tests.conftest import relay_config, wait_events
from tests.support.downstream import Downstream
from tests.support.wire import Wire

PASSWORD = "s3cret-app-password"


def make_cert(tmp_path) -> tuple[str, str, ssl.SSLContext]:
    """A self-signed certificate for localhost/127.0.0.1: (cert path, key path, client ctx)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "relay.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .sign(key, hashes.SHA256()))
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert_pem)
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    client = ssl.create_default_context(cadata=cert_pem.decode())
    return str(cert_path), str(key_path), client


APPS = [
    {"name": "shop", "password_env": "TEST_SHOP_PASSWORD", "from_domains": ["example.com"],
     "stream": "marketing"},
    {"name": "billing", "password_hash": hash_password(PASSWORD, iterations=1000),
     "from_domains": ["billing.example.com"], "rate": "2/m", "require_dkim": True},
]


@pytest.fixture
def tls(tmp_path):
    return make_cert(tmp_path)


@pytest.fixture
async def relay(tmp_path, tls, downstream: Downstream, monkeypatch, start_relay) -> Relay:
    monkeypatch.setenv("TEST_SHOP_PASSWORD", PASSWORD)
    cert, key, _ = tls
    return await start_relay(downstream.port, server={
        "listen": ["127.0.0.1:0"], "listen_tls": ["127.0.0.1:0"],
        "tls_cert": cert, "tls_key": key,
        "mynetworks": ["192.0.2.0/24"],          # loopback is NOT trusted here
        "auth_max_failures": 3, "auth_lockout": "10m"},
        app=APPS)


def message(frm: str = "Shop <news@example.com>", extra: str = "") -> bytes:
    return (f"From: {frm}\r\nTo: r@example.net\r\nSubject: s\r\n{extra}\r\nbody\r\n").encode()


async def client(relay: Relay, tls_ctx: ssl.SSLContext, *, user: str = "shop",
                 password: str = PASSWORD) -> aiosmtplib.SMTP:
    port = relay.smtp_addresses[0][1]
    c = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, tls_context=tls_ctx)
    await c.connect()
    await c.login(user, password)
    return c


async def test_auth_is_offered_only_after_starttls(relay: Relay, tls) -> None:
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    ehlo = await wire.cmd("EHLO client.example.net")
    assert "250-STARTTLS" in ehlo.lines
    assert not any("AUTH" in line for line in ehlo.lines)
    reply = await wire.cmd("AUTH PLAIN " + base64.b64encode(b"\0shop\0x").decode())
    assert reply.code == 538 and reply.enhanced == "5.7.11"
    assert (await wire.cmd("STARTTLS")).code == 220
    await wire.writer.start_tls(tls[2], server_hostname="localhost")
    ehlo = await wire.cmd("EHLO client.example.net")
    assert any(line[4:].startswith("AUTH") and "PLAIN" in line and "LOGIN" in line
               for line in ehlo.lines)
    assert "250-STARTTLS" not in ehlo.lines
    await wire.close()


async def test_unauthenticated_outsider_gets_530(relay: Relay) -> None:
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    await wire.cmd("EHLO client.example.net")
    # With marketing mail configured, anyone may write to our unsubscribe address, so the
    # relay decision is taken at RCPT (as Postfix's smtpd_relay_restrictions are).
    assert (await wire.cmd("MAIL FROM:<news@example.com>")).code == 250
    reply = await wire.cmd("RCPT TO:<victim@example.org>")
    assert (reply.code, reply.enhanced) == (530, "5.7.0")
    reply = await wire.cmd("RCPT TO:<unsubscribe@relay.test>")
    assert reply.code == 250
    await wire.close()


async def test_authenticated_app_sends_its_own_domain(relay: Relay, tls,
                                                      downstream: Downstream) -> None:
    c = await client(relay, tls[2])
    await c.sendmail("news@example.com", ["r@example.net"], message())
    await c.quit()
    [msg] = await downstream.wait_messages(1)
    assert b"with ESMTPSA id" in msg.data
    entries = await wait_events(relay, 1)
    assert entries[0][2] == "delivered"


async def test_implicit_tls_listener_offers_auth_at_once(relay: Relay, tls,
                                                         downstream: Downstream) -> None:
    port = relay.smtp_addresses[1][1]
    async with aiosmtplib.SMTP(hostname="localhost", port=port, use_tls=True,
                               tls_context=tls[2]) as c:
        await c.ehlo()
        assert c.supports_extension("auth") and not c.supports_extension("starttls")
        await c.login("shop", PASSWORD)
        await c.sendmail("news@example.com", ["r@example.net"], message())
    [msg] = await downstream.wait_messages(1)
    assert b"with ESMTPSA id" in msg.data


@pytest.mark.parametrize("sender, body, code, enhanced", [
    ("news@example.org", message(), 553, "5.7.1"),                       # MAIL FROM domain
    ("news@example.com", message("x@example.org"), 550, "5.7.1"),        # From domain
    ("news@example.com", b"To: r@example.net\r\nSubject: s\r\n\r\nb\r\n", 550, "5.6.0"),
    ("news@example.com", message(extra="From: other@example.com\r\n"), 550, "5.6.0"),
    ("news@example.com", message(extra="X-Relay-Stream: bulk\r\n"), 550, "5.6.0"),
    # From spoofing that a lenient parser lets through: all fail closed
    ("news@example.com", message("news@example.com <ceo@evil.example>"), 550, "5.7.1"),
    ("news@example.com", message('"news@example.com" <ceo@evil.example>'), 550, "5.7.1"),
    ("news@example.com", message("ceo@evil.example."), 550, "5.7.1"),
    ("news@example.com", message("undisclosed"), 550, "5.7.1"),
    ("news@example.com", message("news@example.com, ceo@evil.example"), 550, "5.7.1"),
])
async def test_sender_rules(relay: Relay, tls, sender, body, code, enhanced) -> None:
    c = await client(relay, tls[2])
    with pytest.raises(aiosmtplib.SMTPResponseException) as err:
        await c.sendmail(sender, ["r@example.net"], body)
    assert err.value.code == code and err.value.message.startswith(enhanced), err.value
    await c.quit()
    assert await relay.store.list() == []


async def test_require_dkim_refuses_a_from_domain_without_key(relay: Relay, tls) -> None:
    c = await client(relay, tls[2], user="billing")
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await c.sendmail("a@billing.example.com", ["r@example.net"],
                         message("a@billing.example.com"))
    assert err.value.code == 550 and err.value.message.startswith("5.7.1")
    assert "DKIM" in err.value.message
    await c.quit()


async def test_failed_auth_locks_out_the_address(relay: Relay, tls, caplog) -> None:
    port = relay.smtp_addresses[0][1]
    caplog.set_level(logging.INFO, logger="relay")
    for _ in range(3):
        c = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, tls_context=tls[2])
        await c.connect()
        await c.ehlo()
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
            await c.auth_plain("shop", "wrong")
        assert err.value.code == 535
        c.close()
    c = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, tls_context=tls[2])
    await c.connect()
    await c.ehlo()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await c.auth_plain("shop", PASSWORD)  # even the right password: locked out
    assert (err.value.code, err.value.message[:5]) == (454, "4.7.0")
    c.close()
    assert "locking out this address" in caplog.text
    assert "locked out after repeated failures" in caplog.text


async def test_plaintext_pipelined_after_starttls_is_discarded(relay: Relay, tls) -> None:
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    await wire.cmd("EHLO client.example.net")
    # RFC 3207 4.2 / CVE-2011-0411: a command injected before the handshake must be dropped
    await wire.send(b"STARTTLS\r\nNOOP injected\r\n")
    assert (await wire.reply()).code == 220
    await wire.writer.start_tls(tls[2], server_hostname="localhost")
    reply = await wire.cmd("EHLO after.example.net")
    assert reply.code == 250 and reply.lines[0].startswith("250-relay.test")
    await wire.close()


async def test_app_message_rate_gives_451_with_a_hint(relay: Relay, tls) -> None:
    c = await client(relay, tls[2], user="billing", password=PASSWORD)
    relay.edge.policy.dkim_domains = frozenset({"billing.example.com"})  # let DATA through
    for _ in range(2):
        await c.sendmail("a@billing.example.com", ["r@example.net"],
                         message("a@billing.example.com"))
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await c.sendmail("a@billing.example.com", ["r@example.net"],
                         message("a@billing.example.com"))
    assert err.value.code == 451 and err.value.message.startswith("4.7.1")
    assert "billing" in err.value.message and "2 per minute" in err.value.message
    await c.quit()


async def test_client_recipient_rate(tmp_path, downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"client_recipient_rate": "3/h"})
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    await wire.cmd("EHLO c.example.net")
    await wire.cmd("MAIL FROM:<a@example.com>")
    got = [(await wire.cmd(f"RCPT TO:<r{i}@example.net>")).code for i in range(5)]
    assert got == [250, 250, 250, 451, 451]
    await wire.close()


async def test_header_rules_and_streams(relay: Relay, tls, downstream: Downstream) -> None:
    c = await client(relay, tls[2])
    body = message(extra="Bcc: hidden@example.net\r\nX-Originating-IP: 192.0.2.9\r\n"
                         "X-Relay-Campaign: spring-sale\r\nX-Relay-Stream: transactional\r\n")
    await c.sendmail("news@example.com", ["r@example.net"], body)
    await c.quit()
    [msg] = await downstream.wait_messages(1)
    data = msg.data
    for gone in (b"Bcc:", b"X-Originating-IP:", b"X-Relay-", b"hidden@example.net"):
        assert gone not in data
    assert b"Feedback-ID: spring-sale:shop:transactional:relay\r\n" in data
    assert b"\r\nMessage-ID: <" in data and b"\r\nDate: " in data


async def test_reload_applies_to_new_sessions_only(tmp_path, relay: Relay, tls,
                                                   monkeypatch) -> None:
    old = await client(relay, tls[2])
    monkeypatch.setenv("TEST_SHOP_PASSWORD", PASSWORD)
    cert, key, _ = tls
    new_cfg = relay_config(tmp_path, relay.cfg.outbound.smarthost[1], server={
        "tls_cert": cert, "tls_key": key, "mynetworks": ["192.0.2.0/24"]},
        app=[{"name": "newapp", "password_hash": hash_password("pw2", iterations=1000),
              "from_domains": ["new.example.com"]}])
    relay.reload(new_cfg)
    # the session that started before keeps its policy
    await old.sendmail("news@example.com", ["r@example.net"], message())
    await old.quit()
    # a new session has the new accounts: shop is gone, newapp works
    port = relay.smtp_addresses[0][1]
    c = aiosmtplib.SMTP(hostname="localhost", port=port, start_tls=True, tls_context=tls[2])
    await c.connect()
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await c.login("shop", PASSWORD)
    await c.login("newapp", "pw2")
    await c.sendmail("a@new.example.com", ["r@example.net"], message("a@new.example.com"))
    await c.quit()


async def test_auth_param_on_mail(relay: Relay, tls) -> None:
    c = await client(relay, tls[2])
    resp = await c.execute_command(b"MAIL", b"FROM:<news@example.com>", b"AUTH=<>")
    assert resp.code == 250
    await c.execute_command(b"RSET")
    resp = await c.execute_command(b"MAIL", b"FROM:<news@example.com>", b"AUTH=bad=value")
    assert resp.code == 501 and resp.message.startswith("5.5.4")
    await c.quit()


async def test_auth_param_refused_with_555_when_auth_not_offered(downstream: Downstream,
                                                                  start_relay) -> None:
    relay = await start_relay(downstream.port)   # no [[app]]: no AUTH
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    ehlo = await wire.cmd("EHLO c.example.net")
    assert not any("AUTH" in line for line in ehlo.lines)
    reply = await wire.cmd("MAIL FROM:<a@example.com> AUTH=<>")
    assert (reply.code, reply.enhanced) == (555, "5.5.4")
    reply = await wire.cmd("AUTH PLAIN")
    assert (reply.code, reply.enhanced) == (502, "5.5.1")
    await wire.close()


async def test_many_sessions_beyond_max_get_421(downstream: Downstream, start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_sessions": 3})
    host, port = relay.smtp_addresses[0]
    wires = [await Wire.open(host, port) for _ in range(3)]
    assert all(w.greeting.code == 220 for w in wires)
    reader, writer = await asyncio.open_connection(host, port)
    line = await asyncio.wait_for(reader.readline(), 5)
    assert line.startswith(b"421 4.7.0")
    writer.close()
    for w in wires:
        await w.close()


async def test_app_rate_holds_against_parallel_sessions(relay: Relay, tls) -> None:
    """Transactions in flight count against the rate: 6 sessions racing MAIL before any
    DATA get at most the 2 messages per minute the app is allowed."""
    relay.edge.policy.dkim_domains = frozenset({"billing.example.com"})
    clients = [await client(relay, tls[2], user="billing") for _ in range(6)]
    codes = [(await c.execute_command(b"MAIL", b"FROM:<a@billing.example.com>")).code
             for c in clients]
    assert codes.count(250) == 2 and codes.count(451) == 4
    accepted = [c for c, code in zip(clients, codes, strict=True) if code == 250]
    for c in accepted:
        await c.rcpt("r@example.net")
        await c.data(message("a@billing.example.com"))
    # after they committed, the bucket is still full: a new session is refused too
    late = await client(relay, tls[2], user="billing")
    assert (await late.execute_command(b"MAIL", b"FROM:<a@billing.example.com>")).code == 451
    for c in [*clients, late]:
        c.close()


async def test_only_real_sasl_mechanisms_are_offered(relay: Relay, tls) -> None:
    port = relay.smtp_addresses[1][1]
    async with aiosmtplib.SMTP(hostname="localhost", port=port, use_tls=True,
                               tls_context=tls[2]) as c:
        await c.ehlo()
        assert set(c.esmtp_extensions["auth"].split()) == {"PLAIN", "LOGIN"}
        resp = await c.execute_command(b"AUTH", b"OFFERED")
        assert (resp.code, resp.message[:5]) == (504, "5.5.4")
