"""/metrics on the HTTP listener, scraped over HTTP and parsed as Prometheus text."""

from __future__ import annotations

import aiohttp
import aiosmtplib
from prometheus_client.parser import text_string_to_metric_families

from relay.outbound.dkim import generate_private_key, write_private_key
from tests.conftest import wait_events
from tests.support.downstream import Downstream
from tests.test_lifecycle import free_port

MESSAGE = b"From: news@example.com\r\nSubject: m\r\n\r\nhi\r\n"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_are_scraped_and_parsed(downstream: Downstream, start_relay,
                                              tmp_path) -> None:
    key = tmp_path / "k.pem"
    write_private_key(key, generate_private_key("rsa"))
    downstream.script("RCPT", "550 5.1.1 no such user", match="gone@", times=None)
    port = free_port()
    relay = await start_relay(downstream.port, http={"listen": f"127.0.0.1:{port}"},
                              dkim=[{"domain": "example.com", "selector": "s1", "key": str(key)}])
    host, smtp_port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=smtp_port) as c:
        await c.sendmail("news@example.com", ["a@example.net", "gone@example.net"], MESSAGE)
        await wait_events(relay, 3)     # a, gone, and the notice to the sender
        async with aiohttp.ClientSession() as http, \
                http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            got = samples(await resp.text())
    assert got[("relay_messages_accepted_total", ())] == 1
    assert got[("relay_recipients_total",
                (("category", "delivered"), ("outcome", "delivered")))] == 2
    assert got[("relay_recipients_total", (("category", "hard"), ("outcome", "bounced")))] == 1
    assert got[("relay_dkim_sign_seconds_count", ())] >= 2
    assert got[("relay_delivery_latency_seconds_count", ())] == 2
    assert got[("relay_smtp_sessions", ())] >= 1
    assert got[("relay_smtp_sessions_opened_total", ())] >= 1
    assert ("relay_queue_recipients", (("state", "queued"),)) in got
    assert ("relay_pool_connections", (("destination", "smarthost"),)) in got
