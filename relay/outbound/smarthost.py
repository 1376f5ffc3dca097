"""Delivery to one smarthost through a pool of aiosmtplib connections.

The envelope commands are written by hand (`execute_command`), not through aiosmtplib's
`mail()`/`rcpt()`: those re-parse and re-quote addresses, which turns the null sender into
`<<>>` and may unquote local parts. The edge has already validated every address, so the
bytes we send are the bytes the client gave us (RFC 5321 4.1.2, 4.5.5).
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
from relay.outbound import RcptResult
from relay.outbound.classify import SmtpReply, from_catalogue, parse_reply
from relay.outbound.pool import Connection, ConnectionPool
from relay.outbound.render import Renderer
from relay.queue import Job, Recipient


class _Stale(Exception):
    """A reused connection failed before the server said anything about this message."""


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
                                       self.renderer.render(job, None))
        results: list[RcptResult] = []
        for rcpt in job.recipients:
            results += await self._deliver(job, [rcpt], self.renderer.sender(job, rcpt),
                                           self.renderer.render(job, rcpt))
        return results

    async def _deliver(self, job: Job, rcpts: list[Recipient], sender: str,
                       body: bytes) -> list[RcptResult]:
        """One transaction; retried once on a fresh connection when a pooled connection
        turns out to have been closed by the server (not counted)."""
        job = dataclasses.replace(job, recipients=rcpts, sender=sender, body=body)
        for _ in range(2):
            try:
                conn = await self.pool.acquire()
            except Exception as exc:  # noqa: BLE001 - any connect failure defers
                return self._all(job, _connect_failure(exc))
            try:
                results, reusable = await self._transaction(conn, job)
            except _Stale:
                self.pool.release(conn, reusable=False)
                continue
            except BaseException:
                self.pool.release(conn, reusable=False)
                raise
            self.pool.release(conn, reusable=reusable)
            return results
        return self._all(job, from_catalogue(replies.R451_CONNECTION_LOST,
                                             detail="connection closed twice"))

    def _all(self, job: Job, reply: SmtpReply, counts: bool = True) -> list[RcptResult]:
        return [RcptResult(r, reply, self.relay_name, counts) for r in job.recipients]

    async def _transaction(self, conn: Connection, job: Job) -> tuple[list[RcptResult], bool]:
        smtp = conn.smtp
        ext = smtp.esmtp_extensions
        # RFC 6531 3.4 / RFC 6152 3: never send what the next hop did not offer.
        if job.smtputf8 and "smtputf8" not in ext:
            return self._all(job, from_catalogue(replies.R550_NEEDS_SMTPUTF8)), True
        if job.eightbit and "8bitmime" not in ext:
            return self._all(job, from_catalogue(replies.R554_NEEDS_8BITMIME)), True
        limit = ext.get("size", "")
        if limit.isdigit() and 0 < int(limit) < len(job.body):
            # RFC 1870 6.1: do not send a message larger than the advertised SIZE.
            return self._all(job, from_catalogue(replies.R552_NEXT_HOP_SIZE, limit=limit)), True

        params = []
        if "size" in ext:
            params.append(b"SIZE=%d" % len(job.body))
        if job.eightbit:
            params.append(b"BODY=8BITMIME")
        if job.smtputf8:
            params.append(b"SMTPUTF8")

        results: list[RcptResult] = []
        pending = list(job.recipients)
        heard = False   # did the server answer anything in this transaction?
        try:
            resp = await smtp.execute_command(
                b"MAIL", b"FROM:<" + job.sender.encode("utf-8") + b">", *params)
            heard = True
            if resp.code == 421 and conn.reused:
                raise _Stale
            if resp.code != 250:
                reply = parse_reply(resp.code, resp.message)
                return self._all(job, reply), await _reset(smtp, resp.code)
            accepted = []
            for rcpt in job.recipients:
                resp = await smtp.execute_command(
                    b"RCPT", b"TO:<" + rcpt.address.encode("utf-8") + b">")
                pending.remove(rcpt)
                if resp.code in (250, 251):
                    accepted.append(rcpt)
                    continue
                results.append(RcptResult(rcpt, parse_reply(resp.code, resp.message),
                                          self.relay_name))
                if resp.code == 421:   # the server is closing: the rest are deferred too
                    for rest in pending:
                        results.append(RcptResult(rest, parse_reply(resp.code, resp.message),
                                                  self.relay_name))
                    return results, False
            if not accepted:
                return results, await _reset(smtp, 0)
            pending = accepted
            try:
                resp = await smtp.data(job.body)
                reply = parse_reply(resp.code, resp.message)
                reusable = True
            except aiosmtplib.SMTPDataError as exc:
                reply = parse_reply(exc.code, exc.message)
                # A refused DATA command leaves the transaction open on the server: RSET
                # before the connection carries another (else "503 nested MAIL").
                reusable = await _reset(smtp, exc.code)
            results.extend(RcptResult(r, reply, self.relay_name) for r in accepted)
            return results, reusable
        except _Stale:
            raise
        except (aiosmtplib.SMTPServerDisconnected, ConnectionError) as exc:
            if conn.reused and not heard:
                raise _Stale from exc
            reply = from_catalogue(replies.R451_CONNECTION_LOST, detail=_why(exc))
        except (TimeoutError, aiosmtplib.SMTPTimeoutError) as exc:
            reply = from_catalogue(replies.R451_TIMEOUT, detail=_why(exc))
        except (aiosmtplib.SMTPException, OSError) as exc:
            reply = from_catalogue(replies.R451_CONNECTION_LOST, detail=_why(exc))
        results.extend(RcptResult(r, reply, self.relay_name) for r in pending)
        return results, False


async def _reset(smtp: aiosmtplib.SMTP, code: int) -> bool:
    """RSET after a refused transaction so the connection can carry the next one."""
    if code == 421 or not smtp.is_connected:
        return False
    try:
        resp = await smtp.execute_command(b"RSET")
    except aiosmtplib.SMTPException:
        return False
    return resp.code == 250


def _why(exc: BaseException) -> str:
    text = str(exc).replace("\r", " ").replace("\n", " ").strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _connect_failure(exc: BaseException) -> SmtpReply:
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return from_catalogue(replies.R451_AUTH_FAILED, detail=_why(exc))
    if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
        # A 4xx/5xx greeting: RFC 5321 3.1 - treat as transient for the message.
        return from_catalogue(replies.R451_CONNECT_FAILED, detail=_why(exc))
    if isinstance(exc, ssl.SSLError) or "TLS" in type(exc).__name__ or "tls" in str(exc).lower():
        return from_catalogue(replies.R451_TLS_FAILED, detail=_why(exc))
    if isinstance(exc, (aiosmtplib.SMTPTimeoutError, asyncio.TimeoutError)):
        return from_catalogue(replies.R451_TIMEOUT, detail=_why(exc))
    return from_catalogue(replies.R451_CONNECT_FAILED, detail=_why(exc))
