"""Delivery to one smarthost through a pool of aiosmtplib connections, and the SMTP
transaction code that direct delivery (relay/outbound/direct.py) shares: `deliver_on_pool`
and `run_transaction`.

The envelope commands are written by hand (`execute_command`), not through aiosmtplib's
`mail()`/`rcpt()`: those re-parse and re-quote addresses, which turns the null sender into
`<<>>` and may unquote local parts. The edge has already validated every address, so the
bytes we send are the bytes the client gave us (RFC 5321 4.1.2, 4.5.5).

When the next hop advertises PIPELINING (RFC 2920), MAIL, every RCPT and DATA leave in one
write and their replies are read in order (relay/outbound/pipelining.py): one round trip
instead of two plus one per recipient, with the same outcomes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
from collections.abc import Callable

import aiosmtplib

from relay import replies
from relay.config import OutboundConfig
from relay.log import SMTP
from relay.outbound import RcptResult
from relay.outbound.classify import SmtpReply, from_catalogue, parse_reply
from relay.outbound.pipelining import Pipeline
from relay.outbound.pool import Connection, ConnectionPool
from relay.outbound.render import Renderer
from relay.queue import Job, Recipient

# Per-recipient copies (List-Unsubscribe, VERP) of one message delivered at once, unless the
# body is bigger than this (then one at a time, to bound the rendered copies held).
PARALLEL_COPIES = 4
PARALLEL_COPIES_MAX_BODY = 1024 * 1024


class Stale(Exception):
    """A reused connection failed before the server said anything about this message."""

RelayOf = Callable[[Connection], str]
ConnectError = Callable[[Exception], tuple[SmtpReply, str]]


class SmarthostDeliverer:
    def __init__(self, cfg: OutboundConfig, helo_name: str, *,
                 renderer: Renderer | None = None,
                 tls_context: ssl.SSLContext | None = None,
                 environ: Callable[[str], str | None] = os.environ.get):
        assert cfg.smarthost is not None
        self.cfg = cfg
        self.host, self.port = cfg.smarthost
        self.helo_name = cfg.helo_name or helo_name
        self.tls_context = tls_context
        self.renderer = renderer or Renderer()
        self.username = environ(cfg.username_env) if cfg.username_env else None
        self.password = environ(cfg.password_env) if cfg.password_env else None
        self.pool = ConnectionPool(self._connect, max_connections=cfg.max_connections,
                                   max_messages=cfg.max_messages_per_connection,
                                   idle_timeout=cfg.idle_timeout)

    @property
    def relay_name(self) -> str:
        return f"{self.host}[{self.host}]:{self.port}"

    async def _connect(self) -> aiosmtplib.SMTP:
        mode = self.cfg.tls
        verify = self.cfg.tls_verify and mode in ("starttls", "tls")
        smtp = aiosmtplib.SMTP(
            hostname=self.host, port=self.port, local_hostname=self.helo_name,
            timeout=self.cfg.command_timeout,
            use_tls=mode == "tls",
            # aiosmtplib: start_tls=None upgrades when offered, True requires it.
            start_tls={"none": False, "opportunistic": None, "starttls": True, "tls": False}[mode],
            validate_certs=verify,
            cert_bundle=str(self.cfg.tls_ca_file) if self.cfg.tls_ca_file else None,
            tls_context=self.tls_context,
        )
        await smtp.connect(timeout=self.cfg.connect_timeout)
        try:
            if smtp.is_ehlo_or_helo_needed:   # after STARTTLS too (RFC 3207 4.2)
                try:
                    await smtp.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await smtp.helo()     # RFC 5321 3.2: fall back to HELO
        except BaseException:
            smtp.close()
            raise
        if self.username is not None and self.password is not None:
            try:
                await smtp.login(self.username, self.password)
            except BaseException:
                smtp.close()
                raise
        return smtp

    async def close(self) -> None:
        await self.pool.close()

    async def deliver(self, job: Job) -> list[RcptResult]:
        """One transaction for the job's recipients, or one per recipient when each gets
        its own headers (marketing: List-Unsubscribe)."""
        if not self.renderer.per_recipient(job):
            return await self._deliver(job, job.recipients, job.sender,
                                       await self.renderer.render_async(job, None))
        # Each copy is its own transaction: up to PARALLEL_COPIES of them at once over the
        # pool (one at a time for a big message: each copy in flight is a rendered body).
        parallel = 1 if len(job.body) > PARALLEL_COPIES_MAX_BODY else PARALLEL_COPIES
        gate = asyncio.Semaphore(max(1, min(parallel, self.pool.max_connections)))

        async def copy(rcpt: Recipient) -> list[RcptResult]:
            async with gate:
                body = await self.renderer.render_async(job, rcpt)
                return await self._deliver(job, [rcpt], self.renderer.sender(job, rcpt), body)

        done = await asyncio.gather(*(copy(r) for r in job.recipients), return_exceptions=True)
        results: list[RcptResult] = []
        for rcpt, got in zip(job.recipients, done, strict=True):
            if isinstance(got, BaseException):
                if not isinstance(got, Exception):
                    raise got      # cancellation and the like are not a delivery outcome
                # The other copies' outcomes stand (some may be delivered: retrying them
                # would send twice); only this one is deferred.
                SMTP.error("%s: to=<%s>: delivery failed unexpectedly: %r", job.queue_id,
                           rcpt.address, got)
                reply = from_catalogue(replies.R451_DELIVERY_ERROR, detail=type(got).__name__)
                results.append(RcptResult(rcpt, reply, self.relay_name))
            else:
                results += got
        return results

    async def _deliver(self, job: Job, rcpts: list[Recipient], sender: str,
                       body: bytes) -> list[RcptResult]:
        job = dataclasses.replace(job, recipients=rcpts, sender=sender, body=body)
        return await deliver_on_pool(
            self.pool, job, relay_of=lambda conn: self.relay_name,
            connect_error=lambda exc: (connect_failure(exc), self.relay_name))


def results_for(rcpts: list[Recipient], reply: SmtpReply, relay: str, counts: bool = True,
                tls: str = "") -> list[RcptResult]:
    """The same outcome for every recipient of a transaction."""
    return [RcptResult(r, reply, relay, counts, tls) for r in rcpts]


def tls_info(smtp: aiosmtplib.SMTP) -> str:
    """"TLSv1.3:TLS_AES_256_GCM_SHA384" for a TLS session, "" for plaintext: the `tls=`
    field of the delivery log line."""
    transport = smtp.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is None:
        return ""
    cipher = ssl_object.cipher()
    return f"{ssl_object.version()}:{cipher[0] if cipher else '?'}"


async def deliver_on_pool(pool: ConnectionPool, job: Job, *, relay_of: RelayOf,
                          connect_error: ConnectError,
                          suitable: Callable[[Connection], bool] | None = None,
                          ) -> list[RcptResult]:
    """One transaction for `job` (already rendered: its sender, recipients and body go on
    the wire as they are) on a connection of `pool`.

    Retried once on a fresh connection when a pooled connection turns out to have been
    closed by the server (not counted). A pooled connection that `suitable` refuses (made
    for another recipient domain's policy) is closed and another one taken.
    `connect_error` turns a failure to connect into the reply and relay name to record."""
    stale = 0
    while True:
        try:
            conn = await pool.acquire()
        except Exception as exc:  # noqa: BLE001 - any connect failure defers
            reply, relay = connect_error(exc)
            return results_for(job.recipients, reply, relay)
        if suitable is not None and conn.reused and not suitable(conn):
            # Closed, not kept: the idle ones run out, then a fresh one is opened.
            pool.release(conn, reusable=False)
            continue
        relay = relay_of(conn)
        try:
            results, reusable = await run_transaction(conn, job, relay, tls_info(conn.smtp))
        except Stale:
            pool.release(conn, reusable=False)
            stale += 1
            if stale < 2:
                continue
            return results_for(job.recipients, from_catalogue(
                replies.R451_CONNECTION_LOST, detail="connection closed twice"), relay)
        except BaseException:
            pool.release(conn, reusable=False, abort=True)
            raise
        pool.release(conn, reusable=reusable)
        return results


async def run_transaction(conn: Connection, job: Job, relay: str, tls: str = "",
                          ) -> tuple[list[RcptResult], bool]:
    """MAIL, RCPT per recipient, DATA on an open session: one result per recipient, and
    whether the connection can carry another transaction. Raises `Stale` when a reused
    connection turns out dead before the server said anything."""
    smtp = conn.smtp
    ext = smtp.esmtp_extensions

    def every(reply: SmtpReply) -> list[RcptResult]:
        return results_for(job.recipients, reply, relay, tls=tls)

    # RFC 6531 3.4 / RFC 6152 3: never send what the next hop did not offer.
    if job.smtputf8 and "smtputf8" not in ext:
        return every(from_catalogue(replies.R550_NEEDS_SMTPUTF8)), True
    if job.eightbit and "8bitmime" not in ext:
        return every(from_catalogue(replies.R554_NEEDS_8BITMIME)), True
    limit = ext.get("size", "")
    if limit.isdigit() and 0 < int(limit) < len(job.body):
        # RFC 1870 6.1: do not send a message larger than the advertised SIZE.
        return every(from_catalogue(replies.R552_NEXT_HOP_SIZE, limit=limit)), True

    params = []
    if "size" in ext:
        params.append(b"SIZE=%d" % len(job.body))
    if job.eightbit:
        params.append(b"BODY=8BITMIME")
    if job.smtputf8:
        params.append(b"SMTPUTF8")

    mail = b" ".join([b"MAIL", b"FROM:<" + job.sender.encode("utf-8") + b">", *params])
    if smtp.supports_extension("pipelining"):
        return await _pipelined(conn, job, relay, tls, mail)

    results: list[RcptResult] = []
    # No outcome yet: accepted recipients stay here until the message's outcome, so a
    # failure after their RCPT (421, drop, timeout) defers them too, never leaves them out.
    pending = list(job.recipients)
    heard = False   # did the server answer anything in this transaction?
    try:
        resp = await smtp.execute_command(
            b"MAIL", b"FROM:<" + job.sender.encode("utf-8") + b">", *params)
        heard = True
        if resp.code == 421 and conn.reused:
            raise Stale
        if resp.code != 250:
            reply = parse_reply(resp.code, resp.message)
            return every(reply), await _reset(smtp, resp.code)
        accepted: list[Recipient] = []
        for rcpt in job.recipients:
            resp = await smtp.execute_command(
                b"RCPT", b"TO:<" + rcpt.address.encode("utf-8") + b">")
            if _rcpt_reply(rcpt, resp, accepted, pending, results, relay, tls):
                return results, False
        if not accepted:
            return results, await _reset(smtp, 0)
        try:
            resp = await smtp.data(job.body)
            reply = parse_reply(resp.code, resp.message)
            reusable = True
        except aiosmtplib.SMTPDataError as exc:
            reply = parse_reply(exc.code, exc.message)
            # A refused DATA command leaves the transaction open on the server: RSET
            # before the connection carries another (else "503 nested MAIL").
            reusable = await _reset(smtp, exc.code)
        results.extend(results_for(accepted, reply, relay, tls=tls))
        return results, reusable
    except (aiosmtplib.SMTPException, OSError) as exc:
        reply = _interrupted(exc, conn, heard)
    results.extend(results_for(pending, reply, relay, tls=tls))
    return results, False


def _rcpt_reply(rcpt: Recipient, resp: aiosmtplib.SMTPResponse, accepted: list[Recipient],
                pending: list[Recipient], results: list[RcptResult], relay: str,
                tls: str) -> bool:
    """Take the reply to one RCPT (either path): accepted, or this recipient's outcome.
    True when it was 421, the server closing: every recipient still pending is then
    deferred with it and the transaction is over."""
    if resp.code in (250, 251):
        accepted.append(rcpt)
        return False
    pending.remove(rcpt)
    reply = parse_reply(resp.code, resp.message)
    results.append(RcptResult(rcpt, reply, relay, tls=tls))
    if resp.code != 421:
        return False
    results.extend(results_for(pending, reply, relay, tls=tls))
    return True


async def _pipelined(conn: Connection, job: Job, relay: str, tls: str, mail: bytes,
                     ) -> tuple[list[RcptResult], bool]:
    """`run_transaction` on a session that advertised PIPELINING: MAIL, every RCPT and
    DATA go out as one group (RFC 2920 3.1: DATA last), their replies are read in order,
    then the body after a 354. Outcomes are those of the one-command-at-a-time code."""
    smtp = conn.smtp
    group = Pipeline(smtp)
    results: list[RcptResult] = []
    pending = list(job.recipients)   # no outcome yet
    heard = False
    try:
        group.send(mail, *(b"RCPT TO:<" + r.address.encode("utf-8") + b">"
                           for r in job.recipients), b"DATA")
        resp = await group.reply()
        heard = True
        if resp.code == 421 and conn.reused:
            raise Stale
        if resp.code != 250:
            reply = parse_reply(resp.code, resp.message)
            return (results_for(job.recipients, reply, relay, tls=tls),
                    await _drain_and_reset(group, resp.code))
        accepted: list[Recipient] = []
        for rcpt in job.recipients:
            if _rcpt_reply(rcpt, await group.reply(), accepted, pending, results, relay, tls):
                return results, False
        resp = await group.reply()   # to DATA
        if not accepted:
            # RFC 2920 3.1: DATA's reply is checked even so. Refused (503/554), the
            # transaction is over: RSET. A 354 asks for a message to nobody: hang up
            # rather than send one.
            if resp.code == 354:
                group.close()
                return results, False
            return results, group.finish() and await _reset(smtp, resp.code)
        if resp.code == 354:
            group.send_body(job.body)
            resp = await group.reply()
        in_step = group.finish()
        reply = parse_reply(resp.code, resp.message)
        if resp.code == 250:
            reusable = in_step
        else:
            # Refused DATA or message: RSET before the connection carries another (as
            # run_transaction does).
            reusable = in_step and await _reset(smtp, resp.code)
        results.extend(results_for(accepted, reply, relay, tls=tls))
        return results, reusable
    except Stale:
        group.close()
        raise
    except (aiosmtplib.SMTPException, OSError) as exc:
        group.close()
        reply = _interrupted(exc, conn, heard)
    results.extend(results_for(pending, reply, relay, tls=tls))
    return results, False


async def _drain_and_reset(group: Pipeline, code: int) -> bool:
    """After a refused MAIL, read the replies the rest of the group still gets (RFC 2920
    3.1: 503s), then RSET. False (session closed) when that cannot leave it clean."""
    if code == 421:
        return False
    try:
        while group.owed:
            if (await group.reply()).code == 354:   # DATA taken without a sender
                group.close()
                return False
    except (aiosmtplib.SMTPException, OSError):
        group.close()
        return False
    return group.finish() and await _reset(group.smtp, code)


def _interrupted(exc: BaseException, conn: Connection, heard: bool) -> SmtpReply:
    """The reply for the recipients still pending when the session failed mid-transaction.
    Raises `Stale` for a reused connection that failed before the server said anything."""
    if isinstance(exc, (aiosmtplib.SMTPServerDisconnected, ConnectionError)):
        if conn.reused and not heard:
            raise Stale from exc
        return from_catalogue(replies.R451_CONNECTION_LOST, detail=why(exc))
    if isinstance(exc, (TimeoutError, aiosmtplib.SMTPTimeoutError)):
        return from_catalogue(replies.R451_TIMEOUT, detail=why(exc))
    return from_catalogue(replies.R451_CONNECTION_LOST, detail=why(exc))


async def _reset(smtp: aiosmtplib.SMTP, code: int) -> bool:
    """RSET after a refused transaction so the connection can carry the next one."""
    if code == 421 or not smtp.is_connected:
        return False
    try:
        resp = await smtp.execute_command(b"RSET")
    except aiosmtplib.SMTPException:
        return False
    return resp.code == 250


def why(exc: BaseException) -> str:
    """An exception as one line for a reply text."""
    text = str(exc).replace("\r", " ").replace("\n", " ").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def connect_failure(exc: BaseException) -> SmtpReply:
    """The reply recorded when no session could be opened (never a permanent one)."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return from_catalogue(replies.R451_AUTH_FAILED, detail=why(exc))
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        # A 4xx/5xx greeting: RFC 5321 3.1 - treat as transient for the message.
        return from_catalogue(replies.R451_CONNECT_FAILED, detail=why(exc))
    if isinstance(exc, ssl.SSLError) or "TLS" in type(exc).__name__ or "tls" in str(exc).lower():
        return from_catalogue(replies.R451_TLS_FAILED, detail=why(exc))
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError)):
        return from_catalogue(replies.R451_TIMEOUT, detail=why(exc))
    return from_catalogue(replies.R451_CONNECT_FAILED, detail=why(exc))
