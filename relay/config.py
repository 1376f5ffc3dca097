"""relay.toml -> frozen, typed, validated configuration objects.

Every problem is reported as one line naming the file and the key, and all problems of a
file are collected before anything is refused, so an admin fixes them in one pass.
Unknown keys are errors: a typo must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per fault."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
    "k": 1024, "m": 1024**2, "g": 1024**3,
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-zA-Z]*)\s*$")
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(\d*)\s*(ms|s|m|h|d)\s*$")


def parse_duration(value: object) -> float:
    """"30s", "5m", "1h", "2d", "250ms" -> seconds. Bare numbers are refused: say the unit."""
    if not isinstance(value, str):
        raise TypeError(f"expected a duration string such as \"30s\" or \"5m\", got {value!r}")
    m = _DURATION_RE.match(value)
    if not m:
        raise ValueError(f"bad duration {value!r}: use a number and one of ms, s, m, h, d, w")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: object) -> int:
    """"25MiB", "10KB", "10240" or 10240 -> bytes."""
    if isinstance(value, bool):
        raise TypeError(f"expected a size such as \"25MiB\", got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise TypeError(f"expected a size such as \"25MiB\", got {value!r}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"bad size {value!r}: use a number and one of B, KB, MB, KiB, MiB, GiB")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_rate(value: object) -> tuple[float, float]:
    """"20/s", "1000/h", "5/10s" -> (count, period in seconds)."""
    if not isinstance(value, str):
        raise TypeError(f"expected a rate such as \"20/s\", got {value!r}")
    m = _RATE_RE.match(value)
    if not m:
        raise ValueError(f"bad rate {value!r}: use COUNT/UNIT such as \"20/s\" or \"500/h\"")
    count = float(m.group(1))
    period = float(m.group(2) or 1) * _DURATION_UNITS[m.group(3)]
    if count <= 0 or period <= 0:
        raise ValueError(f"bad rate {value!r}: count and period must be positive")
    return count, period


def parse_hostport(value: object, default_port: int | None = None) -> tuple[str, int]:
    """"127.0.0.1:2525", "[::1]:25", "mail.example.net" (with a default port)."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected \"HOST:PORT\", got {value!r}")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\](?::(\d+))?$", value)
    if m:
        host, port = m.group(1), m.group(2)
    else:
        host, _, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not host:
            raise ValueError(f"{value!r} has no host: write HOST:PORT")
    if not port:
        if default_port is None:
            raise ValueError(f"{value!r} has no port: write HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad port in {value!r}")
    return host, int(port)


# --- the sections ------------------------------------------------------------------------

STREAMS = ("transactional", "marketing")


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = "relay.example.test"
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 2525),)
    listen_tls: tuple[tuple[str, int], ...] = ()      # implicit TLS (RFC 8314), e.g. port 465
    tls_cert: Path | None = None
    tls_key: Path | None = None
    mynetworks: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"),)
    default_stream: str = "transactional"
    auth_require_tls: bool = True
    max_message_size: int = 25 * 1024 * 1024
    max_recipients: int = 1000
    max_sessions: int = 1000
    max_data_memory: int = 512 * 1024 * 1024   # bytes of DATA held at once, all sessions
    command_timeout: float = 300.0
    data_timeout: float = 600.0
    auth_max_failures: int = 5
    auth_lockout: float = 600.0
    client_message_rate: tuple[float, float] | None = None
    client_recipient_rate: tuple[float, float] | None = None


@dataclass(frozen=True)
class QueueConfig:
    path: Path = Path("var/relay.db")
    retry: tuple[float, ...] = (60.0, 300.0, 900.0, 3600.0, 14400.0)
    lifetime: float = 5 * 86400.0
    group_commit_window: float = 0.0     # 0: commit what is waiting at once


DESTINATION_TLS = ("opportunistic", "required")


@dataclass(frozen=True)
class DestinationConfig:
    """[outbound.destination."NAME"]: pacing and connection settings for one destination.

    Without `mx_suffixes` the entry is about a recipient domain (and its subdomains). With
    them it is a provider group (mode = "mx"): every domain whose MX hosts are under one of
    the suffixes shares the entry's pool and rate. A key left out (None) takes its value
    from [outbound] (`OutboundConfig.effective`).
    """

    name: str
    rate: tuple[float, float] | None = None
    max_connections: int | None = None
    max_messages_per_connection: int | None = None
    max_recipients: int | None = None
    idle_timeout: float | None = None
    tls: str | None = None                 # "opportunistic" | "required" (mode = "mx")
    source_address: str | None = None
    helo_name: str | None = None
    mx_suffixes: tuple[str, ...] = ()

    def covers_mx(self, host: str) -> bool:
        """Is the MX host `host` under one of this group's suffixes?"""
        host = host.lower().rstrip(".")
        return any(host == s or host.endswith("." + s) for s in self.mx_suffixes)


@dataclass(frozen=True)
class OutboundConfig:
    mode: str = "smarthost"
    smarthost: tuple[str, int] | None = ("127.0.0.1", 2526)
    tls: str = "none"
    tls_verify: bool = True
    tls_ca_file: Path | None = None
    username_env: str | None = None
    password_env: str | None = None
    max_connections: int = 10
    max_messages_per_connection: int = 100
    idle_timeout: float = 30.0
    connect_timeout: float = 30.0
    command_timeout: float = 300.0
    helo_name: str | None = None
    destinations: tuple[DestinationConfig, ...] = ()
    # mode = "mx" (direct delivery)
    mx_port: int = 25                     # RFC 5321 4.5.4: 25; another port only for tests
    max_recipients: int = 100             # per transaction (RFC 5321 4.5.3.1.8: 100 at least)
    source_address: str | None = None     # local address of outbound connections
    mta_sts: bool = False                 # RFC 8461 policies fetched and enforced
    throttle_cooldown: float = 300.0      # a throttled destination recovers one step per this
    pause_after: int = 5                  # connection failures in a row pause a destination
    pause_for: float = 300.0              # ... for this long
    # Delivery (rendering, DKIM, the SMTP client) in a second process, the SMTP edge and the
    # queue in this one: both cores busy (issue 9). Smarthost mode only.
    delivery_process: bool = False

    def destination_for(self, domain: str) -> DestinationConfig | None:
        """The most specific destination entry for a recipient domain, if any (provider
        groups, which are chosen by MX host, are not)."""
        best = None
        for dest in self.destinations:
            if dest.mx_suffixes:
                continue
            matches = domain == dest.name or domain.endswith("." + dest.name)
            if matches and (best is None or len(dest.name) > len(best.name)):
                best = dest
        return best

    def group_for(self, mx_hosts: list[str]) -> DestinationConfig | None:
        """The provider group of a domain whose MX hosts are `mx_hosts` (most preferred
        first): the first group that covers one of them."""
        for host in mx_hosts:
            for dest in self.destinations:
                if dest.covers_mx(host):
                    return dest
        return None

    def effective(self, dest: DestinationConfig) -> DestinationConfig:
        """`dest` with every key it leaves out taken from [outbound]."""
        return DestinationConfig(
            name=dest.name, rate=dest.rate,
            max_connections=dest.max_connections or self.max_connections,
            max_messages_per_connection=(dest.max_messages_per_connection
                                         or self.max_messages_per_connection),
            max_recipients=dest.max_recipients or self.max_recipients,
            idle_timeout=dest.idle_timeout if dest.idle_timeout is not None
            else self.idle_timeout,
            tls=dest.tls or "opportunistic",
            source_address=dest.source_address or self.source_address,
            helo_name=dest.helo_name or self.helo_name,
            mx_suffixes=dest.mx_suffixes)


@dataclass(frozen=True)
class HeadersConfig:
    remove: tuple[str, ...] = ("X-Originating-IP", "Bcc")
    add_message_id: bool = True
    add_date: bool = True
    feedback_id: bool = True


@dataclass(frozen=True)
class HttpConfig:
    listen: tuple[str, int] | None = ("127.0.0.1", 8025)
    public_url: str = "http://127.0.0.1:8025"
    max_body: int = 4096


@dataclass(frozen=True)
class UnsubscribeConfig:
    secret_env: str = "RELAY_UNSUBSCRIBE_SECRET"
    token_lifetime: float = 60 * 86400.0
    existing_header: str = "replace"      # what to do with an app's own List-Unsubscribe
    mail_domain: str | None = None        # mailto: unsubscribe@DOMAIN (default: hostname)
    scope: str = "global"                 # "global" or "sender-domain"


@dataclass(frozen=True)
class BouncesConfig:
    """[bounces]: where reports come back, VERP, and what soft bounces add up to."""

    domain: str | None = None             # bounce domain: relay takes in mail to it
    verp: bool = False                    # per-recipient return path bounces+TOKEN@domain
    secret_env: str = "RELAY_BOUNCE_SECRET"
    soft_limit: int = 5                   # consecutive soft bounces ...
    soft_days: float = 3 * 86400.0        # ... spread over at least this long: suppress
    rules: Path | None = None             # the admin's own classifier rules (TOML)
    report_dir: Path = Path("var/reports")


@dataclass(frozen=True)
class SuppressionConfig:
    path: Path = Path("var/suppression.db")
    at_rcpt: str = "reject"               # "reject" (550 5.7.1) or "drop" (accept, event)


@dataclass(frozen=True)
class LogConfig:
    file: str = "-"
    format: str = "postfix"


@dataclass(frozen=True)
class DnsConfig:
    nameservers: tuple[tuple[str, int], ...] = ()


@dataclass(frozen=True)
class DkimKeyConfig:
    domain: str
    selector: str
    key: Path


@dataclass(frozen=True)
class AppConfig:
    name: str
    password_env: str | None = None
    password_hash: str | None = None
    from_domains: tuple[str, ...] = ()
    stream: str = "transactional"
    rate: tuple[float, float] | None = None              # messages per period
    recipient_rate: tuple[float, float] | None = None    # recipients per period
    require_dkim: bool = False
    dkim_fallback_domain: str | None = None   # sign with this domain's key when the From
                                              # domain has none
    webhook_url: str | None = None            # events of this app are POSTed here as JSON
    webhook_secret_env: str | None = None     # HMAC-SHA256 key of X-Relay-Signature


@dataclass(frozen=True)
class Config:
    path: Path | None = None
    server: ServerConfig = field(default_factory=ServerConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    outbound: OutboundConfig = field(default_factory=OutboundConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    unsubscribe: UnsubscribeConfig = field(default_factory=UnsubscribeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    headers: HeadersConfig = field(default_factory=HeadersConfig)
    suppression: SuppressionConfig = field(default_factory=SuppressionConfig)
    bounces: BouncesConfig = field(default_factory=BouncesConfig)
    dkim: tuple[DkimKeyConfig, ...] = ()
    apps: tuple[AppConfig, ...] = ()


# --- the reader --------------------------------------------------------------------------

_MISSING = object()


class _Section:
    """Takes keys out of one table, converting them; records one problem per bad key."""

    def __init__(self, loader: _Loader, name: str, table: object):
        self.loader = loader
        self.name = name
        if not isinstance(table, dict):
            loader.problem(name, f"must be a table, got {type(table).__name__}")
            table = {}
        self.table: dict[str, Any] = dict(table)

    def key(self, key: str) -> str:
        return f"{self.name}.{key}"

    def get(self, key: str, default: T, convert: Callable[[Any], T]) -> T:
        raw = self.table.pop(key, _MISSING)
        if raw is _MISSING:
            return default
        try:
            return convert(raw)
        except (ValueError, TypeError) as exc:
            self.loader.problem(self.key(key), str(exc))
            return default

    def required(self, key: str, convert: Callable[[Any], T]) -> T | None:
        if key not in self.table:
            self.loader.problem(self.key(key), "is required")
            return None
        return self.get(key, None, convert)  # type: ignore[arg-type]

    def done(self) -> None:
        for key in sorted(self.table):
            self.loader.problem(self.key(key), "unknown key")


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value


def _nonempty_str(value: object) -> str:
    s = _str(value)
    if not s.strip():
        raise ValueError("must not be empty")
    return s


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {value!r}")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected a whole number of at least 1, got {value!r}")
    return value


def _str_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return tuple(value)


def _port(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number from 1 to 65535, got {value!r}")
    return value


def _ip_address(value: object) -> str:
    s = _str(value)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ValueError(f"{s!r} is not an IP address") from None


def _domain_list(value: object) -> tuple[str, ...]:
    items = _str_list(value)
    if not items:
        raise ValueError("needs at least one domain")
    return tuple(_domain(i.rstrip(".")) for i in items)


_MX_ONLY_DESTINATION_KEYS = ("max_messages_per_connection", "max_recipients", "idle_timeout",
                             "tls", "source_address", "helo_name", "mx_suffixes")


def _one_of(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value  # type: ignore[return-value]

    return convert


def _env_name(value: object) -> str:
    s = _str(value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", s):
        raise ValueError(f"{s!r} is not an environment variable name")
    return s


def _url(value: object) -> str:
    s = _str(value)
    if not re.match(r"^https?://[^\s/]+(/\S*)?$", s):
        raise ValueError(f"{s!r} is not an http(s) URL")
    return s


def _hostname(value: object) -> str:
    s = _str(value)
    if not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", s):
        raise ValueError(f"{s!r} is not a valid host name")
    return s


def _domain(value: object) -> str:
    return _hostname(value).lower()


def _password_hash(value: object) -> str:
    """pbkdf2_sha256$ITERATIONS$SALT$HASH, as `relay app hash-password` prints it."""
    s = _str(value)
    parts = s.split("$")
    if len(parts) != 4 or parts[0] != "pbkdf2_sha256" or not parts[1].isdigit():
        raise ValueError("expected pbkdf2_sha256$ITERATIONS$SALT$HASH "
                         "(make one with `relay app hash-password`)")
    return s


class _Loader:
    def __init__(self, path: Path | None):
        self.path = path
        self.base = path.parent if path else Path.cwd()
        self.problems: list[str] = []

    def problem(self, key: str, message: str) -> None:
        where = str(self.path) if self.path else "relay.toml"
        self.problems.append(f"{where}: {key}: {message}")

    def path_value(self, value: object) -> Path:
        p = Path(_nonempty_str(value))
        return p if p.is_absolute() else self.base / p

    def readable_file(self, value: object) -> Path:
        p = self.path_value(value)
        if not p.is_file() or not os.access(p, os.R_OK):
            raise ValueError(f"cannot read file {str(p)!r}")
        return p

    # -- sections --

    def server(self, raw: object) -> ServerConfig:
        s = _Section(self, "server", raw)
        d = ServerConfig()
        # Pairing is judged on what the file says, so a bad value is reported once, not twice.
        has_cert, has_key = "tls_cert" in s.table, "tls_key" in s.table

        def listen(v: object) -> tuple[tuple[str, int], ...]:
            items = _str_list(v)
            if not items:
                raise ValueError("needs at least one HOST:PORT")
            return tuple(parse_hostport(i) for i in items)

        def networks(v: object) -> tuple[IPNetwork, ...]:
            out = []
            for item in _str_list(v):
                try:
                    out.append(ipaddress.ip_network(item, strict=False))
                except ValueError:
                    raise ValueError(f"{item!r} is not an IP network") from None
            return tuple(out)

        cfg = ServerConfig(
            hostname=s.get("hostname", d.hostname, _hostname),
            listen=s.get("listen", d.listen, listen),
            listen_tls=s.get("listen_tls", (), lambda v: tuple(parse_hostport(i)
                                                               for i in _str_list(v))),
            tls_cert=s.get("tls_cert", None, self.readable_file),
            tls_key=s.get("tls_key", None, self.readable_file),
            mynetworks=s.get("mynetworks", d.mynetworks, networks),
            default_stream=s.get("default_stream", d.default_stream, _one_of(*STREAMS)),
            auth_require_tls=s.get("auth_require_tls", d.auth_require_tls, _bool),
            max_message_size=s.get("max_message_size", d.max_message_size, parse_size),
            max_recipients=s.get("max_recipients", d.max_recipients, _positive_int),
            max_sessions=s.get("max_sessions", d.max_sessions, _positive_int),
            max_data_memory=s.get("max_data_memory", d.max_data_memory, parse_size),
            command_timeout=s.get("command_timeout", d.command_timeout, parse_duration),
            data_timeout=s.get("data_timeout", d.data_timeout, parse_duration),
            auth_max_failures=s.get("auth_max_failures", d.auth_max_failures, _positive_int),
            auth_lockout=s.get("auth_lockout", d.auth_lockout, parse_duration),
            client_message_rate=s.get("client_message_rate", None, parse_rate),
            client_recipient_rate=s.get("client_recipient_rate", None, parse_rate),
        )
        if cfg.listen_tls and cfg.tls_cert is None:
            self.problem("server.listen_tls", "implicit TLS listeners need tls_cert and tls_key")
        if has_cert != has_key:
            self.problem("server.tls_cert" if has_key else "server.tls_key",
                         "tls_cert and tls_key go together")
        if cfg.max_data_memory < cfg.max_message_size:
            self.problem("server.max_data_memory", "must be at least max_message_size")
        if cfg.max_message_size < 1024:
            self.problem("server.max_message_size", "must be at least 1KiB")
        s.done()
        return cfg

    def queue(self, raw: object) -> QueueConfig:
        s = _Section(self, "queue", raw)
        d = QueueConfig()

        def retry(v: object) -> tuple[float, ...]:
            steps = tuple(parse_duration(i) for i in _str_list(v))
            if not steps:
                raise ValueError("needs at least one duration")
            return steps

        cfg = QueueConfig(
            path=s.get("path", self.base / d.path, self.path_value),
            retry=s.get("retry", d.retry, retry),
            lifetime=s.get("lifetime", d.lifetime, parse_duration),
            group_commit_window=s.get("group_commit_window", d.group_commit_window,
                                      parse_duration),
        )
        s.done()
        return cfg

    def outbound(self, raw: object) -> OutboundConfig:
        s = _Section(self, "outbound", raw)
        d = OutboundConfig()
        # Presence is judged before s.get() takes the keys out of the table.
        has_smarthost = "smarthost" in s.table
        has_user, has_password = "username_env" in s.table, "password_env" in s.table
        mode = s.get("mode", d.mode, _one_of("smarthost", "mx"))
        smarthost = s.get("smarthost", None, lambda v: parse_hostport(v, 25))
        if mode == "smarthost" and not has_smarthost:
            self.problem("outbound.smarthost", "is required when mode = \"smarthost\"")
        cfg = OutboundConfig(
            mode=mode,
            smarthost=smarthost,
            tls=s.get("tls", d.tls, _one_of("none", "opportunistic", "starttls", "tls")),
            tls_verify=s.get("tls_verify", d.tls_verify, _bool),
            tls_ca_file=s.get("tls_ca_file", None, self.readable_file),
            username_env=s.get("username_env", None, _env_name),
            password_env=s.get("password_env", None, _env_name),
            max_connections=s.get("max_connections", d.max_connections, _positive_int),
            max_messages_per_connection=s.get("max_messages_per_connection",
                                              d.max_messages_per_connection, _positive_int),
            idle_timeout=s.get("idle_timeout", d.idle_timeout, parse_duration),
            connect_timeout=s.get("connect_timeout", d.connect_timeout, parse_duration),
            command_timeout=s.get("command_timeout", d.command_timeout, parse_duration),
            helo_name=s.get("helo_name", None, _hostname),
            destinations=self.destinations(s.table.pop("destination", {}), mode),
            mx_port=s.get("mx_port", d.mx_port, _port),
            max_recipients=s.get("max_recipients", d.max_recipients, _positive_int),
            source_address=s.get("source_address", None, _ip_address),
            mta_sts=s.get("mta_sts", d.mta_sts, _bool),
            throttle_cooldown=s.get("throttle_cooldown", d.throttle_cooldown, parse_duration),
            pause_after=s.get("pause_after", d.pause_after, _positive_int),
            pause_for=s.get("pause_for", d.pause_for, parse_duration),
            delivery_process=s.get("delivery_process", d.delivery_process, _bool),
        )
        if cfg.delivery_process and mode != "smarthost":
            self.problem("outbound.delivery_process",
                         "is only for mode = \"smarthost\" (direct delivery paces destinations "
                         "in the scheduler's process)")
        if has_user != has_password:
            self.problem("outbound.password_env" if has_user
                         else "outbound.username_env", "username_env and password_env go together")
        for key in ("username_env", "password_env"):
            name = getattr(cfg, key)
            if name is not None and name not in os.environ:
                self.problem(f"outbound.{key}", f"environment variable {name} is not set")
        s.done()
        return cfg

    def destinations(self, raw: object, mode: str) -> tuple[DestinationConfig, ...]:
        if not isinstance(raw, dict):
            self.problem("outbound.destination", "must be a table of tables: "
                         "[outbound.destination.\"gmail.com\"]")
            return ()
        out = []
        for name, table in raw.items():
            s = _Section(self, f"outbound.destination.{name!r}", table)
            try:
                domain = _domain(name)
            except (TypeError, ValueError) as exc:
                self.problem(f"outbound.destination.{name!r}", str(exc))
                continue
            if mode != "mx":
                # These act on direct delivery only; accepting them silently would let an
                # admin believe they do something.
                for key in _MX_ONLY_DESTINATION_KEYS:
                    if key in s.table:
                        s.table.pop(key)
                        self.problem(s.key(key), "is only used with outbound.mode = \"mx\"")
            out.append(DestinationConfig(
                name=domain,
                rate=s.get("rate", None, parse_rate),
                max_connections=s.get("max_connections", None, _positive_int),
                max_messages_per_connection=s.get("max_messages_per_connection", None,
                                                  _positive_int),
                max_recipients=s.get("max_recipients", None, _positive_int),
                idle_timeout=s.get("idle_timeout", None, parse_duration),
                tls=s.get("tls", None, _one_of(*DESTINATION_TLS)),
                source_address=s.get("source_address", None, _ip_address),
                helo_name=s.get("helo_name", None, _hostname),
                mx_suffixes=s.get("mx_suffixes", (), _domain_list),
            ))
            s.done()
        return tuple(out)

    def headers(self, raw: object) -> HeadersConfig:
        s = _Section(self, "headers", raw)
        d = HeadersConfig()

        def names(v: object) -> tuple[str, ...]:
            items = _str_list(v)
            for item in items:
                if not re.fullmatch(r"[!-9;-~]+\*?", item):
                    raise ValueError(f"{item!r} is not a header name (a trailing * is a prefix)")
            return items

        cfg = HeadersConfig(
            remove=s.get("remove", d.remove, names),
            add_message_id=s.get("add_message_id", d.add_message_id, _bool),
            add_date=s.get("add_date", d.add_date, _bool),
            feedback_id=s.get("feedback_id", d.feedback_id, _bool),
        )
        s.done()
        return cfg

    def http(self, raw: object) -> HttpConfig:
        s = _Section(self, "http", raw)
        d = HttpConfig()

        def url(v: object) -> str:
            u = _str(v)
            if not re.match(r"^https?://[^\s/]+(/\S*)?$", u):
                raise ValueError(f"{u!r} is not an http(s) URL")
            return u.rstrip("/")

        cfg = HttpConfig(
            listen=s.get("listen", d.listen, lambda v: None if v == "" else parse_hostport(v)),
            public_url=s.get("public_url", d.public_url, url),
            max_body=s.get("max_body", d.max_body, parse_size),
        )
        s.done()
        return cfg

    def unsubscribe(self, raw: object) -> UnsubscribeConfig:
        s = _Section(self, "unsubscribe", raw)
        d = UnsubscribeConfig()
        cfg = UnsubscribeConfig(
            secret_env=s.get("secret_env", d.secret_env, _env_name),
            token_lifetime=s.get("token_lifetime", d.token_lifetime, parse_duration),
            existing_header=s.get("existing_header", d.existing_header,
                                  _one_of("replace", "keep", "merge")),
            mail_domain=s.get("mail_domain", None, _domain),
            scope=s.get("scope", d.scope, _one_of("global", "sender-domain")),
        )
        s.done()
        return cfg

    def bounces(self, raw: object) -> BouncesConfig:
        s = _Section(self, "bounces", raw)
        d = BouncesConfig()
        cfg = BouncesConfig(
            domain=s.get("domain", None, _domain),
            verp=s.get("verp", d.verp, _bool),
            secret_env=s.get("secret_env", d.secret_env, _env_name),
            soft_limit=s.get("soft_limit", d.soft_limit, _positive_int),
            soft_days=s.get("soft_days", d.soft_days, parse_duration),
            rules=s.get("rules", None, self.readable_file),
            report_dir=s.get("report_dir", self.base / d.report_dir, self.path_value),
        )
        if cfg.verp and cfg.domain is None:
            self.problem("bounces.verp", "needs bounces.domain")
        if cfg.verp and cfg.secret_env not in os.environ:
            self.problem("bounces.secret_env",
                         f"environment variable {cfg.secret_env} is not set (VERP tokens)")
        s.done()
        return cfg

    def suppression(self, raw: object) -> SuppressionConfig:
        s = _Section(self, "suppression", raw)
        cfg = SuppressionConfig(
            path=s.get("path", self.base / SuppressionConfig.path, self.path_value),
            at_rcpt=s.get("at_rcpt", "reject", _one_of("reject", "drop")),
        )
        s.done()
        return cfg

    def log(self, raw: object) -> LogConfig:
        s = _Section(self, "log", raw)
        file = s.get("file", "-", _nonempty_str)
        if file != "-":
            file = str(self.path_value(file))
        cfg = LogConfig(file=file, format=s.get("format", "postfix", _one_of("postfix", "json")))
        s.done()
        return cfg

    def dns(self, raw: object) -> DnsConfig:
        s = _Section(self, "dns", raw)
        cfg = DnsConfig(nameservers=s.get(
            "nameservers", (), lambda v: tuple(parse_hostport(i, 53) for i in _str_list(v))))
        s.done()
        return cfg

    def dkim(self, raw: object) -> tuple[DkimKeyConfig, ...]:
        if not isinstance(raw, list):
            self.problem("dkim", "must be an array of tables: [[dkim]]")
            return ()
        out = []
        for i, item in enumerate(raw):
            s = _Section(self, f"dkim[{i}]", item)
            domain = s.required("domain", _domain)
            selector = s.required("selector", _hostname)
            key = s.required("key", self.readable_file)
            s.done()
            if domain and selector and key:
                out.append(DkimKeyConfig(domain, selector, key))
        return tuple(out)

    def apps(self, raw: object) -> tuple[AppConfig, ...]:
        if not isinstance(raw, list):
            self.problem("app", "must be an array of tables: [[app]]")
            return ()
        out = []
        names: set[str] = set()
        for i, item in enumerate(raw):
            s = _Section(self, f"app[{i}]", item)
            name = s.required("name", _nonempty_str)
            # Pairing is judged on what the file says, so a bad value is reported once.
            has_url, has_secret = "webhook_url" in s.table, "webhook_secret_env" in s.table
            app = AppConfig(
                name=name or "",
                password_env=s.get("password_env", None, _env_name),
                password_hash=s.get("password_hash", None, _password_hash),
                from_domains=s.get("from_domains", (),
                                   lambda v: tuple(_domain(d) for d in _str_list(v))),
                stream=s.get("stream", "transactional", _one_of(*STREAMS)),
                rate=s.get("rate", None, parse_rate),
                recipient_rate=s.get("recipient_rate", None, parse_rate),
                require_dkim=s.get("require_dkim", False, _bool),
                dkim_fallback_domain=s.get("dkim_fallback_domain", None, _domain),
                webhook_url=s.get("webhook_url", None, _url),
                webhook_secret_env=s.get("webhook_secret_env", None, _env_name),
            )
            s.done()
            if (app.password_env is None) == (app.password_hash is None):
                self.problem(f"app[{i}].password_env",
                             "give exactly one of password_env and password_hash")
            elif app.password_env is not None and app.password_env not in os.environ:
                self.problem(f"app[{i}].password_env",
                             f"environment variable {app.password_env} is not set")
            if has_url != has_secret:
                self.problem(f"app[{i}].webhook_secret_env" if has_url
                             else f"app[{i}].webhook_url",
                             "webhook_url and webhook_secret_env go together")
            elif app.webhook_secret_env is not None and not os.environ.get(
                    app.webhook_secret_env):
                self.problem(f"app[{i}].webhook_secret_env",
                             f"environment variable {app.webhook_secret_env} is not set")
            if name in names:
                self.problem(f"app[{i}].name", f"duplicate app name {name!r}")
            names.add(app.name)
            out.append(app)
        return tuple(out)


_SECTIONS = ("server", "queue", "outbound", "http", "unsubscribe", "suppression", "bounces",
             "log", "dns", "headers", "dkim", "app")


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem."""
    loader = _Loader(path)
    for key in sorted(set(data) - set(_SECTIONS)):
        loader.problem(key, "unknown section")
    cfg = Config(
        path=path,
        server=loader.server(data.get("server", {})),
        queue=loader.queue(data.get("queue", {})),
        outbound=loader.outbound(data.get("outbound", {})),
        http=loader.http(data.get("http", {})),
        unsubscribe=loader.unsubscribe(data.get("unsubscribe", {})),
        log=loader.log(data.get("log", {})),
        dns=loader.dns(data.get("dns", {})),
        headers=loader.headers(data.get("headers", {})),
        suppression=loader.suppression(data.get("suppression", {})),
        bounces=loader.bounces(data.get("bounces", {})),
        dkim=loader.dkim(data.get("dkim", [])),
        apps=loader.apps(data.get("app", [])),
    )
    marketing = cfg.server.default_stream == "marketing" or any(
        a.stream == "marketing" for a in cfg.apps)
    if marketing and cfg.unsubscribe.secret_env not in os.environ:
        loader.problem("unsubscribe.secret_env",
                       f"environment variable {cfg.unsubscribe.secret_env} is not set; the "
                       "marketing stream needs it to sign List-Unsubscribe tokens")
    if loader.problems:
        raise ConfigError(loader.problems)
    return cfg


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a relay.toml; raise ConfigError with one line per problem."""
    p = Path(path).resolve()
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError([f"{p}: not UTF-8 text"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{p}: TOML syntax error: {exc}"]) from None
    except RecursionError:   # tomllib recurses once per level of nested arrays/tables
        raise ConfigError([f"{p}: TOML syntax error: arrays or tables nested too deeply"]) \
            from None
    return parse_config(data, p)


def default_config_path() -> Path:
    """--config defaults to $RELAY_CONFIG, then ./relay.toml."""
    return Path(os.environ.get("RELAY_CONFIG") or "relay.toml")
