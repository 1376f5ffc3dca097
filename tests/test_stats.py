"""`relay stats`, run for real as a subprocess against a queue database this test fills
through the store (deliveries through settle, complaints and unsubscribes through
record_events)."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from relay.events import Event, Outcome
from relay.queue import NewMessage, Settlement, State
from relay.queue.sqlite import SQLiteQueueStore
from tests.queue.test_store_contract import make_old_database
from tests.test_cli import GOOD, relay

NOW = time.time()
BODY = b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n"


def ev(event: str, app: str, campaign: str, n: int, *, category: str = "",
       ts: float = NOW - 60) -> list[Event]:
    return [Event(ts=ts, queue_id=f"{app}{campaign}{event}{i}", recipient=f"r{i}@example.net",
                  event=event, category=category, campaign=campaign, app=app)
            for i in range(n)]


async def fill(db: Path) -> None:
    store = SQLiteQueueStore(db)
    await store.open()
    try:
        # ten recipients from a mynetworks client, through the delivery path itself
        await store.enqueue(NewMessage("QLOCAL", "app@example.com",
                                       [f"l{i}@example.net" for i in range(10)], BODY, NOW))
        (job,) = await store.claim(NOW, 1)
        await store.settle("QLOCAL", [Settlement(r.id, State.DELIVERED, NOW, "250 ok")
                                      for r in job.recipients],
                           [Outcome(r.address, "delivered", "250 ok", "delivered")
                            for r in job.recipients], app=job.app)
        await store.record_events([
            # shop/spring: 100 sent, 3 bounced (3 %), 1 complaint of 97 delivered (1.03 %)
            *ev("delivered", "shop", "spring", 97, category="delivered"),
            *ev("bounced", "shop", "spring", 2, category="hard"),
            *ev("bounced", "shop", "spring", 1, category="soft"),
            *ev("deferred", "shop", "spring", 5, category="rate-limited"),
            *ev("complaint", "shop", "spring", 1),
            *ev("unsubscribe", "shop", "spring", 2),
            # shop/autumn: exactly at the complaint threshold, well under the bounce one
            *ev("delivered", "shop", "autumn", 1000, category="delivered"),
            *ev("bounced", "shop", "autumn", 1, category="hard"),
            *ev("expired", "shop", "autumn", 1, category="soft"),
            *ev("complaint", "shop", "autumn", 3),
            *ev("suppressed", "shop", "autumn", 4),
            # news: a bad week, a month ago
            *ev("bounced", "news", "", 50, category="hard", ts=NOW - 30 * 86400),
            *ev("delivered", "news", "", 50, category="delivered", ts=NOW - 30 * 86400),
        ])
    finally:
        await store.close()


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(GOOD)
    return path


@pytest.fixture
def db(config: Path) -> Path:
    path = config.parent / "var" / "queue.db"
    asyncio.run(fill(path))
    return path


def rows_of(out: str) -> dict[tuple[str, str], list[str]]:
    """Table lines by (app, campaign)."""
    lines = [ln.split() for ln in out.splitlines()
             if ln and not ln.startswith(("--", "WARNING", "app "))]
    return {(cells[0], cells[1]): cells[2:] for cells in lines}


def test_stats_table_definitions_and_warnings(config: Path, db: Path) -> None:
    out = relay("stats", "--config", str(config), cwd=config.parent)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("-- events since ")
    assert lines[1].split()[:6] == ["app", "campaign", "sent", "delivered", "deferred",
                                    "bounce%"]
    #                       sent  deliv deferred bounce% hard%  soft%  complaint% unsub%
    assert rows_of(out.stdout) == {
        ("-", "-"): ["10", "10", "0", "0.00%", "0.00%", "0.00%", "0.00%", "0.00%"],
        ("shop", "autumn"): ["1002", "1000", "0", "0.10%", "0.10%", "0.00%", "0.30%",
                             "0.00%"],
        ("shop", "spring"): ["100", "97", "5", "3.00%", "2.00%", "1.00%", "1.03%", "2.06%"],
        ("shop", "*"): ["1102", "1097", "5", "0.36%", "0.27%", "0.09%", "0.36%", "0.18%"],
    }
    assert "-- sent = delivered + bounced + expired" in out.stdout
    warnings = [ln for ln in lines if ln.startswith("WARNING")]
    assert warnings == [
        ("WARNING: app shop, campaign spring: bounce rate 3.00% is over 2.00% "
         "(3 of 100 sent)"),
        ("WARNING: app shop, campaign spring: complaint rate 1.03% is over 0.30% "
         "(1 of 97 delivered)"),
        ("WARNING: app shop, campaign *: complaint rate 0.36% is over 0.30% "
         "(4 of 1097 delivered)"),
    ]
    assert "news" not in out.stdout          # a month old: outside the default 7 days


def test_stats_since_and_app(config: Path, db: Path) -> None:
    out = relay("stats", "--config", str(config), "--since", "all", "--app", "news",
                cwd=config.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == "-- all events, app news"
    assert rows_of(out.stdout) == {
        ("news", "-"): ["100", "50", "0", "50.00%", "50.00%", "0.00%", "0.00%", "0.00%"]}
    assert [ln for ln in out.stdout.splitlines() if ln.startswith("WARNING")] == [
        "WARNING: app news, campaign -: bounce rate 50.00% is over 2.00% (50 of 100 sent)"]
    out = relay("stats", "--config", str(config), "--since", "1m", cwd=config.parent)
    assert list(rows_of(out.stdout)) == [("-", "-")]   # the others are a minute old
    out = relay("stats", "--config", str(config), "--app", "nobody", cwd=config.parent)
    assert "\nno events\n" in out.stdout and "WARNING" not in out.stdout
    out = relay("stats", "--config", str(config), "--app", "", cwd=config.parent)
    assert list(rows_of(out.stdout)) == [("-", "-")]


def test_stats_json(config: Path, db: Path) -> None:
    before = time.time()
    out = relay("stats", "--config", str(config), "--json", cwd=config.parent)
    after = time.time()
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    # the default window is the last 7 days, counted from when the command ran
    assert before - 7 * 86400 - 1 <= doc["since"] <= after - 7 * 86400 + 1
    assert any(d.startswith("sent = delivered + bounced + expired")
               for d in doc["definitions"])
    rows = {(r["app"], r["campaign"]): r for r in doc["rows"]}
    assert set(rows) == {("", ""), ("shop", "autumn"), ("shop", "spring"), ("shop", "*")}
    spring = rows[("shop", "spring")]
    assert {k: spring[k] for k in ("sent", "delivered", "bounced", "hard_bounces",
                                   "soft_bounces", "expired", "deferred", "complaints",
                                   "unsubscribes", "suppressed")} == {
        "sent": 100, "delivered": 97, "bounced": 3, "hard_bounces": 2, "soft_bounces": 1,
        "expired": 0, "deferred": 5, "complaints": 1, "unsubscribes": 2, "suppressed": 0}
    assert spring["bounce_rate"] == pytest.approx(0.03)
    assert spring["complaint_rate"] == pytest.approx(1 / 97)
    assert len(spring["warnings"]) == 2
    autumn = rows[("shop", "autumn")]
    assert (autumn["expired"], autumn["suppressed"], autumn["warnings"]) == (1, 4, [])
    assert rows[("", "")]["complaint_rate"] == 0.0


def test_stats_reads_while_the_relay_writes(config: Path, db: Path) -> None:
    """The relay's store is open (its writer holds the file in WAL mode, with a commit not
    yet checkpointed): stats reads the last commit and writes nothing."""

    async def run() -> str:
        store = SQLiteQueueStore(db)
        await store.open()
        try:
            await store.record_events(ev("complaint", "shop", "spring", 2))
            out = await asyncio.to_thread(relay, "stats", "--config", str(config),
                                          "--app", "shop", cwd=config.parent)
            assert out.returncode == 0, out.stderr
            return out.stdout
        finally:
            await store.close()

    stdout = asyncio.run(run())
    assert rows_of(stdout)[("shop", "spring")][6] == "3.09%"   # 3 of 97


def test_stats_of_an_older_database_does_not_change_it(config: Path) -> None:
    db = config.parent / "var" / "queue.db"
    db.parent.mkdir()
    make_old_database(db)
    before = db.read_bytes()
    out = relay("stats", "--config", str(config), "--since", "all", cwd=config.parent)
    assert out.returncode == 0, out.stderr
    assert rows_of(out.stdout) == {
        ("-", "-"): ["1", "1", "0", "0.00%", "0.00%", "0.00%", "0.00%", "0.00%"]}
    assert db.read_bytes() == before
    with sqlite3.connect(db) as conn:
        assert "app" not in [r[1] for r in conn.execute("PRAGMA table_info(events)")]
    conn.close()


def test_stats_refusals(config: Path, tmp_path: Path) -> None:
    out = relay("stats", "--config", str(config), cwd=tmp_path)
    assert out.returncode == 1
    assert "no queue at" in out.stderr
    out = relay("stats", "--config", str(config), "--since", "7", cwd=tmp_path)
    assert out.returncode == 2
    assert "--since" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[queue]\nlifetime = 5\n")
    out = relay("stats", "--config", str(bad), cwd=tmp_path)
    assert out.returncode == 1
    assert "queue.lifetime" in out.stderr
