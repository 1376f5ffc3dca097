"""relay.toml: the shipped file loads; every bad input is one problem line naming the key."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from relay.config import (
    ConfigError,
    load_config,
    parse_duration,
    parse_hostport,
    parse_rate,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[1]
OUTBOUND = '[outbound]\nsmarthost = "127.0.0.1:9"\n'
APP = '[[app]]\npassword_env = "RELAY_TEST_APP_PASSWORD"\n'


def write(tmp_path: Path, text: str) -> Path:
    (tmp_path / "cert.pem").write_text("not checked here\n")
    (tmp_path / "key.pem").write_text("not checked here\n")
    (tmp_path / "dkim.pem").write_text("not checked here\n")
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def test_the_shipped_relay_toml_loads() -> None:
    cfg = load_config(ROOT / "relay.toml")
    assert cfg.path == ROOT / "relay.toml"
    assert cfg.server.listen == (("127.0.0.1", 2525),)
    assert cfg.server.mynetworks == (ipaddress.ip_network("127.0.0.0/8"),)
    assert cfg.server.max_message_size == 25 * 1024 * 1024
    assert cfg.queue.path == ROOT / "var" / "relay.db"
    assert cfg.queue.retry == (60.0, 300.0, 900.0, 3600.0, 14400.0)
    assert cfg.queue.lifetime == 5 * 86400.0
    assert (cfg.outbound.mode, cfg.outbound.smarthost) == ("smarthost", ("127.0.0.1", 2526))
    assert cfg.http.listen == ("127.0.0.1", 8025)


def test_a_minimal_file_gets_the_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, OUTBOUND + '[http]\nlisten = ""\n'))
    assert cfg.http.listen is None
    assert cfg.server.listen == (("127.0.0.1", 2525),)
    assert cfg.outbound.smarthost == ("127.0.0.1", 9)
    assert cfg.dkim == () and cfg.apps == ()


# (case id, the file, the key that the one problem line must name)
BAD = [
    ("server-unknown", '[server]\nlisten_on = ["127.0.0.1:25"]\n' + OUTBOUND,
     "server.listen_on"),
    ("queue-unknown", '[queue]\nretries = ["1m"]\n' + OUTBOUND, "queue.retries"),
    ("outbound-unknown", OUTBOUND + "max_conections = 3\n", "outbound.max_conections"),
    ("http-unknown", OUTBOUND + '[http]\nport = 80\n', "http.port"),
    ("unsubscribe-unknown", OUTBOUND + '[unsubscribe]\nsecret = "x"\n', "unsubscribe.secret"),
    ("log-unknown", OUTBOUND + '[log]\nlevel = "debug"\n', "log.level"),
    ("dns-unknown", OUTBOUND + '[dns]\nresolvers = []\n', "dns.resolvers"),
    ("dkim-unknown", OUTBOUND + '[[dkim]]\ndomain = "example.com"\nselector = "s1"\n'
     'key = "dkim.pem"\nalgorithm = "rsa"\n', "dkim[0].algorithm"),
    ("app-unknown", OUTBOUND + APP + 'name = "shop"\npassword = "secret"\n', "app[0].password"),
    ("unknown-section", OUTBOUND + '[smtpd]\nx = 1\n', "smtpd"),
    ("section-not-a-table", 'server = 1\n' + OUTBOUND, "server"),
    ("dkim-not-an-array", OUTBOUND + '[dkim]\ndomain = "example.com"\n', "dkim"),
    ("duration-without-unit", '[server]\ncommand_timeout = "30"\n' + OUTBOUND,
     "server.command_timeout"),
    ("duration-as-number", OUTBOUND + "idle_timeout = 30\n", "outbound.idle_timeout"),
    ("duration-bad-unit", '[queue]\nlifetime = "5 days"\n' + OUTBOUND, "queue.lifetime"),
    ("retry-step-without-unit", '[queue]\nretry = ["1m", "30"]\n' + OUTBOUND, "queue.retry"),
    ("retry-empty", '[queue]\nretry = []\n' + OUTBOUND, "queue.retry"),
    ("size-bad-unit", '[server]\nmax_message_size = "25XB"\n' + OUTBOUND,
     "server.max_message_size"),
    ("size-too-small", '[server]\nmax_message_size = "1000"\n' + OUTBOUND,
     "server.max_message_size"),
    ("listen-no-port", '[server]\nlisten = ["x"]\n' + OUTBOUND, "server.listen"),
    ("listen-not-a-list", '[server]\nlisten = "x"\n' + OUTBOUND, "server.listen"),
    ("listen-empty", '[server]\nlisten = []\n' + OUTBOUND, "server.listen"),
    ("listen-bad-port", '[server]\nlisten = ["127.0.0.1:99999"]\n' + OUTBOUND,
     "server.listen"),
    ("mynetworks-bad", '[server]\nmynetworks = ["10.0.0.0/8", "intranet"]\n' + OUTBOUND,
     "server.mynetworks"),
    ("hostname-bad", '[server]\nhostname = "relay_1.example"\n' + OUTBOUND, "server.hostname"),
    ("stream-bad", '[server]\ndefault_stream = "bulk"\n' + OUTBOUND, "server.default_stream"),
    ("max-recipients-zero", '[server]\nmax_recipients = 0\n' + OUTBOUND,
     "server.max_recipients"),
    ("bool-as-string", '[server]\nauth_require_tls = "yes"\n' + OUTBOUND,
     "server.auth_require_tls"),
    ("tls-cert-without-key", '[server]\ntls_cert = "cert.pem"\n' + OUTBOUND,
     "server.tls_key"),
    ("tls-key-without-cert", '[server]\ntls_key = "key.pem"\n' + OUTBOUND, "server.tls_cert"),
    ("tls-cert-unreadable", '[server]\ntls_cert = "missing/cert.pem"\ntls_key = "key.pem"\n'
     + OUTBOUND, "server.tls_cert"),
    ("tls-cert-is-a-folder", '[server]\ntls_cert = "."\ntls_key = "key.pem"\n' + OUTBOUND,
     "server.tls_cert"),
    ("smarthost-missing", '[outbound]\ntls = "none"\n', "outbound.smarthost"),
    ("outbound-missing", '[http]\nlisten = ""\n', "outbound.smarthost"),
    ("smarthost-bad-port", '[outbound]\nsmarthost = "mail.example.net:smtp"\n',
     "outbound.smarthost"),
    ("smarthost-no-host", '[outbound]\nsmarthost = ":25"\n', "outbound.smarthost"),
    ("mx-port-zero", '[outbound]\nmode = "mx"\nmx_port = 0\n', "outbound.mx_port"),
    ("mx-source-address-bad", '[outbound]\nmode = "mx"\nsource_address = "eth0"\n',
     "outbound.source_address"),
    ("mx-destination-tls-bad", ('[outbound]\nmode = "mx"\n[outbound.destination."x.test"]\n'
     'tls = "always"\n'), "outbound.destination.'x.test'.tls"),
    ("mx-suffixes-bad", ('[outbound]\nmode = "mx"\n[outbound.destination."google"]\n'
     'mx_suffixes = ["google com"]\n'), "outbound.destination.'google'.mx_suffixes"),
    ("mx-key-in-smarthost-mode", OUTBOUND + '[outbound.destination."google"]\n'
     'mx_suffixes = ["google.com"]\n', "outbound.destination.'google'.mx_suffixes"),
    ("mode-bad", OUTBOUND + 'mode = "direct"\n', "outbound.mode"),
    ("outbound-tls-bad", OUTBOUND + 'tls = "yes"\n', "outbound.tls"),
    ("tls-ca-file-unreadable", OUTBOUND + 'tls_ca_file = "nope.pem"\n', "outbound.tls_ca_file"),
    ("username-without-password", OUTBOUND + 'username_env = "RELAY_TEST_SMARTHOST_USER"\n',
     "outbound.password_env"),
    ("password-without-username", OUTBOUND + 'password_env = "RELAY_TEST_SMARTHOST_USER"\n',
     "outbound.username_env"),
    ("credentials-env-not-set", OUTBOUND + 'username_env = "RELAY_TEST_SMARTHOST_USER"\n'
     'password_env = "RELAY_TEST_NOT_SET_ANYWHERE"\n', "outbound.password_env"),
    ("env-name-bad", OUTBOUND + '[unsubscribe]\nsecret_env = "MY-SECRET"\n',
     "unsubscribe.secret_env"),
    ("http-listen-bad", OUTBOUND + '[http]\nlisten = "localhost"\n', "http.listen"),
    ("public-url-bad", OUTBOUND + '[http]\npublic_url = "ftp://x"\n', "http.public_url"),
    ("log-format-bad", OUTBOUND + '[log]\nformat = "syslog"\n', "log.format"),
    ("log-file-empty", OUTBOUND + '[log]\nfile = ""\n', "log.file"),
    ("nameserver-bad", OUTBOUND + '[dns]\nnameservers = ["127.0.0.1:dns"]\n',
     "dns.nameservers"),
    ("dkim-missing-selector", OUTBOUND + '[[dkim]]\ndomain = "example.com"\nkey = "dkim.pem"\n',
     "dkim[0].selector"),
    ("dkim-key-unreadable", OUTBOUND + '[[dkim]]\ndomain = "example.com"\nselector = "s1"\n'
     'key = "keys/none.pem"\n', "dkim[0].key"),
    ("second-dkim-bad-domain", OUTBOUND + '[[dkim]]\ndomain = "example.com"\nselector = "s1"\n'
     'key = "dkim.pem"\n[[dkim]]\ndomain = "bad domain"\nselector = "s2"\nkey = "dkim.pem"\n',
     "dkim[1].domain"),
    ("app-missing-name", OUTBOUND + APP + 'from_domains = ["example.com"]\n', "app[0].name"),
    ("app-duplicate-name", OUTBOUND + APP + 'name = "shop"\n' + APP + 'name = "shop"\n',
     "app[1].name"),
    ("app-stream-bad", OUTBOUND + APP + 'name = "shop"\nstream = "news"\n', "app[0].stream"),
    ("app-without-password", OUTBOUND + '[[app]]\nname = "shop"\n', "app[0].password_env"),
]


@pytest.mark.parametrize(("text", "key"), [pytest.param(t, k, id=i) for i, t, k in BAD])
def test_each_bad_input_is_one_problem_naming_the_file_and_key(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, key: str) -> None:
    monkeypatch.setenv("RELAY_TEST_SMARTHOST_USER", "relay")
    monkeypatch.setenv("RELAY_TEST_APP_PASSWORD", "secret")
    monkeypatch.delenv("RELAY_TEST_NOT_SET_ANYWHERE", raising=False)
    path = write(tmp_path, text)
    problems = problems_of(path)
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{path}: {key}: "), problems
    assert len(problems[0]) > len(f"{path}: {key}: ") + 5   # and says what is wrong


def test_every_problem_of_a_file_is_reported_together(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_TEST_NOT_SET_ANYWHERE", raising=False)
    path = write(tmp_path, """
[server]
listen = ["x"]
mynetworks = ["nowhere"]
max_message_size = "25XB"
colour = "blue"

[queue]
lifetime = "30"

[outbound]
tls = "sometimes"
username_env = "RELAY_TEST_NOT_SET_ANYWHERE"

[[dkim]]
domain = "example.com"
key = "dkim.pem"

[extras]
""")
    keys = [line.split(": ")[1] for line in problems_of(path)]
    assert sorted(keys) == sorted([
        "extras", "server.listen", "server.mynetworks", "server.max_message_size",
        "server.colour", "queue.lifetime", "outbound.smarthost", "outbound.tls",
        "outbound.username_env", "outbound.password_env", "dkim[0].selector"])


@pytest.mark.parametrize(("text", "what"), [
    ('[server\nlisten = ["x"]\n', "TOML syntax error"),
    ("[server]\nhostname = \"caf\xe9\"\n", "not UTF-8"),
])
def test_unparseable_files(tmp_path: Path, text: str, what: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_bytes(text.encode("latin-1"))
    (problem,) = problems_of(path)
    assert problem.startswith(f"{path}: {what}")


def test_a_missing_file_is_one_problem(tmp_path: Path) -> None:
    (problem,) = problems_of(tmp_path / "nope.toml")
    assert problem.startswith(f"{tmp_path / 'nope.toml'}: cannot read")


def test_relative_paths_resolve_against_the_config_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc" / "relay"
    (folder / "tls").mkdir(parents=True)
    (folder / "tls" / "cert.pem").write_text("x")
    (folder / "tls" / "key.pem").write_text("x")
    (folder / "dkim").mkdir()
    (folder / "dkim" / "example.com.s1.pem").write_text("x")
    (folder / "relay.toml").write_text("""
[server]
tls_cert = "tls/cert.pem"
tls_key = "tls/key.pem"
[queue]
path = "var/q.db"
[outbound]
smarthost = "127.0.0.1:9"
tls_ca_file = "tls/cert.pem"
[log]
file = "log/relay.log"
[[dkim]]
domain = "Example.COM"
selector = "s1"
key = "dkim/example.com.s1.pem"
""")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "etc" / "relay" / "relay.toml")
    folder = folder.resolve()
    assert cfg.path == folder / "relay.toml"
    assert cfg.server.tls_cert == folder / "tls" / "cert.pem"
    assert cfg.server.tls_key == folder / "tls" / "key.pem"
    assert cfg.queue.path == folder / "var" / "q.db"
    assert cfg.outbound.tls_ca_file == folder / "tls" / "cert.pem"
    assert cfg.log.file == str(folder / "log" / "relay.log")
    (dkim,) = cfg.dkim
    assert (dkim.domain, dkim.selector, dkim.key) == (
        "example.com", "s1", folder / "dkim" / "example.com.s1.pem")


def test_default_queue_path_is_beside_the_config(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, OUTBOUND))
    assert cfg.queue.path == tmp_path.resolve() / "var" / "relay.db"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, f'[queue]\npath = "{tmp_path / "abs.db"}"\n' + OUTBOUND))
    assert cfg.queue.path == tmp_path / "abs.db"


def test_config_objects_are_frozen(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, OUTBOUND))
    with pytest.raises(AttributeError):
        cfg.server.hostname = "other.example"  # type: ignore[misc]


# --- the value parsers -------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "seconds"), [
    ("250ms", 0.25), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0), ("2d", 172800.0),
    ("1w", 604800.0), ("1.5h", 5400.0), (" 10 s ", 10.0), ("0s", 0.0),
])
def test_parse_duration(value: str, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    "30", "", "s", "5 days", "1y", "-5s", "5S", "1h30m", "5mm", 30, 1.5, None, True, ["5s"],
])
def test_parse_duration_refuses(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_duration(value)


@pytest.mark.parametrize(("value", "size"), [
    ("25MiB", 25 * 1024**2), ("10KB", 10_000), ("10kb", 10_000), ("10KiB", 10_240),
    ("1GiB", 1024**3), ("2GB", 2 * 1000**3), ("3MB", 3_000_000), ("10240", 10_240),
    ("512B", 512), ("1k", 1024), ("1M", 1024**2), (" 7 MiB ", 7 * 1024**2), (10240, 10_240),
    (0, 0),
])
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [
    "25XB", "", "MiB", "1.5MiB", "-1", "25 Mi B", -1, True, 2.5, None, ["1KB"],
])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_size(value)


@pytest.mark.parametrize(("value", "rate"), [
    ("20/s", (20.0, 1.0)), ("1000/h", (1000.0, 3600.0)), ("5/10s", (5.0, 10.0)),
    ("0.5/s", (0.5, 1.0)), ("100 / 2m", (100.0, 120.0)), ("7/d", (7.0, 86400.0)),
    ("3/500ms", (3.0, 0.5)),
])
def test_parse_rate(value: str, rate: tuple[float, float]) -> None:
    assert parse_rate(value) == rate


@pytest.mark.parametrize("value", [
    "20", "20/", "/s", "20/w", "0/s", "5/0s", "x/s", "20 per s", 20, None,
])
def test_parse_rate_refuses(value: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        parse_rate(value)


@pytest.mark.parametrize(("value", "default", "result"), [
    ("127.0.0.1:2525", None, ("127.0.0.1", 2525)),
    ("mail.example.net:587", 25, ("mail.example.net", 587)),
    ("mail.example.net", 25, ("mail.example.net", 25)),
    ("[::1]:25", None, ("::1", 25)),
    ("[2001:db8::1]", 25, ("2001:db8::1", 25)),
    ("::1", 53, ("::1", 53)),
    ("127.0.0.1:0", None, ("127.0.0.1", 0)),
    ("127.0.0.1:65535", None, ("127.0.0.1", 65535)),
])
def test_parse_hostport(value: str, default: int | None, result: tuple[str, int]) -> None:
    assert parse_hostport(value, default) == result


@pytest.mark.parametrize(("value", "default"), [
    ("x", None), ("mail.example.net", None), ("[::1]", None), ("::1", None),
    ("host:65536", None), ("host:-1", 25), ("host:smtp", 25), (":25", None), (":25", 25),
    ("", 25), (None, 25), (25, 25),
])
def test_parse_hostport_refuses(value: object, default: int | None) -> None:
    with pytest.raises(ValueError, match=r"."):
        parse_hostport(value, default)
