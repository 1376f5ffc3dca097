"""The policy engine: one immutable snapshot of the rules, built from a Config.

Each SMTP stage has an ordered list of checks; each returns a refusal (a catalogue Reply)
or None to continue, and the first refusal wins (STYLE rule 2). A session keeps the
snapshot it started with, so a reload (SIGHUP) applies to new sessions only. A check that
raises is answered 451 4.3.0 by the edge's handle_exception: a policy fault never accepts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from relay import replies
from relay.address import domain_of
from relay.config import STREAMS, AppConfig, Config
from relay.policy.access import Accounts, AuthLockout
from relay.policy.headers import HeaderRules
from relay.policy.rate import KeyedLimits, describe
from relay.replies import Reply


@dataclass
class Client:
    """What the edge knows about the client of one session."""

    ip: str
    trusted: bool                 # in mynetworks
    app: AppConfig | None = None  # set by a successful AUTH


@dataclass
class Transaction:
    """One MAIL transaction, as far as the checks need it."""

    client: Client
    sender: str = ""
    from_addresses: list[str] = field(default_factory=list)
    control: dict[str, str] = field(default_factory=dict)


Check = Callable[[Transaction], Reply | str | None]


class Policy:
    def __init__(self, cfg: Config, *, lockout: AuthLockout | None = None,
                 intake: bool = False):
        self.cfg = cfg
        # Our own mailbox for unsubscribe-by-mail (RFC 2369 mailto), when marketing mail is
        # sent and tokens can be checked (`intake`).
        marketing = cfg.server.default_stream == "marketing" or any(
            a.stream == "marketing" for a in cfg.apps)
        domain = cfg.unsubscribe.mail_domain or cfg.server.hostname
        self.unsubscribe_address = f"unsubscribe@{domain.lower()}" if (
            intake and marketing) else None
        self.bounce_domain = cfg.bounces.domain
        self.accounts = Accounts(cfg.apps)
        # The lockout survives a reload, so a reload is no way around it.
        self.lockout = lockout or AuthLockout(cfg.server.auth_max_failures,
                                              cfg.server.auth_lockout)
        self.client_messages = KeyedLimits(cfg.server.client_message_rate)
        self._pending: Counter[tuple[str, str]] = Counter()
        self.client_recipients = KeyedLimits(cfg.server.client_recipient_rate)
        self.app_messages = {a.name: KeyedLimits(a.rate) for a in cfg.apps}
        self.app_recipients = {a.name: KeyedLimits(a.recipient_rate) for a in cfg.apps}
        self.dkim_domains = frozenset(k.domain for k in cfg.dkim)
        h = cfg.headers
        self.header_rules = HeaderRules(remove=h.remove, add_message_id=h.add_message_id,
                                        add_date=h.add_date, feedback_id=h.feedback_id)
        self.mail_checks: list[Check] = [self.check_access, self.check_sender_domain,
                                         self.check_message_rate]
        self.rcpt_checks: list[Check] = [self.check_access]
        self.data_checks: list[Check] = [self.check_from_domain, self.check_dkim_key,
                                         self.check_stream]

    def is_bounce_address(self, mailbox: str) -> bool:
        """Mail for the bounce domain: DSNs and complaints coming back (issue of VERP)."""
        return self.bounce_domain is not None and domain_of(mailbox) == self.bounce_domain

    def is_unsubscribe_address(self, mailbox: str) -> bool:
        return self.unsubscribe_address is not None and \
            mailbox.lower() == self.unsubscribe_address

    @staticmethod
    def first(checks: list[Check], tx: Transaction) -> Reply | str | None:
        for check in checks:
            decision = check(tx)
            if decision is not None:
                return decision
        return None

    # -- MAIL / RCPT --

    def check_access(self, tx: Transaction) -> Reply | None:
        # Invariant 6: never an open relay.
        if tx.client.app is not None or tx.client.trusted:
            return None
        return replies.R530_AUTH_REQUIRED if self.accounts else replies.R550_RELAY_DENIED

    def check_sender_domain(self, tx: Transaction) -> str | None:
        app = tx.client.app
        if app is None or not app.from_domains or not tx.sender:
            return None
        if domain_of(tx.sender) in app.from_domains:
            return None
        return replies.R553_SENDER_NOT_OWNED.format(app=app.name)

    def check_message_rate(self, tx: Transaction) -> str | None:
        # Transactions in flight count too, so parallel sessions cannot all slip through
        # before the first one commits (a reservation, released by `release`).
        app = tx.client.app
        if app is not None and not self.app_messages[app.name].has_capacity(
                app.name, 1 + self._pending[("app", app.name)]):
            return replies.R451_RATE_APP.format(app=app.name, limit=describe(app.rate))
        if not self.client_messages.has_capacity(tx.client.ip,
                                                 1 + self._pending[("ip", tx.client.ip)]):
            return replies.R451_RATE_CLIENT.format(
                limit=describe(self.cfg.server.client_message_rate))
        return None

    async def take_recipient(self, tx: Transaction) -> str | None:
        """Count one recipient against the app's and the client's recipient rates."""
        app = tx.client.app
        if app is not None and not await self.app_recipients[app.name].take(app.name):
            return replies.R451_RATE_APP.format(app=app.name,
                                                limit=describe(app.recipient_rate))
        if not await self.client_recipients.take(tx.client.ip):
            return replies.R451_RATE_CLIENT.format(
                limit=describe(self.cfg.server.client_recipient_rate))
        return None

    def reserve(self, tx: Transaction) -> list[tuple[str, str]]:
        """Hold a place for this transaction's message until it commits or is abandoned."""
        keys = [("ip", tx.client.ip)]
        if tx.client.app is not None:
            keys.append(("app", tx.client.app.name))
        for key in keys:
            self._pending[key] += 1
        return keys

    def release(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._pending[key] -= 1
            if self._pending[key] <= 0:
                del self._pending[key]

    async def take_message(self, tx: Transaction) -> None:
        """Count an accepted message (only accepted ones: case 17)."""
        app = tx.client.app
        if app is not None:
            await self.app_messages[app.name].take(app.name)
        await self.client_messages.take(tx.client.ip)

    # -- end of DATA, after the header rules --

    def check_from_domain(self, tx: Transaction) -> str | None:
        app = tx.client.app
        if app is None or not app.from_domains:
            return None
        if not tx.from_addresses:   # fail closed: a From we cannot read is not allowed
            return replies.R550_FROM_NOT_OWNED.format(domain="(unreadable)", app=app.name)
        for address in tx.from_addresses:
            domain = domain_of(address)
            if domain not in app.from_domains:
                return replies.R550_FROM_NOT_OWNED.format(domain=domain or "(none)",
                                                          app=app.name)
        return None

    def check_dkim_key(self, tx: Transaction) -> str | None:
        app = tx.client.app
        if app is None or not app.require_dkim:
            return None
        for address in tx.from_addresses:
            domain = domain_of(address)
            if domain not in self.dkim_domains:
                return replies.R550_NO_DKIM_KEY.format(domain=domain or "(none)")
        return None

    def check_stream(self, tx: Transaction) -> Reply | None:
        stream = tx.control.get("stream")
        if stream is not None and stream not in STREAMS:
            return replies.R550_BAD_STREAM
        return None

    def stream_for(self, tx: Transaction) -> str:
        app = tx.client.app
        default = app.stream if app is not None else self.cfg.server.default_stream
        return tx.control.get("stream") or default
