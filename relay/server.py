"""The edge: aiosmtpd listeners, per-command checks, and the durable commit before the 250.

Per command: MAIL and RCPT check the client may relay (mynetworks; invariant 6), the
address syntax (RFC 5321 4.1.2, RFC 6531) and the recipient limit. At the end of DATA the
message is checked (bare CR/LF: RFC 5322 2.3), given a Received header, and committed to
the queue; `250 2.0.0 Ok: queued as ID` is sent only after the commit returned
(invariant 1). Every reply carries an enhanced status code (RFC 2034, RFC 3463).
"""

from __future__ import annotations

import asyncio
import collections
import email.utils
import ipaddress
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiosmtpd.smtp import SMTP as AioSMTP
from aiosmtpd.smtp import Envelope, Session

from relay import replies
from relay.address import check_mailbox, parse_path
from relay.config import Config, IPNetwork
from relay.log import CLEANUP, QMGR, SMTPD
from relay.queue import NewMessage, QueueStore, new_queue_id

_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(.*?)\r\n(?![ \t])", re.IGNORECASE | re.MULTILINE
                         | re.DOTALL)


def client_ip(peer: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(peer[0])
    except (TypeError, ValueError, IndexError):
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        return ip.ipv4_mapped
    return ip


def in_networks(peer: Any, networks: tuple[IPNetwork, ...]) -> bool:
    ip = client_ip(peer)
    return ip is not None and any(ip in net for net in networks)


def client_name(session: Session) -> str:
    """Postfix's "name[ip]" form; without a reverse look-up the name is "unknown"."""
    ip = client_ip(session.peer)
    return f"unknown[{ip if ip is not None else 'unknown'}]"


def has_bare_newline(data: bytes) -> bool:
    """True if a CR or LF occurs other than as the pair CRLF (three C-speed counts)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


class RelaySMTP(AioSMTP):
    """aiosmtpd's protocol with enhanced status codes on every reply and a drain mode."""

    def __init__(self, handler: EdgeHandler, edge: Edge, **kw: Any):
        # aiosmtpd keeps command_size_limits in a class attribute that every EHLO grows;
        # give each session its own so one session cannot raise another's limit.
        self.command_size_limits = collections.defaultdict(lambda: AioSMTP.command_size_limit)
        super().__init__(handler, **kw)
        self._edge = edge
        self._in_ehlo = False
        self.in_data = False
        self.raw_path = ""
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._guard(method)

    def _guard(self, method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        async def guarded(arg: Any) -> None:
            if self._edge.draining:
                # Shutdown, step 2: new commands get 421 (RFC 5321 3.8).
                await self.push(str(replies.R421_SHUTDOWN))
                if self.transport is not None:
                    self.transport.close()
                return
            await method(arg)
        return guarded

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and not self._in_ehlo:
            status = replies.with_enhanced_code(status)
        await super().push(status)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.raw_path = arg or ""    # the handler checks the path as the client wrote it
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.raw_path = arg or ""
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self.in_data = True
        try:
            await super().smtp_DATA(arg)
        finally:
            self.in_data = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            self._edge.sessions.add(self)

    def connection_lost(self, error: Exception | None) -> None:
        self._edge.sessions.discard(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if len(self._edge.sessions) > self._edge.cfg.server.max_sessions:
            # Bound sessions (STYLE rule 5): push back with 421, never hang.
            await self.push(str(replies.R421_TOO_MANY_SESSIONS))
            if self.transport is not None:
                self.transport.close()
            return
        await super()._handle_client()


class EdgeHandler:
    """aiosmtpd hooks: the decisions of the edge."""

    def __init__(self, edge: Edge):
        self.edge = edge

    @property
    def cfg(self) -> Config:
        return self.edge.cfg

    def may_relay(self, session: Session) -> bool:
        # Invariant 6: never an open relay. AUTH arrives with the policy layer.
        return in_networks(session.peer, self.cfg.server.mynetworks)

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        last = responses.pop()  # "250 HELP"
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        if not self.may_relay(session):
            SMTPD.info("NOQUEUE: reject: MAIL from %s: 550 5.7.1 Relay access denied; from=<%s>",
                       client_name(session), _printable(address))
            return str(replies.R550_RELAY_DENIED)
        smtputf8 = "SMTPUTF8" in mail_options
        mailbox = parse_path(server.raw_path[len("FROM:"):])
        if mailbox is None:
            return str(replies.R501_BAD_SENDER)
        if mailbox:
            refusal = check_mailbox(mailbox, smtputf8=smtputf8, sender=True)
            if refusal is not None:
                return str(refusal)
        # aiosmtpd's RCPT needs a true mail_from: the null path is kept as "<>" until DATA.
        envelope.mail_from = mailbox or "<>"
        envelope.mail_options.extend(mail_options)
        return str(replies.R250_SENDER_OK)

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        if not self.may_relay(session):
            return str(replies.R550_RELAY_DENIED)
        if len(envelope.rcpt_tos) >= self.cfg.server.max_recipients:
            # RFC 5321 4.5.3.1.10: 452 for too many recipients; the client sends the rest later.
            return str(replies.R452_TOO_MANY_RCPTS)
        mailbox = parse_path(server.raw_path[len("TO:"):])
        if not mailbox:
            return str(replies.R501_BAD_RCPT)
        refusal = check_mailbox(mailbox, smtputf8=bool(envelope.smtp_utf8), sender=False)
        if refusal is not None:
            return str(refusal)
        envelope.rcpt_tos.append(mailbox)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.R250_RCPT_OK)

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        content: bytes = envelope.original_content or b""
        client = client_name(session)
        if has_bare_newline(content):
            # SMTP smuggling and signing both break on bare CR/LF: refuse the whole message.
            SMTPD.info("NOQUEUE: reject: END-OF-MESSAGE from %s: %s", client,
                       replies.R550_BARE_NEWLINE)
            return str(replies.R550_BARE_NEWLINE)
        queue_id = new_queue_id()
        now = time.time()
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        rcpts = list(dict.fromkeys(envelope.rcpt_tos))   # one delivery per recipient
        smtputf8 = bool(envelope.smtp_utf8)
        body = self.received_header(session, queue_id, rcpts, smtputf8, now) + content
        msg = NewMessage(
            queue_id=queue_id, sender=sender, recipients=rcpts, body=body, received_at=now,
            smtputf8=smtputf8, eightbit=not body.isascii(), client=client,
            stream=self.cfg.server.default_stream,
        )
        try:
            await self.edge.store.enqueue(msg)
        except Exception:  # noqa: BLE001 - no 250 without a commit
            SMTPD.exception("NOQUEUE: queue write failed for %s", client)
            return str(replies.R451_QUEUE_WRITE)
        SMTPD.info("%s: client=%s", queue_id, client)
        m = _MESSAGE_ID.search(content.split(b"\r\n\r\n", 1)[0] + b"\r\n")
        if m:
            CLEANUP.info("%s: message-id=%s", queue_id,
                         _printable(m.group(1).decode("utf-8", "replace")))
        QMGR.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id,
                  _printable(sender), len(body), len(rcpts))
        self.edge.on_queued()
        return replies.R250_QUEUED.format(queue_id=queue_id)

    def received_header(self, session: Session, queue_id: str, rcpts: list[str],
                        smtputf8: bool, now: float) -> bytes:
        """RFC 5321 4.4 trace header; the protocol name per RFC 3848 and RFC 6531 3.7.3."""
        ip = client_ip(session.peer)
        helo = _SAFE_HELO.sub("?", (session.host_name or "unknown")[:255])
        proto = ("UTF8SMTP" if smtputf8 else "ESMTP") if session.extended_smtp else "SMTP"
        if session.ssl:
            proto += "S"
        if session.authenticated:
            proto += "A"
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        date = email.utils.formatdate(now, localtime=True)
        header = (f"Received: from {helo} ([{ip}])\r\n\tby {self.cfg.server.hostname} (relay)"
                  f" with {proto} id {queue_id}{for_clause};\r\n\t{date}\r\n")
        return header.encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer 500 (permanent!) without this; a fault of ours is transient.
        SMTPD.exception("internal error in SMTP session: %s", type(error).__name__)
        return str(replies.R451_INTERNAL)


def _printable(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\r", "\\r") \
        .replace("\n", "\\n")


class Edge:
    """The SMTP listeners of [server].listen."""

    def __init__(self, cfg: Config, store: QueueStore, on_queued: Callable[[], None]):
        self.cfg = cfg
        self.store = store
        self.on_queued = on_queued
        self.handler = EdgeHandler(self)
        self.sessions: set[RelaySMTP] = set()
        self.draining = False
        self._servers: list[asyncio.base_events.Server] = []

    def _protocol(self) -> RelaySMTP:
        s = self.cfg.server
        return RelaySMTP(
            self.handler, self,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=s.hostname,
            ident="ESMTP relay",
            timeout=s.command_timeout,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; return the bound (host, port) pairs (port 0 resolved)."""
        loop = asyncio.get_running_loop()
        bound = []
        for host, port in self.cfg.server.listen:
            server = await loop.create_server(self._protocol, host, port)
            self._servers.append(server)
            sockname = server.sockets[0].getsockname()
            bound.append((sockname[0], sockname[1]))
        return bound

    async def stop(self, deadline: float = 30.0) -> None:
        """Stop listening, answer new commands with 421, let DATA in flight finish."""
        for server in self._servers:
            server.close()
        self.draining = True
        end = time.monotonic() + deadline
        while any(s.in_data for s in self.sessions) and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._servers:
            await server.wait_closed()
        self._servers = []
