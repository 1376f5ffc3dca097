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
import email
import email.policy
import email.utils
import functools
import ipaddress
import re
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import MISSING, AuthResult, Envelope, LoginPassword, Session
from aiosmtpd.smtp import SMTP as AioSMTP

from relay import replies
from relay.address import canonical, check_mailbox, parse_path
from relay.config import Config, IPNetwork
from relay.events import EventKind, record
from relay.log import CLEANUP, QMGR, SMTPD
from relay.metrics import Metrics
from relay.outbound.dkim import DkimMessageError, Signer
from relay.outbound.dkim import check as dkim_check
from relay.policy.engine import Client, Policy, Transaction
from relay.policy.headers import apply_header_rules
from relay.policy.unsubscribe import Tokens, token_from_subject
from relay.queue import NewMessage, QueueStore, new_queue_id
from relay.queue.scheduler import suppression_scopes
from relay.replies import Reply
from relay.suppression import Reason, Suppression, SuppressionStore
from relay.suppression.ingest import Ingestor

_SAFE_HELO = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")


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


_END_OF_DATA = b"\r\n.\r\n"
_MAX_LINE = 998          # RFC 5321 4.5.3.1.6 / RFC 5322 2.1.1: 1000 octets with the CRLF


async def read_data(reader: asyncio.StreamReader, size_limit: int) -> tuple[bytes, Reply | None]:
    """Read mail data up to the end-of-data line and undo dot-stuffing (RFC 5321 4.5.2).

    Only <CRLF>.<CRLF> ends the data (RFC 5321 4.1.1.4); the CRLF of the DATA command
    counts as the first CRLF. Bytes after it (pipelined commands) go back into the stream.
    Data over `size_limit`, or with a line over 998 octets, is read to its end and refused
    once (RFC 1870 6.4, case 05): never one reply per line, and never held in memory whole.
    """
    acc = bytearray(b"\r\n")           # the DATA command's own CRLF
    searched = 0
    too_big = False
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            raise ConnectionResetError("connection closed during DATA")
        acc += chunk
        end = acc.find(_END_OF_DATA, searched)
        if end >= 0:
            break
        if size_limit and len(acc) > size_limit + 65536:
            too_big = True               # keep only what the end-of-data search needs
            del acc[:-4]
        searched = max(len(acc) - 4, 0)
    rest = acc[end + 5:]
    if rest:
        reader._buffer[0:0] = rest       # aiosmtpd reads the next commands from here
    if too_big or (size_limit and end > size_limit):
        return b"", replies.R552_TOO_BIG
    data = bytes(memoryview(acc)[2:end + 2])   # every line with its CRLF, not the final "."
    # RFC 5321 4.5.2: a line that starts with "." had one added by the client.
    if data.startswith(b"."):
        data = data[1:]
    if b"\r\n." in data:
        data = data.replace(b"\r\n.", b"\r\n")
    # RFC 5321 4.5.3.1.6: the limit does not count the dot added for transparency.
    if any(len(line) > _MAX_LINE for line in data.split(b"\r\n")):
        return b"", replies.R554_LINE_TOO_LONG
    return data, None


def has_bare_newline(data: bytes) -> bool:
    """True if a CR or LF occurs other than as the pair CRLF (three C-speed counts)."""
    pairs = data.count(b"\r\n")
    return data.count(b"\r") != pairs or data.count(b"\n") != pairs


def content_refusal(data: bytes) -> Reply | None:
    """RFC 5322 2.3 / RFC 5321 2.3.8: CR and LF only as CRLF (smuggling, signing); no NUL."""
    if has_bare_newline(data):
        return replies.R550_BARE_NEWLINE
    if b"\0" in data:
        return replies.R550_NUL
    return None


# The common path forms, parsed without the stdlib's RFC 5322 header parser (about 40 us
# a call, the largest cost of the edge): "<>", and "<" dot-atom "@" domain ">" with an
# ASCII dot-atom local part (RFC 5321 4.1.2 Dot-string), LDH labels (RFC 1035 2.3.1) or a
# plain address literal (RFC 5321 4.1.3). A local part that starts with "=?" is left to
# the stdlib parser, which may read it as an RFC 2047 encoded word. Anything else (quoted
# local parts, source routes, non-ASCII, comments, missing brackets) takes the slow path,
# so the result is always exactly what aiosmtpd's parser returns; a test holds the two
# paths to the same answers over a table of addresses.
_FAST_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+"
_FAST_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_FAST_PATH = re.compile(
    rf"<(?:>|(?!=\?)({_FAST_ATEXT}(?:\.{_FAST_ATEXT})*)@"
    rf"({_FAST_LABEL}(?:\.{_FAST_LABEL})*|\[(?:[0-9.]+|IPv6:[0-9A-Fa-f:.]+)\])>)")


def _fast_getaddr(arg: str, local_part_limit: int) -> tuple[str, str] | None:
    """aiosmtpd's `_getaddr` result for the common path forms, or None for "ask it"."""
    match = _FAST_PATH.match(arg) if arg else None
    if match is None:
        return None
    rest = arg[match.end():]
    local = match.group(1)
    if local is None:
        return "<>", rest          # the stdlib returns what follows "<>" untouched
    if local_part_limit and len(local) > local_part_limit:
        return None
    # After "addr>", the stdlib skips CFWS: white space (str.lstrip) and comments.
    if rest[:1] in (" ", "\t"):
        rest = rest.lstrip()
    if rest[:1] == "(":
        return None
    return f"{local}@{match.group(2)}", rest


class RelaySMTP(AioSMTP):
    """aiosmtpd's protocol with enhanced status codes on every reply, a policy snapshot per
    session, AUTH lockout, and a drain mode."""

    def __init__(self, handler: EdgeHandler, edge: Edge, *, implicit_tls: bool = False,
                 **kw: Any):
        # aiosmtpd keeps command_size_limits in a class attribute that every EHLO grows;
        # give each session its own so one session cannot raise another's limit.
        self.command_size_limits = collections.defaultdict(lambda: AioSMTP.command_size_limit)
        super().__init__(handler, **kw)
        self._edge = edge
        self.policy: Policy = edge.policy          # this session's rules, even across a reload
        self.implicit_tls = implicit_tls
        self.client: Client = Client(ip="", trusted=False)
        self._in_ehlo = False
        self.in_data = False
        self.raw_path = ""
        self.reservation: list[tuple[str, str]] = []
        self.reject_logged = False    # set by a handler that logged its own refusal
        self.last_command = "CONNECT"
        self._reply_may_wait = False   # inside a command whose reply may join the next one's
        self._held: list[bytes] = []  # replies written with the next one (RFC 2920)
        for name, method in list(self._smtp_methods.items()):
            self._smtp_methods[name] = self._guard(method)

    def _guard(self, method: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
        @functools.wraps(method)   # keeps __smtp_syntax__ for HELP
        async def guarded(arg: Any) -> None:
            self.last_command = method.__name__.removeprefix("smtp_")
            if self._edge.draining:
                # Shutdown, step 2: new commands get 421 (RFC 5321 3.8).
                await self.push(str(replies.R421_SHUTDOWN))
                if self.transport is not None:
                    self.transport.close()
                return
            self._reply_may_wait = method.__name__ in _COALESCED_COMMANDS
            try:
                await method(arg)
            finally:
                self._reply_may_wait = False

        # HELP lists what carries aiosmtpd's syntax marks; our overrides lack them, so take
        # them from aiosmtpd's own method of the same name.
        base = getattr(AioSMTP, method.__name__, None)
        for attr in ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__"):
            if base is not None and hasattr(base, attr):
                setattr(guarded, attr, getattr(base, attr))
        return guarded

    @property
    def tls_active(self) -> bool:
        return self.implicit_tls or self._tls_protocol is not None

    async def push(self, status: Any) -> None:
        # The EHLO keyword lines carry no enhanced code (RFC 2034 3); its refusals do.
        if isinstance(status, str) and not (self._in_ehlo and status.startswith("250")):
            status = replies.with_enhanced_code(status)
            if status[:1] in ("4", "5") and not self.reject_logged and self.session:
                # Refusals made inside aiosmtpd (syntax, size, sequence) are logged too.
                SMTPD.info("NOQUEUE: reject: %s from %s: %s", self.last_command,
                           client_name(self.session), _printable(status))
        self.reject_logged = False
        # As aiosmtpd's push(), but a reply may wait to share one write (one send) with the
        # replies after it (RFC 2920 3.1 lets a server buffer replies of a group):
        # - only a reply to MAIL, RCPT, RSET, NOOP or the end of DATA (never 354, STARTTLS's
        #   220, QUIT's 221, a 421, an AUTH challenge, or a reply made outside a command),
        #   and only while the client's next command line is already read in whole, so the
        #   server never waits for the client while holding a reply;
        # - or an EHLO line that another line of the same reply follows at once.
        # Any other reply is written together with those held before it, in order.
        if isinstance(status, str):
            data = bytes(status, "utf-8" if self.enable_SMTPUTF8 else "ascii") + b"\r\n"
        else:
            data = status + b"\r\n"
        if ((self._reply_may_wait and not data.startswith(b"354")
                and b"\r\n" in self._reader._buffer
                and self.transport is not None and not self.transport.is_closing())
                or (self._in_ehlo and data[3:4] == b"-")):
            self._held.append(data)
            return
        if self._held:
            self._held.append(data)
            data = b"".join(self._held)
            self._held = []
        self._writer.write(data)
        await self._writer.drain()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        fast = _fast_getaddr(arg, self.local_part_limit)
        if fast is not None:
            return fast
        return self._slow_getaddr(arg)

    def _slow_getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd's stdlib parser raises IndexError on a lone "<" ("MAIL FROM:<", "VRFY <")
        # and AttributeError on an unclosed address literal ("<a@[192.0.2.1>": a defect
        # lands among its tokens) instead of HeaderParseError: a syntax error (553 5.1.3),
        # not an internal one (451, retried for ever).
        try:
            return super()._getaddr(arg)
        except (IndexError, ValueError, AttributeError):
            return None, None

    async def smtp_EHLO(self, hostname: str) -> None:
        self._in_ehlo = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._in_ehlo = False

    # Not "auth_...": aiosmtpd takes every auth_* attribute for a SASL mechanism.
    def offers_auth(self) -> bool:
        """RFC 4954 4: AUTH only with accounts, and only over TLS unless the admin allows
        plaintext AUTH, which is honoured for loopback clients only."""
        if not self.policy.accounts:
            return False
        if self.tls_active:
            return True
        ip = client_ip(self.session.peer) if self.session else None
        return (not self.policy.cfg.server.auth_require_tls and ip is not None
                and ip.is_loopback)

    async def smtp_AUTH(self, arg: str) -> None:
        if not self.policy.accounts:
            await self.push(str(replies.R502_AUTH_DISABLED))
            return
        if self.policy.lockout.locked(self.client.ip):
            SMTPD.warning("%s: AUTH refused: locked out after repeated failures",
                          client_name(self.session))
            await self.push(str(replies.R454_AUTH_LOCKED))
            return
        await super().smtp_AUTH(arg)
        if self.session is not None and self.session.authenticated and self.client.app is None:
            self.client.app = self.policy.accounts.apps.get(str(self.session.auth_data))

    async def smtp_MAIL(self, arg: str | None) -> None:
        self.raw_path = arg or ""    # the handler checks the path as the client wrote it
        if arg and self.offers_auth():
            # RFC 4954 5: AUTH=<mailbox> (xtext) or AUTH=<>; checked, then not relayed.
            words = arg.split(" ")
            kept = []
            for word in words:
                if word.upper().startswith("AUTH="):
                    if not _XTEXT.fullmatch(word[5:]):
                        await self.push(str(replies.R501_BAD_AUTH_PARAM))
                        return
                    continue
                kept.append(word)
            arg = " ".join(kept)
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self.raw_path = arg or ""
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        server_cfg = self.policy.cfg.server
        need = self._data_estimate(server_cfg.max_message_size)
        if self.envelope is not None and self.envelope.rcpt_tos and not arg and (
                self._edge.data_bytes + need > server_cfg.max_data_memory):
            # Bound memory (STYLE rule 5): every DATA in flight holds its message; a client
            # that declared SIZE reserves that, others a share (see _data_estimate).
            await self.push(str(replies.R452_BUSY))
            return
        self.in_data = True
        self._edge.data_bytes += need
        # RFC 5321 4.5.3.2.6: the whole DATA transfer gets its own, longer, time limit.
        self._reset_timeout(server_cfg.data_timeout)
        try:
            await self._data_command(arg)
        finally:
            self.in_data = False
            self._edge.data_bytes -= need

    async def _data_command(self, arg: str) -> None:
        """DATA as aiosmtpd does it, but reading the data in large pieces instead of line by
        line (the line loop was the edge's largest cost): the same replies, the same end of
        data, pipelined commands after it left in the stream."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            data, refusal = await read_data(self._reader, self.data_size_limit or 0)
        except asyncio.CancelledError:
            self._writer.close()   # the client went away during DATA (case 17)
            raise
        if refusal is not None:
            self._set_post_data_state()
            await self.push(str(refusal))
            return
        self.envelope.original_content = data
        self.envelope.content = data
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()
        await self.push("250 OK" if status is MISSING else status)

    def _data_estimate(self, limit: int) -> int:
        """What a DATA in flight is counted as: the declared SIZE (RFC 1870), else 1 MiB."""
        for option in (self.envelope.mail_options if self.envelope else []):
            if option.startswith("SIZE=") and option[5:].isdigit():
                return min(int(option[5:]), limit)
        return min(limit, 1024 * 1024)

    def _timeout_cb(self) -> None:
        # RFC 5321 4.5.3.2: say why before closing (421 4.4.2), and log it.
        if self.transport is not None and not self.transport.is_closing():
            held, self._held = b"".join(self._held), []
            self.transport.write(held + str(replies.R421_TIMEOUT).encode() + b"\r\n")
            SMTPD.info("timeout after %s from %s", "DATA" if self.in_data else "command",
                       client_name(self.session) if self.session else "unknown")
        super()._timeout_cb()

    def release_reservation(self) -> None:
        if self.reservation:
            self.policy.release(self.reservation)
            self.reservation = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            self._edge.sessions.add(self)
            if self._edge.metrics is not None:
                self._edge.metrics.sessions_total.inc()
        # Called again after STARTTLS with a new session: RFC 3207 4.2, forget everything.
        super().connection_made(transport)
        assert self.session is not None
        self.client = Client(ip=str(client_ip(self.session.peer)), trusted=in_networks(
            self.session.peer, self.policy.cfg.server.mynetworks))
        if self.implicit_tls:
            self.session.ssl = transport.get_extra_info("cipher")
        # aiosmtpd offers AUTH when this is False; offers_auth() decides per session.
        self._auth_require_tls = not self.offers_auth()

    def connection_lost(self, error: Exception | None) -> None:
        self._edge.sessions.discard(self)
        self.release_reservation()
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if len(self._edge.sessions) > self.policy.cfg.server.max_sessions:
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

    async def handle_RSET(self, server: RelaySMTP, session: Session,
                          envelope: Envelope) -> str:
        server.release_reservation()
        return str(replies.R250_OK)

    async def handle_EHLO(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        server.release_reservation()   # EHLO resets the transaction (RFC 5321 4.1.4)
        session.host_name = hostname
        server._auth_require_tls = not server.offers_auth()
        last = responses.pop()  # "250 HELP"
        responses = [r for r in responses
                     if not (r.startswith("250-AUTH") and not server.offers_auth())]
        responses += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", last]
        return responses

    def authenticate(self, server: RelaySMTP, session: Session, envelope: Envelope,
                     mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd authenticator: the [[app]] accounts, with the failure lockout."""
        policy: Policy = server.policy
        ip = server.client.ip
        app = None
        if isinstance(auth_data, LoginPassword):
            app = policy.accounts.check(auth_data.login, auth_data.password)
        if app is None:
            locked_now = policy.lockout.failure(ip)
            SMTPD.warning("%s: %s authentication failed%s", client_name(session), mechanism,
                          "; locking out this address" if locked_now else "")
            return AuthResult(success=False, handled=False)
        policy.lockout.success(ip)
        SMTPD.info("%s: sasl_method=%s, sasl_username=%s", client_name(session), mechanism,
                   app.name)
        return AuthResult(success=True, auth_data=app.name)

    async def handle_MAIL(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        policy = server.policy
        smtputf8 = "SMTPUTF8" in mail_options
        mailbox = parse_path(server.raw_path[len("FROM:"):])
        tx = Transaction(server.client, sender=mailbox or "")
        refusal = policy.first(policy.mail_checks[:1], tx)   # access first: say nothing more
        if refusal is not None and (policy.unsubscribe_address or policy.bounce_domain):
            # Anyone may mail our unsubscribe and bounce addresses: decide at RCPT.
            refusal = None
        if refusal is None:
            if mailbox is None:
                return str(replies.R501_BAD_SENDER)
            if mailbox:
                refusal = check_mailbox(mailbox, smtputf8=smtputf8, sender=True)
        if refusal is None:
            refusal = policy.first(policy.mail_checks[1:], tx)
        if refusal is not None:
            server.reject_logged = True
            SMTPD.info("NOQUEUE: reject: MAIL from %s: %s; from=<%s>", client_name(session),
                       refusal, _printable(mailbox or ""))
            return str(refusal)
        # aiosmtpd's RCPT needs a true mail_from: the null path is kept as "<>" until DATA.
        server.release_reservation()
        server.reservation = policy.reserve(tx)
        envelope.mail_from = mailbox or "<>"
        envelope.mail_options.extend(mail_options)
        return str(replies.R250_SENDER_OK)

    async def handle_RCPT(self, server: RelaySMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        policy = server.policy
        tx = Transaction(server.client, sender=envelope.mail_from)
        mailbox = parse_path(server.raw_path[len("TO:"):])
        if mailbox and (policy.is_unsubscribe_address(mailbox)
                        or policy.is_bounce_address(mailbox)):
            # Mail to our own unsubscribe or bounce addresses: taken in by us, never relayed.
            local = getattr(envelope, "local_rcpts", [])
            envelope.local_rcpts = [*local, mailbox]
            envelope.rcpt_tos.append(mailbox)
            return str(replies.R250_RCPT_OK)
        refusal = policy.first(policy.rcpt_checks, tx)
        if refusal is None and len(envelope.rcpt_tos) >= policy.cfg.server.max_recipients:
            # RFC 5321 4.5.3.1.10: 452 for too many recipients; the client sends the rest later.
            refusal = replies.R452_TOO_MANY_RCPTS
        if refusal is None:
            if not mailbox:
                refusal = replies.R501_BAD_RCPT
            else:
                refusal = check_mailbox(mailbox, smtputf8=bool(envelope.smtp_utf8), sender=False)
        if refusal is None:
            refusal = self.suppressed(policy, envelope.mail_from, mailbox)
        if refusal is None:
            refusal = await policy.take_recipient(tx)
        if refusal is not None:
            server.reject_logged = True
            SMTPD.info("NOQUEUE: reject: RCPT from %s: %s; to=<%s>", client_name(session),
                       refusal, _printable(mailbox or ""))
            return str(refusal)
        envelope.rcpt_tos.append(mailbox)
        envelope.rcpt_options.extend(rcpt_options)
        return str(replies.R250_RCPT_OK)

    def suppressed(self, policy: Policy, sender: str, mailbox: str) -> str | None:
        """The refusal for a suppressed recipient, unless the admin chose accept-and-drop
        (then the scheduler ends it as "suppressed", with an event)."""
        if self.edge.suppressions is None or policy.cfg.suppression.at_rcpt == "drop":
            return None
        entry = self.edge.suppressions.check(
            mailbox, suppression_scopes("" if sender == "<>" else sender))
        if entry is None:
            return None
        return replies.R550_SUPPRESSED.format(reason=entry.reason)

    async def take_local(self, server: RelaySMTP, session: Session, envelope: Envelope,
                         local: list[str], content: bytes) -> None:
        policy = server.policy
        for rcpt in local:
            if policy.is_unsubscribe_address(rcpt):
                await self.take_unsubscribe(session, envelope, _subject(content))
            elif self.edge.ingestor is not None:
                await self.edge.ingestor.ingest(
                    content, envelope_rcpt=rcpt, client_ip=server.client.ip,
                    helo=session.host_name or "",
                    mail_from="" if envelope.mail_from == "<>" else envelope.mail_from)

    async def take_unsubscribe(self, session: Session, envelope: Envelope,
                               subject: str | None) -> None:
        """An unsubscribe request by mail: the token is in the Subject (RFC 6068 mailto)."""
        tokens, store = self.edge.tokens, self.edge.suppressions
        token = token_from_subject(subject or "")
        data = tokens.verify(token) if (tokens and token) else None
        if data is None or store is None:
            SMTPD.info("%s: unsubscribe mail without a valid token; ignored",
                       client_name(session))
            return
        entry = Suppression(canonical(data.recipient), data.scope, Reason.UNSUBSCRIBE,
                            "mailto", time.time())
        await asyncio.to_thread(store.add, entry)
        await record(self.edge.store, EventKind.UNSUBSCRIBE, data.recipient,
                     queue_id=data.queue_id, category="unsubscribe", reply="mailto")
        SMTPD.info("%s: to=<%s>, scope=%s, status=unsubscribed (mailto, client=%s)",
                   data.queue_id, _printable(data.recipient), data.scope, client_name(session))

    async def handle_DATA(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        try:
            return await self._data(server, session, envelope)
        finally:
            server.release_reservation()

    async def _data(self, server: RelaySMTP, session: Session, envelope: Envelope) -> str:
        policy = server.policy
        content: bytes = envelope.original_content or b""
        client = client_name(session)
        bad = content_refusal(content)
        if bad is not None:
            # SMTP smuggling and signing both break on bare CR/LF: refuse the whole message.
            server.reject_logged = True
            SMTPD.info("NOQUEUE: reject: END-OF-MESSAGE from %s: %s", client, bad)
            return str(bad)
        local = getattr(envelope, "local_rcpts", [])
        if local:
            # Mail for the relay itself (reports, unsubscribes) is taken in here, not relayed.
            await self.take_local(server, session, envelope, local, content)
            if len(local) == len(envelope.rcpt_tos):
                return str(replies.R250_LOCAL_TAKEN)
        now = time.time()
        app = server.client.app
        default_stream = app.stream if app else policy.cfg.server.default_stream
        sender_rules = app is not None and bool(app.from_domains or app.require_dkim)
        headers = apply_header_rules(
            content, policy.header_rules, app=app.name if app else None,
            hostname=policy.cfg.server.hostname, now=now, stream=default_stream,
            parse_from=sender_rules)
        tx = Transaction(server.client, sender=envelope.mail_from,
                         from_addresses=headers.from_addresses, control=headers.control)
        if headers.message is not None and policy.stream_for(tx) != default_stream:
            # X-Relay-Stream overrode the stream: Feedback-ID must name the one in force.
            headers = apply_header_rules(
                content, policy.header_rules, app=app.name if app else None,
                hostname=policy.cfg.server.hostname, now=now, stream=policy.stream_for(tx),
                parse_from=sender_rules)
        refusal: Reply | str | None = None
        if headers.message is None:
            refusal = _HEADER_REFUSALS.get(headers.refusal or "", replies.R550_BAD_HEADER)
        else:
            refusal = policy.first(policy.data_checks, tx)
        if refusal is None and self.edge.signer is not None:
            try:   # a message dkimpy cannot sign is refused now, never queued unsigned
                dkim_check(headers.message)
            except DkimMessageError as exc:
                refusal = replies.R550_CANNOT_SIGN.format(why=exc.why)
        if refusal is not None:
            server.reject_logged = True
            SMTPD.info("NOQUEUE: reject: END-OF-MESSAGE from %s: %s", client, refusal)
            return str(refusal)
        assert headers.message is not None
        queue_id = new_queue_id()
        sender = "" if envelope.mail_from == "<>" else envelope.mail_from
        rcpts = [r for r in dict.fromkeys(envelope.rcpt_tos) if r not in local]
        smtputf8 = bool(envelope.smtp_utf8)
        body = self.received_header(server, session, queue_id, rcpts, smtputf8, now) \
            + headers.message
        meta = {k: v for k, v in (("campaign", headers.control.get("campaign")),
                                  ("message_id", headers.message_id)) if v}
        msg = NewMessage(
            queue_id=queue_id, sender=sender, recipients=rcpts, body=body, received_at=now,
            smtputf8=smtputf8, eightbit=not body.isascii(), client=client,
            app=app.name if app else None, stream=policy.stream_for(tx), meta=meta,
        )
        try:
            await self.edge.store.enqueue(msg)
        except Exception:  # noqa: BLE001 - no 250 without a commit
            SMTPD.exception("NOQUEUE: queue write failed for %s", client)
            return str(replies.R451_QUEUE_WRITE)
        await policy.take_message(tx)
        if self.edge.metrics is not None:
            self.edge.metrics.accepted.inc()
        auth = f", sasl_username={app.name}" if app else ""
        SMTPD.info("%s: client=%s%s", queue_id, client, auth)
        CLEANUP.info("%s: message-id=<%s>", queue_id, _printable(headers.message_id))
        QMGR.info("%s: from=<%s>, size=%d, nrcpt=%d (queue active)", queue_id,
                  _printable(sender), len(body), len(rcpts))
        self.edge.on_queued()
        return replies.R250_QUEUED.format(queue_id=queue_id)

    def received_header(self, server: RelaySMTP, session: Session, queue_id: str,
                        rcpts: list[str], smtputf8: bool, now: float) -> bytes:
        """RFC 5321 4.4 trace header; the protocol name per RFC 3848 and RFC 6531 3.7.3."""
        ip = client_ip(session.peer)
        helo = _SAFE_HELO.sub("?", (session.host_name or "unknown")[:255])
        proto = ("UTF8SMTP" if smtputf8 else "ESMTP") if session.extended_smtp else "SMTP"
        if server.tls_active:
            proto += "S"
        if session.authenticated:
            proto += "A"
        for_clause = f"\r\n\tfor <{rcpts[0]}>" if len(rcpts) == 1 else ""
        date = email.utils.formatdate(now, localtime=True)
        header = (f"Received: from {helo} ([{ip}])\r\n\tby {server.policy.cfg.server.hostname}"
                  f" (relay) with {proto} id {queue_id}{for_clause};\r\n\t{date}\r\n")
        return header.encode("utf-8", "surrogateescape")

    async def handle_exception(self, error: Exception) -> str:
        # aiosmtpd would answer 500 (permanent!) without this; a fault of ours is transient.
        SMTPD.exception("internal error in SMTP session: %s", type(error).__name__)
        return str(replies.R451_INTERNAL)


# The commands whose replies may wait for the next reply of a pipelined group (see push).
_COALESCED_COMMANDS = frozenset({"smtp_MAIL", "smtp_RCPT", "smtp_RSET", "smtp_NOOP",
                                 "smtp_DATA"})

_HEADER_REFUSALS: dict[str, Reply] = {
    "no_from": replies.R550_NO_FROM,
    "multiple_from": replies.R550_MULTIPLE_FROM,
    "bad_header": replies.R550_BAD_HEADER,
    "header_too_long": replies.R552_HEADER_TOO_BIG,
    "header_line_too_long": replies.R550_HEADER_LINE_TOO_LONG,
}
# RFC 3461 4 / RFC 4954 5: xtext, or the empty mailbox "<>".
_XTEXT = re.compile(r"<>|(?:[!-*,-<>-~]|\+[0-9A-F]{2})+")


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS for our listeners: TLS 1.2 or later, the system's default ciphers."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def _subject(message: bytes) -> str | None:
    parsed = email.message_from_bytes(message.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n",
                                      policy=email.policy.SMTP)
    value = parsed.get("Subject")
    return str(value) if value is not None else None


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def _printable(text: str) -> str:
    """For log lines: UTF-8 kept, control characters and undecodable bytes escaped."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROL_CHARS.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Edge:
    """The SMTP listeners of [server].listen."""

    def __init__(self, cfg: Config, store: QueueStore, on_queued: Callable[[], None], *,
                 suppressions: SuppressionStore | None = None, tokens: Tokens | None = None,
                 signer: Signer | None = None, ingestor: Ingestor | None = None):
        self.cfg = cfg
        self.policy = Policy(cfg, intake=tokens is not None)
        self.store = store
        self.on_queued = on_queued
        self.suppressions = suppressions
        self.tokens = tokens
        self.signer = signer
        self.ingestor = ingestor
        self.metrics: Metrics | None = None
        self.handler = EdgeHandler(self)
        self.sessions: set[RelaySMTP] = set()
        self.draining = False
        self.data_bytes = 0        # DATA bytes reserved by sessions in DATA
        self.tls_context: ssl.SSLContext | None = None
        self._servers: list[asyncio.base_events.Server] = []

    def reload(self, cfg: Config) -> None:
        """New sessions get the new policy; sessions in flight keep theirs."""
        self.policy = Policy(cfg, lockout=self.policy.lockout, intake=self.tokens is not None)
        self.cfg = cfg

    def _protocol(self, implicit_tls: bool) -> RelaySMTP:
        s = self.policy.cfg.server
        return RelaySMTP(
            self.handler, self,
            implicit_tls=implicit_tls,
            data_size_limit=s.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=s.hostname,
            ident="ESMTP relay",
            timeout=s.command_timeout,
            # STARTTLS is offered on plain listeners when a certificate is configured.
            tls_context=None if implicit_tls else self.tls_context,
            authenticator=self.handler.authenticate,
            auth_require_tls=True,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> list[tuple[str, int]]:
        """Bind every listener; return the bound (host, port) pairs (port 0 resolved):
        the plain ones first, then the implicit-TLS ones."""
        s = self.cfg.server
        if s.tls_cert and s.tls_key:
            self.tls_context = server_tls_context(s.tls_cert, s.tls_key)
        loop = asyncio.get_running_loop()
        bound = []
        listeners = [(h, p, False) for h, p in s.listen] + [(h, p, True) for h, p in s.listen_tls]
        for host, port, implicit in listeners:
            server = await loop.create_server(
                functools.partial(self._protocol, implicit), host, port,
                ssl=self.tls_context if implicit else None,
                # a burst of connects up to max_sessions waits in the kernel, not dropped
                backlog=max(100, min(s.max_sessions, 4096)))
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
