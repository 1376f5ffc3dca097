"""Direct delivery ([outbound] mode = "mx"): each recipient domain's MX hosts, through one
connection pool per destination.

- Routing (relay/outbound/mx.py): MX hosts by preference, random among equals, the domain's
  own address when it has no MX, a null MX bounces (5.1.10). A host that refuses the
  connection, times out or greets with 4xx/5xx is skipped for the next one (RFC 5321 5.1,
  3.1); when none gives a session, the recipients are deferred.
- Destinations. A destination is the set of MX hosts of a domain (domains with the same MX
  hosts share it), or an [outbound.destination."..."] entry: one naming the recipient
  domain, or a provider group whose `mx_suffixes` take in every domain whose MX hosts are
  under them (all domains hosted by Google share one pool and one rate). Each destination
  has its own `ConnectionPool` (max_connections, max_messages_per_connection, idle_timeout),
  its recipients per transaction (max_recipients), its source address and EHLO name, and a
  lane of the `Pacer` (rate; throttling and circuit breaker, see relay/queue/pacing.py).
- Transactions: the code the smarthost uses (`deliver_on_pool`). The recipients of one
  domain share a transaction unless the renderer gives each its own copy
  (List-Unsubscribe, VERP); DKIM signing is the renderer's last step, as for the smarthost.
- TLS: STARTTLS whenever offered, without certificate checks (opportunistic, RFC 3207 and
  RFC 7435: better than plaintext, and a failed handshake is retried in plaintext). With
  tls = "required" for the destination, or an MTA-STS policy in enforce mode, the
  certificate must verify for the MX host name and a host without STARTTLS is skipped:
  never plaintext, never a MAIL command before TLS.
"""

from __future__ import annotations

import contextvars
import dataclasses
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

from relay import replies
from relay.address import domain_of
from relay.config import DestinationConfig, OutboundConfig
from relay.log import SMTP
from relay.outbound import RcptResult
from relay.outbound.classify import SmtpReply, from_catalogue
from relay.outbound.mtasts import MtaSts
from relay.outbound.mx import MxHost, MxResolver, Route, RouteError
from relay.outbound.pool import Connection, ConnectionPool
from relay.outbound.render import Renderer
from relay.outbound.smarthost import (
    connect_failure,
    deliver_on_pool,
    results_for,
    tls_info,
    why,
)
from relay.queue import Job, Recipient
from relay.queue.pacing import PENDING, Pacer, Pending

MAX_ADDRESSES = 5      # addresses tried per delivery, at most (Postfix: smtp_mx_address_limit)
PENDING_LIMIT = 2.0    # seconds a job waits for its domain's MX lookup before going unpaced


class TLSRequiredError(Exception):
    """The destination requires TLS and this host cannot give it (no STARTTLS)."""


class _ConnectFailed(Exception):
    """No host of the destination gave a session; `reply` and `relay` are what to record."""

    def __init__(self, reply: SmtpReply, relay: str):
        super().__init__(str(reply))
        self.reply = reply
        self.relay = relay


class _Session(aiosmtplib.SMTP):
    """An SMTP session to one MX host, with what a later reuse must check."""

    def __init__(self, *, mx_name: str, relay: str, **kw: object):
        super().__init__(**kw)  # type: ignore[arg-type]
        self.mx_name = mx_name
        self.relay = relay
        self.verified = False    # certificate verified for mx_name


@dataclass(frozen=True)
class _Target:
    """What a connection is opened for (read by the pool's connect function)."""

    queue_id: str
    domain: str
    hosts: tuple[MxHost, ...]
    require_tls: bool             # never plaintext
    verify: bool                  # the certificate must verify for the MX host name
    same_hosts: bool              # a reused connection must go to one of `hosts`


_TARGET: contextvars.ContextVar[_Target] = contextvars.ContextVar("relay_mx_target")


class DirectDeliverer:
    def __init__(self, cfg: OutboundConfig, helo_name: str, *, resolver: MxResolver,
                 renderer: Renderer | None = None, mta_sts: MtaSts | None = None,
                 clock: Callable[[], float] = time.time,
                 verify_context: ssl.SSLContext | None = None,
                 state_file: Path | None = None):
        self.cfg = cfg
        self.helo_name = cfg.helo_name or helo_name
        self.resolver = resolver
        self.renderer = renderer or Renderer()
        self.mta_sts = mta_sts
        self.clock = clock
        self.port = cfg.mx_port
        # Verified TLS (tls = "required", MTA-STS enforce): the system's CAs, or
        # [outbound].tls_ca_file; the name checked is the MX host's.
        self.verify_context = verify_context or ssl.create_default_context(
            cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
        # Opportunistic TLS: encryption without authentication (RFC 7435).
        self.opportunistic_context = ssl.create_default_context()
        self.opportunistic_context.check_hostname = False
        self.opportunistic_context.verify_mode = ssl.CERT_NONE
        self.pacer = Pacer(self.destination_for, split_by_domain=True,
                           cooldown=cfg.throttle_cooldown, pause_after=cfg.pause_after,
                           pause_for=cfg.pause_for, state_file=state_file)
        self.pools: dict[str, ConnectionPool] = {}
        self._pending_since: dict[str, float] = {}

    # -- destinations --------------------------------------------------------------------

    def destination_for(self, domain: str) -> DestinationConfig | Pending | None:
        """The destination of a recipient domain, for pacing: an entry naming the domain,
        else (from the cached MX lookup) its provider group or MX host set. PENDING while
        the lookup runs (the pacer puts the job back for a moment), None when it failed."""
        entry = self.cfg.destination_for(domain)
        if entry is not None:
            return self.cfg.effective(entry)
        route = self.resolver.cached(domain)
        if route is None:
            self.resolver.prefetch(domain)
            now = self.clock()
            since = self._pending_since.setdefault(domain, now)
            return PENDING if now - since < PENDING_LIMIT else None
        self._pending_since.pop(domain, None)
        if isinstance(route, RouteError):
            return None
        return self._destination(domain, route)

    def _destination(self, domain: str, route: Route) -> DestinationConfig:
        entry = self.cfg.destination_for(domain) or self.cfg.group_for(route.names)
        if entry is None:
            # A destination is the set of MX hosts: domains sharing them share its pool.
            entry = DestinationConfig(name=",".join(sorted(route.names)))
        return self.cfg.effective(entry)

    def _pool(self, dest: DestinationConfig) -> ConnectionPool:
        pool = self.pools.get(dest.name)
        if pool is None:
            assert dest.max_connections and dest.max_messages_per_connection
            assert dest.idle_timeout is not None
            pool = ConnectionPool(lambda: self._open(dest),
                                  max_connections=dest.max_connections,
                                  max_messages=dest.max_messages_per_connection,
                                  idle_timeout=dest.idle_timeout)
            self.pools[dest.name] = pool
        return pool

    def open_connections(self) -> dict[str, int]:
        """Open connections per destination (for /metrics)."""
        return {name: pool.open_now for name, pool in self.pools.items()}

    def throttled(self, job: Job, reply: SmtpReply) -> None:
        """The classifier called a reply of this job's destination rate-limited: slow the
        destination down (the scheduler calls this)."""
        dest = self.destination_for(domain_of(job.recipients[0].address))
        if isinstance(dest, DestinationConfig):
            self.pacer.throttle(dest, self.clock(), str(reply))

    # -- delivery ------------------------------------------------------------------------

    async def deliver(self, job: Job) -> list[RcptResult]:
        """Deliver to each recipient domain's MX hosts; one result per recipient."""
        by_domain: dict[str, list[Recipient]] = {}
        for rcpt in job.recipients:
            by_domain.setdefault(domain_of(rcpt.address).lower(), []).append(rcpt)
        shared = (None if self.renderer.per_recipient(job)
                  else await self.renderer.render_async(job, None))
        results: list[RcptResult] = []
        for domain, rcpts in by_domain.items():
            results += await self._deliver_domain(job, domain, rcpts, shared)
        return results

    async def _deliver_domain(self, job: Job, domain: str, rcpts: list[Recipient],
                              shared: bytes | None) -> list[RcptResult]:
        try:
            route = await self.resolver.route(domain)
        except RouteError as exc:
            return results_for(rcpts, exc.reply, "none")
        dest = self._destination(domain, route)
        now = self.clock()
        if self.pacer.paused_until(dest, now):
            # The circuit is open: no connection attempt, and not the recipient's attempt.
            reply = from_catalogue(replies.R451_SUSPENDED, destination=dest.name,
                                   detail="too many connection failures in a row")
            return results_for(rcpts, reply, "none", counts=False)
        target = await self._target(job.queue_id, domain, route, dest)
        if isinstance(target, SmtpReply):
            return results_for(rcpts, target, "none")
        if shared is None:   # each recipient its own copy (List-Unsubscribe, VERP)
            copies = [(self.renderer.sender(job, r), [r], await self.renderer.render_async(job, r))
                      for r in rcpts]
        else:
            size = dest.max_recipients or len(rcpts)
            copies = [(job.sender, rcpts[i:i + size], shared)
                      for i in range(0, len(rcpts), size)]
        pool = self._pool(dest)
        results: list[RcptResult] = []
        failed: list[tuple[SmtpReply, str]] = []

        def connect_error(exc: Exception) -> tuple[SmtpReply, str]:
            if isinstance(exc, _ConnectFailed):
                failed.append((exc.reply, exc.relay))
            else:
                failed.append((connect_failure(exc), "none"))
            return failed[-1]

        token = _TARGET.set(target)
        try:
            for sender, chunk, body in copies:
                if failed:   # no host would talk to us a moment ago: not again for this job
                    results += results_for(chunk, *failed[-1])
                    continue
                part = dataclasses.replace(job, recipients=chunk, sender=sender, body=body)
                results += await deliver_on_pool(
                    pool, part, relay_of=lambda conn: getattr(conn.smtp, "relay", "none"),
                    connect_error=connect_error,
                    suitable=lambda conn: self._suits(conn, target))
        finally:
            _TARGET.reset(token)
        return results

    async def _target(self, queue_id: str, domain: str, route: Route,
                      dest: DestinationConfig) -> _Target | SmtpReply:
        """The hosts to try and the TLS demands: the destination's, then MTA-STS's."""
        hosts = route.hosts
        require = verify = dest.tls == "required"
        same_hosts = not dest.mx_suffixes
        policy = await self.mta_sts.policy(domain) if self.mta_sts is not None else None
        if policy is not None and policy.mode == "enforce":
            # RFC 8461 5: only MX hosts the policy names, and only over verified TLS.
            allowed = tuple(h for h in hosts if policy.allows(h.name))
            if not allowed:
                SMTP.warning("%s: MTA-STS policy of %s (enforce) allows none of its MX hosts "
                             "%s", queue_id, domain, ",".join(route.names))
                return from_catalogue(replies.R451_MTA_STS_NO_MX, domain=domain)
            hosts, require, verify, same_hosts = allowed, True, True, True
        elif policy is not None and policy.mode == "testing":
            # RFC 8461 5: testing mode reports, never refuses.
            refused = [h.name for h in hosts if not policy.allows(h.name)]
            if refused:
                SMTP.warning("%s: MTA-STS policy of %s (testing) does not allow MX host(s) "
                             "%s; delivering anyway", queue_id, domain, ",".join(refused))
        return _Target(queue_id, domain, hosts, require, verify, same_hosts)

    @staticmethod
    def _suits(conn: Connection, target: _Target) -> bool:
        """May a pooled connection carry mail for `target`?"""
        smtp = conn.smtp
        if target.verify and not getattr(smtp, "verified", False):
            return False
        if target.require_tls and not tls_info(smtp):
            return False
        if target.same_hosts:
            return getattr(smtp, "mx_name", None) in {h.name for h in target.hosts}
        return True

    # -- connecting ------------------------------------------------------------------------

    async def _open(self, dest: DestinationConfig) -> aiosmtplib.SMTP:
        """A session with the first host of the current target that gives one
        (RFC 5321 5.1: in preference order, every address of each host)."""
        target = _TARGET.get()
        last: tuple[BaseException, str] | None = None
        tried = 0
        for host in target.hosts:
            for address in host.addresses:
                if tried >= MAX_ADDRESSES:
                    break
                tried += 1
                relay = f"{host.name}[{address}]:{self.port}"
                try:
                    smtp = await self._session(dest, target, host, address, relay)
                except Exception as exc:  # noqa: BLE001 - any failure: try the next host
                    SMTP.info("%s: connect to %s: %s", target.queue_id, relay, why(exc))
                    last = (exc, relay)
                    continue
                self.pacer.connection_ok(dest, self.clock())
                return smtp
        if last is None:
            reply = from_catalogue(replies.R451_NO_MX_ADDRESS, domain=target.domain,
                                   detail="no address to try")
            relay = "none"
        else:
            reply, relay = connect_failure(last[0]), last[1]
        self.pacer.connection_failed(dest, self.clock(), str(reply))
        raise _ConnectFailed(reply, relay)

    async def _session(self, dest: DestinationConfig, target: _Target, host: MxHost,
                       address: str, relay: str, *, plaintext: bool = False) -> _Session:
        smtp = _Session(
            mx_name=host.name, relay=relay, hostname=address, port=self.port,
            local_hostname=dest.helo_name or self.helo_name,
            source_address=(dest.source_address, 0) if dest.source_address else None,
            timeout=self.cfg.command_timeout, use_tls=False, start_tls=False)
        # A 4xx/5xx greeting raises here (SMTPConnectResponseError): RFC 5321 3.1 and 5.1,
        # the caller moves on to the next host.
        await smtp.connect(timeout=self.cfg.connect_timeout)
        try:
            await _hello(smtp)
            if plaintext:
                return smtp
            if smtp.supports_extension("starttls"):
                context = self.verify_context if target.verify else self.opportunistic_context
                try:
                    # RFC 3207 / RFC 8461 4.2: the name checked is the MX host's.
                    await smtp.starttls(server_hostname=host.name, tls_context=context)
                except (ssl.SSLError, aiosmtplib.SMTPException, OSError) as exc:
                    if target.require_tls:
                        raise
                    # Opportunistic: a failed handshake is retried in plaintext, once.
                    SMTP.info("%s: STARTTLS with %s failed (%s); retrying without TLS",
                              target.queue_id, relay, why(exc))
                    smtp.close()
                    return await self._session(dest, target, host, address, relay,
                                               plaintext=True)
                smtp.verified = target.verify
                await _hello(smtp)   # RFC 3207 4.2: forget what was learnt before TLS
            elif target.require_tls:
                raise TLSRequiredError(f"{relay} offers no STARTTLS and TLS is required")
        except BaseException:
            smtp.close()
            raise
        return smtp

    async def close(self) -> None:
        for pool in self.pools.values():
            await pool.close()
        await self.resolver.close()
        if self.mta_sts is not None:
            await self.mta_sts.close()
        self.pacer.close()


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError:
        await smtp.helo()     # RFC 5321 3.2: fall back to HELO
