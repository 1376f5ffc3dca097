"""The HTTP listener (relay/web.py): one-click unsubscribe over real HTTP on 127.0.0.1
port 0, with aiohttp's client for well-formed requests and raw sockets for the rest."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from relay.policy.unsubscribe import TokenData, Tokens
from relay.suppression import GLOBAL, Reason, Suppression
from relay.suppression.store import MemorySuppressionStore, SQLiteSuppressionStore
from relay.web import MAX_URL, SECURITY_HEADERS, HttpListener, make_app

SECRET = b"k" * 32
NOW = 1_800_000_000.0
LIFETIME = 30 * 86400.0
ONE_CLICK = "List-Unsubscribe=One-Click"
FORM = {"Content-Type": "application/x-www-form-urlencoded"}
RCPT = "alice@example.com"


@dataclass
class Server:
    """A running listener and what it is wired to."""

    base: str
    port: int
    tokens: Tokens
    store: MemorySuppressionStore | SQLiteSuppressionStore
    seen: list[TokenData] = field(default_factory=list)

    def token(self, recipient: str = RCPT, scope: str = GLOBAL, queue_id: str = "7F3A9C21D0",
              now: float = NOW) -> str:
        return self.tokens.make(recipient, scope, queue_id, now=now)

    def url(self, token: str) -> str:
        return f"{self.base}/u/{token}"


async def _serve(store: MemorySuppressionStore | SQLiteSuppressionStore,
                 ) -> AsyncIterator[Server]:
    tokens = Tokens(SECRET, lifetime=LIFETIME, clock=lambda: NOW + 60)
    seen: list[TokenData] = []
    app = make_app(tokens=tokens, store=store, on_unsubscribe=seen.append, clock=lambda: NOW)
    listener = HttpListener(app, "127.0.0.1", 0)
    host, port = await listener.start()
    assert host == "127.0.0.1"
    assert port > 0
    try:
        yield Server(f"http://127.0.0.1:{port}", port, tokens, store, seen)
    finally:
        await listener.stop()


@pytest_asyncio.fixture
async def server() -> AsyncIterator[Server]:
    async for running in _serve(MemorySuppressionStore(clock=lambda: NOW)):
        yield running


@pytest_asyncio.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def raw(port: int, data: bytes, *, read_all: bool = True,
              timeout: float = 5.0) -> tuple[int | None, bytes]:
    """Send raw bytes; the status code (None if the server closed without one), and what
    came back: everything up to EOF, or only the response head when `read_all` is false."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        if read_all:
            got = await asyncio.wait_for(reader.read(-1), timeout)
        else:
            got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
    finally:
        writer.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", got)
    return (int(match.group(1)) if match else None), got


def post_head(token: str, extra: str = "") -> bytes:
    return (f"POST /u/{token} HTTP/1.1\r\nHost: relay.test\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n{extra}").encode()


async def assert_alive(server: Server, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{server.base}/healthz") as resp:
        assert resp.status == 200
        assert await resp.text() == "ok"


# --- the one-click flow ---------------------------------------------------------------


async def test_one_click_post_suppresses(server: Server,
                                         client: aiohttp.ClientSession) -> None:
    token = server.token(scope="example.com")
    async with client.post(server.url(token), data=ONE_CLICK, headers=FORM) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "Set-Cookie" not in resp.headers  # RFC 8058 3.2: no cookies
        assert "alice@example.com" in await resp.text()
    entry = server.store.check(RCPT, ("example.com",))
    assert entry == Suppression(RCPT, "example.com", Reason.UNSUBSCRIBE, detail="one-click",
                                created_at=NOW)
    assert server.store.check(RCPT, (GLOBAL,)) is None  # the token's scope, nothing wider
    assert server.seen == [TokenData(RCPT, "example.com", "7F3A9C21D0", int(NOW))]


async def test_repeated_post_is_harmless(server: Server,
                                         client: aiohttp.ClientSession) -> None:
    token = server.token()
    for _ in range(3):
        async with client.post(server.url(token), data=ONE_CLICK, headers=FORM) as resp:
            assert resp.status == 200
    assert server.store.count() == 1
    assert len(server.seen) == 1  # the callback hears about the change once


async def test_an_earlier_permanent_entry_is_kept(server: Server,
                                                  client: aiohttp.ClientSession) -> None:
    bounce = Suppression(RCPT, GLOBAL, Reason.HARD_BOUNCE, detail="550 5.1.1", created_at=1.0)
    server.store.add(bounce)
    async with client.post(server.url(server.token()), data=ONE_CLICK, headers=FORM) as resp:
        assert resp.status == 200
    assert server.store.check(RCPT) == bounce
    assert server.seen == []


async def test_a_temporary_entry_becomes_permanent(server: Server,
                                                   client: aiohttp.ClientSession) -> None:
    server.store.add(Suppression(RCPT, GLOBAL, Reason.MANUAL, created_at=1.0,
                                 expires_at=NOW + 3600))
    async with client.post(server.url(server.token()), data=ONE_CLICK, headers=FORM) as resp:
        assert resp.status == 200
    entry = server.store.check(RCPT, now=NOW + 7200)
    assert entry is not None
    assert entry.reason is Reason.UNSUBSCRIBE
    assert entry.expires_at is None


async def test_multipart_form_data(server: Server, client: aiohttp.ClientSession) -> None:
    # RFC 8058 3.2: the receiver SHOULD send multipart/form-data (RFC 7578).
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
            b"One-Click\r\n--XyZ--\r\n")
    headers = {"Content-Type": "multipart/form-data; boundary=XyZ"}
    async with client.post(server.url(server.token()), data=body, headers=headers) as resp:
        assert resp.status == 200
    assert server.store.check(RCPT) is not None


async def test_multipart_form_data_from_aiohttp(server: Server,
                                                client: aiohttp.ClientSession) -> None:
    with aiohttp.MultipartWriter("form-data") as writer:
        part = writer.append("One-Click")
        part.set_content_disposition("form-data", name="List-Unsubscribe")
    async with client.post(server.url(server.token()), data=writer) as resp:
        assert resp.status == 200
    assert server.store.check(RCPT) is not None


async def test_form_without_content_type_is_read_as_urlencoded(server: Server) -> None:
    token = server.token()
    status, _ = await raw(server.port, (
        f"POST /u/{token} HTTP/1.1\r\nHost: relay.test\r\nContent-Length: 26\r\n"
        f"Connection: close\r\n\r\n{ONE_CLICK}").encode())
    assert status == 200
    assert server.store.check(RCPT) is not None


async def test_one_click_with_a_disk_store(tmp_path: Path) -> None:
    store = SQLiteSuppressionStore(tmp_path / "suppressions.db", clock=lambda: NOW)
    try:
        async for running in _serve(store):
            async with aiohttp.ClientSession() as client, client.post(
                    running.url(running.token()), data=ONE_CLICK, headers=FORM) as resp:
                assert resp.status == 200
    finally:
        store.close()
    reopened = SQLiteSuppressionStore(tmp_path / "suppressions.db", clock=lambda: NOW)
    try:
        entry = reopened.check(RCPT)
        assert entry is not None
        assert entry.reason is Reason.UNSUBSCRIBE
    finally:
        reopened.close()


async def test_get_shows_a_form_and_suppresses_nothing(server: Server,
                                                       client: aiohttp.ClientSession) -> None:
    token = server.token()
    for _ in range(2):
        async with client.get(server.url(token)) as resp:
            assert resp.status == 200
            assert resp.content_type == "text/html"
            page = await resp.text()
    assert re.search(r'<form method="post"[^>]*>', page)
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in page
    assert "alice@example.com" in page
    assert server.store.count() == 0
    assert server.seen == []
    async with client.head(server.url(token)) as resp:
        assert resp.status == 200
    assert server.store.count() == 0


async def test_the_confirm_button_unsubscribes(server: Server,
                                               client: aiohttp.ClientSession) -> None:
    token = server.token()
    async with client.get(server.url(token)) as resp:
        page = await resp.text()
    name, value = re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]+)">', page)[0]
    async with client.post(server.url(token), data={name: value}) as resp:  # as a browser
        assert resp.status == 200
    assert server.store.check(RCPT) is not None


async def test_everything_on_the_page_is_escaped(server: Server,
                                                 client: aiohttp.ClientSession) -> None:
    token = server.token(recipient='"<script>x</script>"@example.com', scope="<b>&amp;")
    async with client.get(server.url(token)) as resp:
        page = await resp.text()
    assert "<script>" not in page
    assert "<b>" not in page
    assert "&lt;script&gt;" in page
    assert "&lt;b&gt;&amp;amp;" in page
    async with client.post(server.url(token), data=ONE_CLICK, headers=FORM) as resp:
        assert resp.status == 200
        assert "<script>" not in await resp.text()


# --- refused requests -----------------------------------------------------------------


def _forged(server: Server) -> dict[str, str]:
    good = server.token()
    other = Tokens(b"x" * 32, lifetime=LIFETIME, clock=lambda: NOW)
    flipped = good[:10] + ("A" if good[10] != "A" else "B") + good[11:]
    return {
        "expired": server.token(now=NOW - LIFETIME - 3600),
        "other secret": other.make(RCPT, GLOBAL, "7F3A9C21D0", now=NOW),
        "flipped": flipped,
        "truncated": good[:-1],
        "garbage": "not-a-token",
        "percent": "%00%ff",
    }


async def test_bad_tokens_get_one_identical_400(server: Server,
                                                client: aiohttp.ClientSession) -> None:
    bodies = set()
    for what, token in _forged(server).items():
        async with client.post(server.url(token), data=ONE_CLICK, headers=FORM) as resp:
            assert resp.status == 400, what
            bodies.add(await resp.text())
        async with client.get(server.url(token)) as resp:
            assert resp.status == 400, what
            bodies.add(await resp.text())
    assert len(bodies) == 1
    assert "expired" in bodies.pop()  # one text covers every case
    assert server.store.count() == 0
    assert server.seen == []


@pytest.mark.parametrize(("body", "content_type", "status"), [
    ("", "application/x-www-form-urlencoded", 400),
    ("List-Unsubscribe=one-click", "application/x-www-form-urlencoded", 400),
    ("List-Unsubscribe=Yes", "application/x-www-form-urlencoded", 400),
    ("Unsubscribe=One-Click", "application/x-www-form-urlencoded", 400),
    ("a=" + "&a=".join(["1"] * 40) + "&List-Unsubscribe=One-Click",
     "application/x-www-form-urlencoded", 400),  # more fields than a form ever needs
    ("List-Unsubscribe=One-Click\xff", "application/x-www-form-urlencoded", 400),
    ("--B\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nOne-Click\r\n--B--\r\n",
     "multipart/form-data; boundary=B", 400),
    ("not multipart at all", "multipart/form-data; boundary=B", 400),
    ("whatever", "multipart/form-data", 400),  # no boundary
    ("List-Unsubscribe=One-Click", "application/json", 415),
    ("List-Unsubscribe=One-Click", "text/plain", 415),
])
async def test_post_without_the_one_click_field(server: Server,
                                                client: aiohttp.ClientSession, body: str,
                                                content_type: str, status: int) -> None:
    data = body.encode("latin-1")
    headers = {"Content-Type": content_type}
    async with client.post(server.url(server.token()), data=data, headers=headers) as resp:
        assert resp.status == status
    assert server.store.count() == 0


async def test_the_body_is_judged_before_the_token(server: Server,
                                                   client: aiohttp.ClientSession) -> None:
    # A bad body gets the same answer with a good or a bad token: nothing about the token.
    answers = set()
    for token in (server.token(), "forged"):
        async with client.post(server.url(token), data="x=1", headers=FORM) as resp:
            answers.add((resp.status, await resp.text()))
    assert len(answers) == 1


async def test_declared_oversized_body_is_refused_unread(server: Server,
                                                         client: aiohttp.ClientSession) -> None:
    # Ten megabytes announced, none sent: the 413 comes back anyway, so nothing was read.
    status, head = await raw(server.port, post_head(server.token(),
                                                    "Content-Length: 10000000\r\n\r\n"),
                             read_all=False, timeout=2.0)
    assert status == 413
    assert b"connection: close" in head.lower()
    await assert_alive(server, client)
    assert server.store.count() == 0


async def test_streamed_oversized_body_is_refused(server: Server,
                                                  client: aiohttp.ClientSession) -> None:
    chunk = b"3e8\r\n" + b"a" * 1000 + b"\r\n"
    request = post_head(server.token(), "Transfer-Encoding: chunked\r\n\r\n") + chunk * 5
    status, _ = await raw(server.port, request, read_all=False, timeout=2.0)
    assert status == 413
    await assert_alive(server, client)
    assert server.store.count() == 0


async def test_body_at_the_limit_is_read(server: Server) -> None:
    body = ONE_CLICK + "&pad=" + "x" * (4096 - len(ONE_CLICK) - 5)
    assert len(body) == 4096
    request = post_head(server.token(), "Content-Length: 4096\r\nConnection: close\r\n\r\n")
    status, _ = await raw(server.port, request + body.encode())
    assert status == 200


async def test_huge_url_gets_414(server: Server, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{server.base}/u/{'A' * (MAX_URL + 10)}") as resp:
        assert resp.status == 414
    async with client.post(f"{server.base}/u/{'A' * 4000}", data=ONE_CLICK,
                           headers=FORM) as resp:
        assert resp.status == 414
    await assert_alive(server, client)


async def test_gigantic_request_line_gets_a_4xx(server: Server,
                                                client: aiohttp.ClientSession) -> None:
    status, _ = await raw(server.port, b"GET /u/" + b"A" * 100_000 + b" HTTP/1.1\r\n"
                          b"Host: relay.test\r\n\r\n")
    assert status is None or 400 <= status < 500
    await assert_alive(server, client)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "PATCH"])
async def test_other_methods_get_405(server: Server, client: aiohttp.ClientSession,
                                     method: str) -> None:
    async with client.request(method, server.url(server.token()), data=ONE_CLICK,
                              headers=FORM) as resp:
        assert resp.status == 405
    assert server.store.count() == 0


async def test_unknown_path_gets_404(server: Server, client: aiohttp.ClientSession) -> None:
    for path in ("/", "/u/", "/u/a/b", "/metrics"):
        async with client.get(server.base + path) as resp:
            assert resp.status == 404, path


@pytest.mark.parametrize("garbage", [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",
    b"HELO relay.test\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header Line\r\n\r\n",
    b"POST /u/x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /u/x HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"POST /u/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nabcdef",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20_000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(500)) + b"\r\n",
    b"\x00" * 64 + b"\r\n\r\n",
    b"GET\r\n\r\n",
])
async def test_malformed_http_gets_a_4xx_and_the_server_survives(
        server: Server, client: aiohttp.ClientSession, garbage: bytes) -> None:
    status, got = await raw(server.port, garbage)
    assert status is not None, got[:200]
    assert 400 <= status < 500, got[:200]
    await assert_alive(server, client)


async def test_broken_chunked_body_gets_a_4xx(server: Server,
                                              client: aiohttp.ClientSession) -> None:
    request = post_head(server.token(), "Transfer-Encoding: chunked\r\n\r\n") + b"zz\r\nab\r\n"
    status, _ = await raw(server.port, request)
    assert status is not None
    assert 400 <= status < 500
    await assert_alive(server, client)
    assert server.store.count() == 0


async def test_a_failing_store_gets_503_and_no_suppression_is_claimed(
        client: aiohttp.ClientSession) -> None:
    class Failing(MemorySuppressionStore):
        def add(self, entry: Suppression) -> bool:
            raise OSError("disk full")

    async for running in _serve(Failing(clock=lambda: NOW)):
        async with client.post(running.url(running.token()), data=ONE_CLICK,
                               headers=FORM) as resp:
            assert resp.status == 503
        assert running.seen == []
        await assert_alive(running, client)


# --- health and headers ---------------------------------------------------------------


async def test_healthz(server: Server, client: aiohttp.ClientSession) -> None:
    await assert_alive(server, client)


async def test_security_headers_on_every_answer(server: Server,
                                                client: aiohttp.ClientSession) -> None:
    token = server.token()
    requests = [("GET", "/healthz", None, 200), ("GET", f"/u/{token}", None, 200),
                ("POST", f"/u/{token}", ONE_CLICK, 200), ("GET", "/u/forged", None, 400),
                ("POST", f"/u/{token}", "x=1", 400), ("GET", "/nowhere", None, 404),
                ("PUT", f"/u/{token}", None, 405), ("GET", "/u/" + "A" * 3000, None, 414)]
    for method, path, data, status in requests:
        async with client.request(method, server.base + path, data=data,
                                  headers=FORM if data else None) as resp:
            assert resp.status == status, (method, path)
            for name, value in SECURITY_HEADERS.items():
                assert resp.headers.get(name) == value, (method, path, name)
            assert "Set-Cookie" not in resp.headers
            assert "Location" not in resp.headers  # RFC 8058 3.2: no redirects


async def test_stop_closes_the_listener() -> None:
    store = MemorySuppressionStore()
    app = make_app(tokens=Tokens(SECRET, lifetime=60), store=store)
    listener = HttpListener(app, "127.0.0.1", 0)
    _, port = await listener.start()
    await listener.stop()
    await listener.stop()  # twice is harmless
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_make_app_refuses_a_useless_body_limit() -> None:
    with pytest.raises(ValueError):
        make_app(tokens=Tokens(SECRET, lifetime=60), store=MemorySuppressionStore(),
                 max_body=10)


async def test_a_malformed_request_is_one_log_line(server: Server,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    # Garbage from the internet must not flood the log with tracebacks.
    with caplog.at_level("INFO"):
        await raw(server.port, b"GET / HTTP/9.9\r\n\r\n")
    records = [r for r in caplog.records if "bad HTTP request" in r.getMessage()]
    assert len(records) == 1
    assert records[0].getMessage().startswith("127.0.0.1: bad HTTP request: 400")
    assert records[0].exc_info is None
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


async def test_an_unsubscribe_is_logged_with_the_queue_id(
        server: Server, client: aiohttp.ClientSession,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="relay.web"):
        async with client.post(server.url(server.token()), data=ONE_CLICK,
                               headers=FORM) as resp:
            assert resp.status == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "relay.web"]
    assert lines == [("7F3A9C21D0: to=<alice@example.com>, scope=global, "
                     "status=unsubscribed (one-click, client=127.0.0.1)")]


async def test_expect_100_continue(server: Server, client: aiohttp.ClientSession) -> None:
    # Too large: the final 413 at once, no "100 Continue" inviting the body.
    status, head = await raw(server.port, post_head(
        server.token(), "Content-Length: 10000000\r\nExpect: 100-continue\r\n\r\n"),
        read_all=False, timeout=2.0)
    assert status == 413
    assert b"100 Continue" not in head
    # Within the limit: 100 Continue, then the body, then 200.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(post_head(server.token(), "Content-Length: 26\r\nExpect: 100-continue\r\n"
                                               "Connection: close\r\n\r\n"))
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 2.0)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(ONE_CLICK.encode())
        final = await asyncio.wait_for(reader.read(-1), 5.0)
    finally:
        writer.close()
    assert final.startswith(b"HTTP/1.1 200 ")
    assert server.store.check(RCPT) is not None
    await assert_alive(server, client)
