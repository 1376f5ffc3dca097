"""The HTTP listener: one-click unsubscribe (RFC 8058), and a health check.

Routes:

- `POST /u/{token}` with the body `List-Unsubscribe=One-Click` (RFC 8058 3.2: sent by the
  mail receiver as multipart/form-data or application/x-www-form-urlencoded) suppresses the
  token's recipient in the token's scope and answers 200. The confirm button of the GET page
  sends the same field, so it lands here too.
- `GET /u/{token}` shows a page with that button and changes nothing: link scanners and
  prefetchers fetch every URL they see (the reason RFC 8058 exists, section 1).
- `GET /healthz` answers "ok".

Every bad request gets a 4xx and the process carries on (invariant 7 of DESIGN.md): an
unverifiable token (forged, expired, mangled: one answer for all), a body without the
one-click field, a body over `max_body` (413, refused without reading it), a URL over
`MAX_URL` (414), another method (405). No cookies, no redirects: RFC 8058 3.2 forbids
cookies and authorization on the POST, and a redirected POST becomes a GET in many clients.
"""

from __future__ import annotations

import asyncio
import email.policy
import html
import logging
import time
from collections.abc import Awaitable, Callable
from email import message_from_bytes
from urllib.parse import parse_qsl

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError

# aiohttp's own "100 Continue" writer; ours only puts the refusals in front of it.
from aiohttp.web_urldispatcher import _default_expect_handler

from relay.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from relay.metrics import Metrics
from relay.policy.unsubscribe import ONE_CLICK_KEY, ONE_CLICK_VALUE, TokenData, Tokens
from relay.suppression import Reason, Suppression, SuppressionStore

LOG = logging.getLogger("relay.web")

MAX_URL = 2048  # octets of path and query; a token URL is ~1.1 KiB at the very most
MAX_FORM_FIELDS = 32
KEEPALIVE_TIMEOUT = 15.0
LINGERING_TIME = 2.0  # after a 413, how long the unread rest of a body is read and dropped
SHUTDOWN_TIMEOUT = 5.0

# Sent with every answer the application makes, errors included.
SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # The pages load nothing and may be framed by nobody (a framed confirm button could be
    # clicked by a trick); their one form posts back to this origin.
    "Content-Security-Policy": ("default-src 'none'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
}

_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _page(status: int, title: str, body_html: str) -> web.Response:
    """A small HTML page; `title` is escaped here, `body_html` must already be."""
    text = ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta name=\"robots\" content=\"noindex, nofollow\">"
            f"<title>{html.escape(title)}</title></head>\n"
            f"<body><h1>{html.escape(title)}</h1>\n{body_html}\n</body></html>\n")
    return web.Response(status=status, text=text, content_type="text/html", charset="utf-8")


def _bad_link() -> web.Response:
    # One answer for every token that does not verify: it must not say whether the token
    # was forged, expired or mangled.
    return _page(400, "Invalid link",
                 "<p>This unsubscribe link is not valid or has expired.</p>")


def _bad_form() -> web.Response:
    return _page(400, "Bad request",
                 f"<p>The request must contain {ONE_CLICK_KEY}={ONE_CLICK_VALUE}.</p>")


def _too_large() -> web.Response:
    resp = web.Response(status=413, text="request body too large\n")
    resp.force_close()  # the rest of the body is not wanted; no keep-alive after it
    return resp


def _uri_too_long() -> web.Response:
    return web.Response(status=414, text="URI too long\n")


async def _read_bounded(request: web.Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it exceeds `limit` octets (STYLE rule 5)."""
    buf = bytearray()
    while True:
        chunk = await request.content.read(limit + 1 - len(buf))
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > limit:
            return None


def _form_has_one_click(content_type: str, raw_type: str, body: bytes) -> bool:
    """Whether the form body carries List-Unsubscribe=One-Click (RFC 8058 3.1, 3.2)."""
    if content_type == "multipart/form-data":
        # RFC 7578: parse with the stdlib MIME parser; the body is at most max_body octets.
        try:
            msg = message_from_bytes(
                b"Content-Type: " + raw_type.encode("latin-1") + b"\r\n\r\n" + body,
                policy=email.policy.HTTP)
            if not msg.is_multipart():
                return False
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                payload = part.get_payload(decode=True)
                if (name == ONE_CLICK_KEY and isinstance(payload, bytes)
                        and payload.strip() == ONE_CLICK_VALUE.encode()):
                    return True
        except Exception:  # noqa: BLE001 - the stdlib MIME parser has crashed on hostile input
            return False
        return False
    try:
        pairs = parse_qsl(body.decode("utf-8").strip(), keep_blank_values=True,
                          max_num_fields=MAX_FORM_FIELDS)
    except ValueError:  # not UTF-8 (UnicodeDecodeError is one), or too many fields
        return False
    return (ONE_CLICK_KEY, ONE_CLICK_VALUE) in pairs


def _suppress(store: SuppressionStore, data: TokenData, now: float) -> bool:
    """Suppress the token's recipient in its scope; True if that changed anything.

    Runs in a worker thread (the store's add is fsync'd). An unexpiring entry already there,
    whatever its reason, stays as it is: a repeated POST is harmless and keeps the first
    time and reason. A temporary entry is made permanent.
    """
    existing = store.check(data.recipient, (data.scope,), now=now)
    if existing is not None and existing.expires_at is None:
        return False
    store.add(Suppression(data.recipient, data.scope, Reason.UNSUBSCRIBE,
                          detail="one-click", created_at=now))
    return True


class _Handlers:
    """The route handlers, bound to their collaborators."""

    def __init__(self, tokens: Tokens, store: SuppressionStore,
                 on_unsubscribe: Callable[[TokenData], None] | None, max_body: int,
                 clock: Callable[[], float]) -> None:
        self.tokens = tokens
        self.store = store
        self.on_unsubscribe = on_unsubscribe
        self.max_body = max_body
        self.clock = clock

    async def confirm_page(self, request: web.Request) -> web.Response:
        """GET: the confirm button, nothing else (RFC 8058 1: scanners fetch GETs)."""
        data = self.tokens.verify(request.match_info["token"])
        if data is None:
            return _bad_link()
        # No action attribute: the form posts back to this very URL, whatever proxy path
        # the public URL has. Everything shown is escaped.
        return _page(200, "Unsubscribe", (
            f"<p>Stop sending mail to <strong>{html.escape(data.recipient)}</strong>"
            f" ({html.escape(data.scope)})?</p>\n"
            "<form method=\"post\" enctype=\"application/x-www-form-urlencoded\">"
            f"<input type=\"hidden\" name=\"{html.escape(ONE_CLICK_KEY)}\""
            f" value=\"{html.escape(ONE_CLICK_VALUE)}\">"
            "<button type=\"submit\">Unsubscribe</button></form>"))

    async def one_click(self, request: web.Request) -> web.Response:
        """POST: verify the form and the token, suppress, confirm (RFC 8058 3.2)."""
        length = request.content_length
        if length is not None and length > self.max_body:
            return _too_large()  # refused before a single octet of the body is read
        try:
            body = await _read_bounded(request, self.max_body)
        except HttpProcessingError:  # a broken chunked encoding, a short body
            resp = web.Response(status=400, text="malformed request body\n")
            resp.force_close()
            return resp
        if body is None:
            return _too_large()
        content_type = request.content_type if hdrs.CONTENT_TYPE in request.headers else ""
        if content_type not in (*_FORM_TYPES, ""):
            return _page(415, "Unsupported media type",
                         "<p>Send the form as application/x-www-form-urlencoded or "
                         "multipart/form-data.</p>")
        # The body is judged before the token, so an answer about the body tells nothing
        # about the token.
        if not _form_has_one_click(content_type,
                                   request.headers.get(hdrs.CONTENT_TYPE, ""), body):
            return _bad_form()
        data = self.tokens.verify(request.match_info["token"])
        if data is None:
            return _bad_link()
        now = self.clock()
        try:
            changed = await asyncio.to_thread(_suppress, self.store, data, now)
        except Exception:
            LOG.exception("%s: unsubscribe to=<%s> failed: suppression store error",
                          data.queue_id or "NOQUEUE", data.recipient)
            return _page(503, "Try again later",
                         "<p>The request could not be recorded; please try again.</p>")
        if changed:
            LOG.info("%s: to=<%s>, scope=%s, status=unsubscribed (one-click, client=%s)",
                     data.queue_id or "NOQUEUE", data.recipient, data.scope,
                     request.remote or "unknown")
            if self.on_unsubscribe is not None:
                try:
                    self.on_unsubscribe(data)
                except Exception:
                    # The suppression is on disk already; the recipient gets their answer.
                    LOG.exception("%s: on_unsubscribe callback failed",
                                  data.queue_id or "NOQUEUE")
        return _page(200, "Unsubscribed",
                     f"<p><strong>{html.escape(data.recipient)}</strong> will receive no "
                     "more of this mail.</p>")

    async def expect(self, request: web.Request) -> web.StreamResponse | None:
        """Expect: 100-continue (RFC 9110 10.1.1): a request refused anyway gets its final
        status at once, instead of "100 Continue" and then a body that nobody reads."""
        if len(request.raw_path) > MAX_URL:
            return _uri_too_long()
        length = request.content_length
        if length is not None and length > self.max_body:
            return _too_large()
        return await _default_expect_handler(request)

    async def healthz(self, request: web.Request) -> web.Response:
        """Liveness: the listener answers."""
        return web.Response(text="ok")


@web.middleware
async def _limit_url(request: web.Request,
                     handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                     ) -> web.StreamResponse:
    """414 for an over-long URL, before routing or reading anything (STYLE rule 5)."""
    if len(request.raw_path) > MAX_URL:
        return _uri_too_long()
    return await handler(request)


async def _security_headers(request: web.Request,
                            response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def make_app(*, tokens: Tokens | None, store: SuppressionStore,
             on_unsubscribe: Callable[[TokenData], None] | None = None,
             max_body: int = 4096,
             clock: Callable[[], float] = time.time,
             metrics: Metrics | None = None) -> web.Application:
    """The aiohttp application: one-click unsubscribe and /healthz.

    `on_unsubscribe` is called (on the event loop, after the suppression is durable) once
    per unsubscribe that changed the store; a repeated POST does not call it again.
    `clock` stamps the suppressions (STYLE rule 8).
    """
    if max_body < 64:
        raise ValueError("max_body must leave room for the one-click form")
    handlers = _Handlers(tokens, store, on_unsubscribe, max_body, clock)
    # client_max_size backs up the explicit limits for any body read through aiohttp itself.
    app = web.Application(middlewares=[_limit_url], client_max_size=max_body)
    if tokens is not None:   # one-click unsubscribe needs the token secret
        app.router.add_get("/u/{token}", handlers.confirm_page)
        app.router.add_post("/u/{token}", handlers.one_click, expect_handler=handlers.expect)
    app.router.add_get("/healthz", handlers.healthz)
    if metrics is not None:
        async def scrape(request: web.Request) -> web.Response:
            return web.Response(body=metrics.render(),
                                headers={"Content-Type": METRICS_CONTENT_TYPE})
        app.router.add_get("/metrics", scrape)
    app.on_response_prepare.append(_security_headers)
    return app


class _ProtocolLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """aiohttp's server log, with a malformed request as one line instead of a traceback.

    Anybody can send garbage to a public port; a traceback per request would flood the log
    (STYLE rule 5). A real error in a handler keeps its traceback.
    """

    def exception(self, msg: object, *args: object, exc_info: object = True,
                  **kwargs: object) -> None:
        """Log `msg`; an HttpProcessingError (a bad request) at INFO, without traceback."""
        if isinstance(exc_info, HttpProcessingError):
            # aiohttp calls this as ("Error handling request from %s", peer, exc_info=exc).
            peer = args[0] if args else "unknown"
            reason = (str(exc_info.message).splitlines() or [""])[0][:120]
            self.logger.info("%s: bad HTTP request: %s %s", peer, exc_info.code, reason)
            return
        self.logger.exception(msg, *args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]


class HttpListener:
    """Serves an application on host:port (port 0: any free port) until stop()."""

    def __init__(self, app: web.Application, host: str, port: int) -> None:
        self.app = app
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> tuple[str, int]:
        """Listen; the address actually bound, (host, port)."""
        runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                               shutdown_timeout=SHUTDOWN_TIMEOUT,
                               keepalive_timeout=KEEPALIVE_TIMEOUT,
                               lingering_time=LINGERING_TIME,
                               logger=_ProtocolLog(LOG, {}))
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        return address[0], address[1]

    async def stop(self) -> None:
        """Stop listening, let requests in flight finish (bounded), close connections."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
