"""The `relay` command, run for real as a subprocess, against real files."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from relay import __version__
from relay.queue import NewMessage, Settlement, State
from relay.queue.sqlite import SQLiteQueueStore

ROOT = Path(__file__).resolve().parents[1]
NOW = time.time()
BODY = (b"Received: from app1 by relay.test\r\nFrom: Shop <shop@example.com>\r\n"
        b"Subject: Your order 1234\r\n\r\nThank you.\r\n")
GOOD = """\
[server]
listen = ["127.0.0.1:0"]
[queue]
path = "var/queue.db"
[outbound]
smarthost = "127.0.0.1:9"
[http]
listen = ""
"""


def relay(*args: str, cwd: Path, env: dict[str, str] | None = None,
          ) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run([sys.executable, "-m", "relay", *args], cwd=cwd,
                          env={**base, **(env or {})}, capture_output=True, text=True,
                          timeout=60, check=False)


def when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    return path


def fill_queue(db: Path) -> None:
    """Two messages: A (two recipients, one deferred once) and B (one recipient)."""

    async def fill() -> None:
        store = SQLiteQueueStore(db)
        await store.open()
        try:
            await store.enqueue(NewMessage(
                "7F3A9C21D0", "shop@example.com", ["a@example.net", "b@example.net"], BODY,
                NOW - 120, client="app1[10.0.0.5]"))
            await store.enqueue(NewMessage(
                "7F3A9C21E1", "", ["c@example.org"], BODY, NOW - 60, client="app2[10.0.0.6]"))
            (job,) = await store.claim(NOW - 120, 1, max_rcpts=1)
            await store.settle("7F3A9C21D0", [Settlement(
                job.recipients[0].id, State.QUEUED, NOW + 3600, "450 4.2.1 Mailbox busy")],
                [("a@example.net", "deferred", "450 4.2.1 Mailbox busy")])
        finally:
            await store.close()

    asyncio.run(fill())


def read_queue(db: Path) -> tuple[list, list, float | None]:
    async def read() -> tuple[list, list, float | None]:
        store = SQLiteQueueStore(db)
        await store.open()
        try:
            return await store.list(), await store.events(), await store.next_due()
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.fixture
def queue(config: Path) -> Path:
    db = config.parent / "var" / "queue.db"   # [queue].path, relative to the config's folder
    fill_queue(db)
    return db


# --- version and check-config ---------------------------------------------------------------

def test_version(tmp_path: Path) -> None:
    out = relay("--version", cwd=tmp_path)
    assert out.returncode == 0
    assert out.stdout.strip() == f"relay {__version__}"


def test_no_command_is_a_usage_error(tmp_path: Path) -> None:
    out = relay(cwd=tmp_path)
    assert out.returncode == 2
    assert "usage: relay" in out.stderr


def test_check_config_ok(config: Path) -> None:
    out = relay("check-config", "--config", str(config), cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.strip() == f"{config}: ok"


def test_check_config_of_the_shipped_file(tmp_path: Path) -> None:
    out = relay("check-config", "--config", str(ROOT / "relay.toml"), cwd=tmp_path)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("how", ["env", "cwd"])
def test_check_config_finds_its_default_file(tmp_path: Path, how: str) -> None:
    """--config defaults to $RELAY_CONFIG, then ./relay.toml."""
    (tmp_path / "etc").mkdir()
    bad = tmp_path / "etc" / "relay.toml"
    bad.write_text(GOOD.replace("[server]\n", "[server]\ncolour = 1\n"))
    if how == "env":
        out = relay("check-config", cwd=tmp_path, env={"RELAY_CONFIG": str(bad)})
    else:
        out = relay("check-config", cwd=bad.parent)
    assert out.returncode != 0
    assert out.stderr.splitlines() == [f"{bad}: server.colour: unknown key"]


def test_check_config_lists_every_problem_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("""\
[server]
listen = ["x"]
max_message_size = "25XB"
[queue]
lifetime = "30"
[outbound]
tls = "maybe"
[bogus]
""")
    out = relay("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert sorted(line.split(": ")[1] for line in lines) == sorted([
        "bogus", "server.listen", "server.max_message_size", "queue.lifetime",
        "outbound.tls", "outbound.smarthost"])
    assert all(line.startswith(f"{path}: ") for line in lines)


@pytest.mark.parametrize(("text", "problem"), [
    (None, "cannot read"),
    ("[server\n", "TOML syntax error"),
])
def test_check_config_of_a_missing_or_broken_file(tmp_path: Path, text: str | None,
                                                  problem: str) -> None:
    path = tmp_path / "relay.toml"
    if text is not None:
        path.write_text(text)
    out = relay("check-config", "--config", str(path), cwd=tmp_path)
    assert out.returncode != 0
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"{path}: {problem}")


# --- queue -----------------------------------------------------------------------------------

def test_queue_list(config: Path, queue: Path) -> None:
    out = relay("queue", "--config", str(config), "list", cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["7F3A9C21D0", str(len(BODY)), *when(NOW - 120).split(),
                                "<shop@example.com>"]
    assert lines[1].split() == ["<a@example.net>", "queued,", "attempts=1", "(450", "4.2.1",
                                "Mailbox", "busy)"]
    assert lines[2].split() == ["<b@example.net>", "queued,", "attempts=0"]
    assert lines[3].split() == ["7F3A9C21E1", str(len(BODY)), *when(NOW - 60).split(), "<>"]
    assert lines[4].split() == ["<c@example.org>", "queued,", "attempts=0"]
    assert lines[5] == "-- 2 message(s) in queue"
    assert len(lines) == 6


def test_queue_list_json(config: Path, queue: Path) -> None:
    out = relay("queue", "--config", str(config), "list", "--json", cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    entries = json.loads(out.stdout)
    assert [e["queue_id"] for e in entries] == ["7F3A9C21D0", "7F3A9C21E1"]
    first = entries[0]
    assert (first["sender"], first["size"], first["client"]) == (
        "shop@example.com", len(BODY), "app1[10.0.0.5]")
    assert first["received_at"] == pytest.approx(NOW - 120)
    assert first["recipients"] == [
        {"address": "a@example.net", "state": "queued", "attempts": 1,
         "next_attempt": pytest.approx(NOW + 3600), "last_reply": "450 4.2.1 Mailbox busy"},
        {"address": "b@example.net", "state": "queued", "attempts": 0,
         "next_attempt": pytest.approx(NOW - 120), "last_reply": None}]
    assert entries[1]["sender"] == ""


def test_queue_list_of_an_empty_queue(config: Path) -> None:
    asyncio.run(_create_empty(config.parent / "var" / "queue.db"))
    out = relay("queue", "--config", str(config), "list", cwd=config.parent)
    assert out.returncode == 0
    assert out.stdout.splitlines() == ["-- 0 message(s) in queue"]
    out = relay("queue", "--config", str(config), "list", "--json", cwd=config.parent)
    assert json.loads(out.stdout) == []


async def _create_empty(db: Path) -> None:
    store = SQLiteQueueStore(db)
    await store.open()
    await store.close()


def test_queue_show(config: Path, queue: Path) -> None:
    out = relay("queue", "--config", str(config), "show", "7F3A9C21D0", cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    lines = out.stdout.splitlines()
    assert lines[:5] == ["queue_id: 7F3A9C21D0", "sender: <shop@example.com>",
                         f"size: {len(BODY)}", f"received: {when(NOW - 120)}",
                         "client: app1[10.0.0.5]"]
    assert lines[5] == (f"recipient: <a@example.net> state=queued attempts=1 "
                        f"next={when(NOW + 3600)} last_reply=450 4.2.1 Mailbox busy")
    assert lines[6] == (f"recipient: <b@example.net> state=queued attempts=0 "
                        f"next={when(NOW - 120)} last_reply=-")
    assert lines[7] == ""
    assert lines[8:] == BODY.decode().split("\r\n\r\n")[0].split("\r\n")


def test_queue_show_of_an_unknown_id(config: Path, queue: Path) -> None:
    out = relay("queue", "--config", str(config), "show", "NOSUCHID", cwd=config.parent)
    assert out.returncode != 0
    assert out.stdout == ""
    assert "NOSUCHID" in out.stderr


def test_queue_flush(config: Path, queue: Path) -> None:
    before = time.time()
    out = relay("queue", "--config", str(config), "flush", cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.strip() == "3 recipient(s) made due now"
    entries, _, next_due = read_queue(queue)
    assert next_due is not None
    assert before <= next_due <= time.time()
    assert {r.next_attempt for e in entries for r in e.recipients} == {next_due}
    assert [r.attempts for e in entries for r in e.recipients] == [1, 0, 0]


def test_queue_delete(config: Path, queue: Path) -> None:
    out = relay("queue", "--config", str(config), "delete", "7F3A9C21D0", cwd=config.parent)
    assert (out.returncode, out.stderr) == (0, "")
    assert out.stdout.strip() == "7F3A9C21D0: deleted"
    entries, events, _ = read_queue(queue)
    assert [e.queue_id for e in entries] == ["7F3A9C21E1"]
    assert [tuple(e) for e in events] == [
        ("7F3A9C21D0", "a@example.net", "deferred", "450 4.2.1 Mailbox busy"),
        ("7F3A9C21D0", "a@example.net", "deleted", "deleted by admin"),
        ("7F3A9C21D0", "b@example.net", "deleted", "deleted by admin")]
    again = relay("queue", "--config", str(config), "delete", "7F3A9C21D0", cwd=config.parent)
    assert again.returncode != 0
    assert "7F3A9C21D0" in again.stderr
    show = relay("queue", "--config", str(config), "show", "7F3A9C21D0", cwd=config.parent)
    assert show.returncode != 0


def test_queue_without_a_queue_file(config: Path) -> None:
    out = relay("queue", "--config", str(config), "list", cwd=config.parent)
    assert out.returncode != 0
    assert str(config.parent / "var" / "queue.db") in out.stderr
    assert not (config.parent / "var" / "queue.db").exists()   # and none was created


def test_queue_with_a_bad_config(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD + "colour = 1\n")
    out = relay("queue", "--config", str(path), "list", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.splitlines() == [f"{path}: http.colour: unknown key"]


def test_app_hash_password_verifies() -> None:
    from relay.policy.access import verify_hash

    out = subprocess.run([sys.executable, "-m", "relay", "app", "hash-password"],
                         input="correct horse\n", capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    encoded = out.stdout.strip()
    assert encoded.startswith("pbkdf2_sha256$")
    assert verify_hash(b"correct horse", encoded)
    assert not verify_hash(b"wrong", encoded)


def test_queue_hold_release_and_filters(tmp_path) -> None:
    from relay.queue import NewMessage
    from relay.queue.sqlite import SQLiteQueueStore

    cfg = tmp_path / "relay.toml"
    cfg.write_text('[queue]\npath = "q.db"\n[outbound]\nsmarthost = "127.0.0.1:9"\n'
                   '[http]\nlisten = ""\n')

    async def fill() -> None:
        store = SQLiteQueueStore(tmp_path / "q.db")
        await store.open()
        await store.enqueue(NewMessage("AAA1", "shop@example.com", ["r@gmail.com"],
                                       b"Subject: a\r\n\r\nx\r\n", time.time() - 7200))
        await store.enqueue(NewMessage("BBB2", "news@example.org", ["r@example.net"],
                                       b"Subject: b\r\n\r\nx\r\n", time.time()))
        await store.close()

    asyncio.run(fill())

    def relay(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "relay", "queue", "--config", str(cfg),
                               *args], capture_output=True, text=True, timeout=60, check=False)

    def ids(out: str) -> list[str]:
        return [e["queue_id"] for e in json.loads(out)]

    assert ids(relay("list", "--json", "--destination", "gmail.com").stdout) == ["AAA1"]
    assert ids(relay("list", "--json", "--sender", "news@").stdout) == ["BBB2"]
    assert ids(relay("list", "--json", "--older-than", "1h").stdout) == ["AAA1"]
    assert relay("hold", "AAA1").returncode == 0
    assert ids(relay("list", "--json", "--state", "held").stdout) == ["AAA1"]

    async def claim() -> list[str]:
        store = SQLiteQueueStore(tmp_path / "q.db")
        await store.open()
        try:
            return [j.queue_id for j in await store.claim(time.time() + 1, 10)]
        finally:
            await store.close()

    assert asyncio.run(claim()) == ["BBB2"]          # a held message is not delivered
    assert relay("release", "AAA1").returncode == 0
    assert ids(relay("list", "--json", "--state", "queued").stdout) == ["AAA1"]
    assert relay("hold", "NOPE").returncode == 1
    shown = json.loads(relay("show", "AAA1", "--json").stdout)
    assert shown["sender"] == "shop@example.com" and shown["headers"] == "Subject: a"
    assert [r["address"] for r in shown["recipients"]] == ["r@gmail.com"]
