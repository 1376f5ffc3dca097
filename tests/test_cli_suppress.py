"""`relay suppress ...`, run for real as a subprocess against a real store file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay.suppression import GLOBAL, Reason
from relay.suppression.store import SQLiteSuppressionStore

CONFIG = """\
[queue]
path = "var/relay.db"
[outbound]
smarthost = "127.0.0.1:9"
[http]
listen = ""
"""


def relay(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "relay", "suppress", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "relay.toml").write_text(CONFIG)
    return tmp_path


def db(home: Path) -> Path:
    return home / "var" / "suppression.db"


def listed(home: Path, *args: str) -> list[dict[str, object]]:
    out = relay("list", "--json", *args, cwd=home)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout))


def test_reading_a_store_that_does_not_exist_creates_nothing(home: Path) -> None:
    out = relay("check", "bob@example.net", cwd=home)
    assert (out.returncode, out.stdout) == (1, "bob@example.net: not suppressed (scopes: global)\n")
    assert relay("list", cwd=home).stdout == "-- 0 suppression(s)\n"
    assert relay("export", cwd=home).stdout == "email,reason,scope,detail,created_at,expires_at\n"
    assert relay("remove", "bob@example.net", cwd=home).returncode == 1
    assert not db(home).exists()


def test_add_check_remove(home: Path) -> None:
    out = relay("add", "bob@Example.NET", "--reason", "hard-bounce", "--detail",
                "550 5.1.1 user unknown", cwd=home)
    assert (out.returncode, out.stdout) == (0, ("bob@example.net: suppressed in global"
                                                " (hard-bounce)\n"))
    assert db(home).exists()

    out = relay("check", "bob@EXAMPLE.net", cwd=home)
    assert out.returncode == 0
    assert out.stdout.startswith("bob@example.net: suppressed in global: hard-bounce since ")
    assert out.stdout.endswith(" UTC: 550 5.1.1 user unknown\n")
    assert relay("check", "Bob@example.net", cwd=home).returncode == 1  # local part as is

    again = relay("add", "bob@example.net", "--reason", "complaint", cwd=home)
    assert (again.returncode, again.stdout) == (0, ("bob@example.net: updated in global"
                                                    " (complaint)\n"))
    assert [e["reason"] for e in listed(home)] == ["complaint"]

    out = relay("remove", "bob@example.net", cwd=home)
    assert (out.returncode, out.stdout) == (0, "bob@example.net: removed from global\n")
    out = relay("remove", "bob@example.net", cwd=home)
    assert (out.returncode, out.stderr) == (1, ("relay: bob@example.net is not suppressed in"
                                                " global\n"))
    assert relay("check", "bob@example.net", cwd=home).returncode == 1


def test_the_store_is_the_one_the_relay_reads(home: Path) -> None:
    relay("add", "eve@example.net", "--reason", "unsubscribe", "--scope", "shop.example",
          cwd=home)
    store = SQLiteSuppressionStore(db(home))
    try:
        found = store.check("eve@example.net", (GLOBAL, "shop.example"))
        assert found is not None
        assert found.reason is Reason.UNSUBSCRIBE
        assert store.check("eve@example.net") is None
    finally:
        store.close()


def test_scopes(home: Path) -> None:
    assert relay("add", "bob@example.net", "--scope", "shop.example", cwd=home).returncode == 0
    assert relay("check", "bob@example.net", cwd=home).returncode == 1
    out = relay("check", "bob@example.net", "--scope", "shop.example", cwd=home)
    assert out.returncode == 0
    assert out.stdout.startswith("bob@example.net: suppressed in shop.example: manual since ")
    out = relay("check", "bob@example.net", "--scope", "news.example", cwd=home)
    assert (out.returncode, out.stdout) == (
        1, "bob@example.net: not suppressed (scopes: global, news.example)\n")
    assert relay("remove", "bob@example.net", cwd=home).returncode == 1  # global: none
    assert relay("remove", "bob@example.net", "--scope", "shop.example",
                 cwd=home).returncode == 0


def test_quoted_local_parts(home: Path) -> None:
    assert relay("add", '"odd user"@Example.NET', cwd=home).returncode == 0
    assert relay("check", '"odd user"@example.net', cwd=home).returncode == 0
    assert relay("check", "<\"odd user\"@example.net>", cwd=home).returncode == 0
    assert relay("check", "odd user@example.net", cwd=home).returncode == 1
    assert [e["address"] for e in listed(home)] == ['"odd user"@example.net']


def test_expiry(home: Path) -> None:
    before = time.time()
    assert relay("add", "later@example.net", "--expires", "30d", cwd=home).returncode == 0
    assert relay("add", "soon@example.net", "--expires", "1ms", cwd=home).returncode == 0
    (later, soon) = listed(home)
    assert isinstance(later["expires_at"], float)
    assert isinstance(later["created_at"], float)
    assert later["expires_at"] - later["created_at"] == pytest.approx(30 * 86400)
    assert later["created_at"] >= before
    assert relay("check", "later@example.net", cwd=home).returncode == 0
    out = relay("check", "soon@example.net", cwd=home)  # a process start is more than 1 ms
    assert out.returncode == 1
    assert soon["address"] == "soon@example.net"
    assert "expired" in relay("list", cwd=home).stdout


def test_list(home: Path) -> None:
    relay("add", "b@example.net", "--reason", "complaint", "--detail", "arf", cwd=home)
    relay("add", "a@example.net", "--scope", "shop.example", cwd=home)
    out = relay("list", cwd=home)
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["a@example.net", "shop.example", "manual", "since"]
    assert lines[1].split()[:4] == ["b@example.net", "global", "complaint", "since"]
    assert lines[1].endswith(": arf")
    assert lines[2] == "-- 2 suppression(s)"
    assert [(e["address"], e["scope"], e["reason"], e["detail"], e["expires_at"])
            for e in listed(home)] == [
        ("a@example.net", "shop.example", "manual", "", None),
        ("b@example.net", "global", "complaint", "arf", None)]
    assert [e["address"] for e in listed(home, "--scope", "global")] == ["b@example.net"]


@pytest.mark.parametrize(("args", "code", "message"), [
    (("add", "no-at-sign"), 1, "relay: not a valid address: 'no-at-sign'\n"),
    (("add", "bob@"), 1, "relay: not a valid address: 'bob@'\n"),
    (("add", "bob@example.net", "--expires", "30"), 1,
     "relay: --expires: bad duration '30': use a number and one of ms, s, m, h, d, w\n"),
    (("add", "bob@example.net", "--reason", "bored"), 2, "invalid choice: 'bored'"),
    (("import", "missing.csv"), 1, "relay: cannot read missing.csv: No such file or directory"),
])
def test_refusals(home: Path, args: tuple[str, ...], code: int, message: str) -> None:
    out = relay(*args, cwd=home)
    assert out.returncode == code
    assert message in out.stderr
    assert not db(home).exists() or relay("list", cwd=home).stdout == "-- 0 suppression(s)\n"


def test_config_errors_and_the_config_option(home: Path, tmp_path_factory: pytest.TempPathFactory,
                                             ) -> None:
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    out = relay("list", cwd=elsewhere)  # no ./relay.toml there
    assert out.returncode == 1
    assert "relay.toml" in out.stderr
    config = str(home / "relay.toml")
    assert relay("--config", config, "add", "bob@example.net", cwd=elsewhere).returncode == 0
    assert relay("check", "bob@example.net", "--config", config, cwd=elsewhere).returncode == 0
    assert db(home).exists()
    assert not (elsewhere / "var").exists()


SERVICE_CSV = """\
Email Address,Reason,Created
bob@example.net,bounced,2023-11-14T22:13:20Z
no-at-sign,bounced,
eve@Example.NET,spamreport,1700000000
mallory@example.net,unsubscribed,last tuesday
"""


def test_import_reports_counts_and_bad_rows(home: Path) -> None:
    (home / "list.csv").write_text(SERVICE_CSV, encoding="utf-8")
    out = relay("import", "list.csv", cwd=home)
    assert out.returncode == 0
    assert out.stdout == "list.csv: added 2, updated 0, skipped 2\n"
    assert out.stderr == ("list.csv:3: skipped: no @ in address 'no-at-sign'\n"
                          "list.csv:5: skipped: cannot read date 'last tuesday'\n")
    assert [(e["address"], e["reason"], e["created_at"]) for e in listed(home)] == [
        ("bob@example.net", "hard-bounce", 1_700_000_000.0),
        ("eve@example.net", "complaint", 1_700_000_000.0)]

    again = relay("import", "list.csv", "--scope", "shop.example", cwd=home)
    assert again.stdout == "list.csv: added 2, updated 0, skipped 2\n"
    same = relay("import", "list.csv", cwd=home)
    assert same.stdout == "list.csv: added 0, updated 2, skipped 2\n"


def test_import_with_a_default_reason_and_a_byte_order_mark(home: Path) -> None:
    (home / "list.csv").write_bytes(b"\xef\xbb\xbfemail\r\nbob@example.net\r\n")
    out = relay("import", "list.csv", "--reason", "unsubscribe", cwd=home)
    assert (out.returncode, out.stdout) == (0, "list.csv: added 1, updated 0, skipped 0\n")
    assert [e["reason"] for e in listed(home)] == ["unsubscribe"]


@pytest.mark.parametrize(("content", "message"), [
    (b"name,mail\nbob,bob@example.net\n",
     ("relay: unusable.csv: no email column (email, email_address, Email Address, address or"
      " recipient); columns seen: 'name', 'mail'\n")),
    (b"", "relay: unusable.csv: empty file: expected a header line with an email column\n"),
    (b"email\nbob@example.net\n\xff\xfe\n", "relay: unusable.csv: not UTF-8 text\n"),
    (b"email\nno-at-sign\nalso bad\n",
     ("unusable.csv:2: skipped: no @ in address 'no-at-sign'\n"
      "unusable.csv:3: skipped: no @ in address 'also bad'\n")),
])
def test_import_of_an_unusable_file_exits_1(home: Path, content: bytes, message: str) -> None:
    (home / "unusable.csv").write_bytes(content)
    out = relay("import", "unusable.csv", cwd=home)
    assert (out.returncode, out.stderr) == (1, message)
    assert listed(home) == []


def test_export_then_import_elsewhere_gives_the_same_list(home: Path,
                                                         tmp_path_factory: pytest.TempPathFactory,
                                                         ) -> None:
    relay("add", "bob@example.net", "--reason", "hard-bounce", "--detail", "550 5.1.1, gone",
          cwd=home)
    relay("add", '"odd user"@example.net', "--scope", "shop.example", "--expires", "30d",
          cwd=home)
    relay("add", "jos\u00e9@b\u00fccher.example", "--reason", "complaint", cwd=home)

    to_stdout = relay("export", cwd=home)
    assert to_stdout.returncode == 0
    assert to_stdout.stdout.splitlines()[0] == "email,reason,scope,detail,created_at,expires_at"
    out = relay("export", "out.csv", cwd=home)
    assert (out.returncode, out.stdout) == (0, "3 suppression(s) written to out.csv\n")
    assert (home / "out.csv").read_bytes() == to_stdout.stdout.replace(  # RFC 4180: CRLF
        "\n", "\r\n").encode()

    other = tmp_path_factory.mktemp("other")
    (other / "relay.toml").write_text(CONFIG)
    out = relay("import", str(home / "out.csv"), cwd=other)
    assert out.returncode == 0
    assert out.stdout.endswith("added 3, updated 0, skipped 0\n")
    assert listed(other) == listed(home)
    assert relay("export", cwd=other).stdout == to_stdout.stdout
