"""TLS and AUTH towards the smarthost, against a real TLS-speaking downstream."""

from __future__ import annotations

import ssl

import aiosmtplib
import pytest

from tests.conftest import wait_events
from tests.support.downstream import Downstream, self_signed_contexts

MESSAGE = b"From: a@example.com\r\nSubject: tls\r\n\r\nhello\r\n"


def ca_file(tmp_path, client_ctx: ssl.SSLContext):
    der = client_ctx.get_ca_certs(binary_form=True)[0]
    path = tmp_path / "ca.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return str(path)


async def send(relay) -> None:
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        await c.sendmail("a@example.com", ["r@example.net"], MESSAGE)


@pytest.mark.parametrize("mode", ["starttls", "tls"])
async def test_verified_tls_to_smarthost(tmp_path, start_relay, mode) -> None:
    server_ctx, client_ctx = self_signed_contexts("localhost")
    kw = {"starttls_context": server_ctx} if mode == "starttls" else {"tls_context": server_ctx}
    async with Downstream(**kw) as ds:
        relay = await start_relay(ds.port, outbound={
            "smarthost": f"localhost:{ds.port}", "tls": mode,
            "tls_ca_file": ca_file(tmp_path, client_ctx)})
        await send(relay)
        [msg] = await ds.wait_messages(1)
        assert msg.tls
        assert [e[2] for e in await wait_events(relay, 1)] == ["delivered"]


async def test_unverifiable_certificate_defers_and_sends_nothing(start_relay) -> None:
    server_ctx, _ = self_signed_contexts("localhost")
    async with Downstream(starttls_context=server_ctx) as ds:
        relay = await start_relay(ds.port, outbound={"smarthost": f"localhost:{ds.port}",
                                                     "tls": "starttls"})
        await send(relay)
        [ev] = await wait_events(relay, 1)
        assert ev[2] == "deferred" and " 4.7.5 " in f" {ev[3]} "
        assert ds.messages == []
        assert not any(line.upper().startswith(b"MAIL") for _, line in ds.commands)


async def test_required_starttls_never_falls_back_to_plaintext(start_relay) -> None:
    async with Downstream() as ds:   # offers no STARTTLS
        relay = await start_relay(ds.port, outbound={"tls": "starttls"})
        await send(relay)
        [ev] = await wait_events(relay, 1)
        assert ev[2] == "deferred"
        assert not any(line.upper().startswith(b"MAIL") for _, line in ds.commands)


async def test_opportunistic_tls_is_used_when_offered(start_relay) -> None:
    server_ctx, _ = self_signed_contexts("localhost")
    async with Downstream(starttls_context=server_ctx) as ds:
        relay = await start_relay(ds.port, outbound={"tls": "opportunistic"})
        await send(relay)
        [msg] = await ds.wait_messages(1)
        assert msg.tls


async def test_opportunistic_tls_sends_plaintext_when_not_offered(start_relay) -> None:
    async with Downstream() as ds:
        relay = await start_relay(ds.port, outbound={"tls": "opportunistic"})
        await send(relay)
        [msg] = await ds.wait_messages(1)
        assert not msg.tls


@pytest.mark.parametrize("password, delivered", [("example-password", True),
                                                 ("wrong", False)])
async def test_auth_to_smarthost_from_environment(monkeypatch, start_relay, password,
                                                  delivered) -> None:
    monkeypatch.setenv("TEST_SMARTHOST_USER", "relayuser")
    monkeypatch.setenv("TEST_SMARTHOST_PASSWORD", password)
    server_ctx, _ = self_signed_contexts("localhost")
    async with Downstream(starttls_context=server_ctx,
                          auth={"relayuser": "example-password"}) as ds:
        relay = await start_relay(ds.port, outbound={
            "tls": "opportunistic", "username_env": "TEST_SMARTHOST_USER",
            "password_env": "TEST_SMARTHOST_PASSWORD"})
        await send(relay)
        [ev] = await wait_events(relay, 1)
        if delivered:
            assert ev[2] == "delivered"
            assert ds.messages[0].auth_user == "relayuser"
        else:
            assert ev[2] == "deferred" and "4.7.0" in ev[3]
            assert ds.messages == []
