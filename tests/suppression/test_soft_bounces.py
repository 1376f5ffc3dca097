"""Consecutive soft bounces per address: the same contract for both suppression stores.

The queue records each "soft" verdict (relay.outbound.classify) with `record_soft_bounce`,
suppresses with reason soft-bounce-limit once the count and the span since the first reach
their limits, and calls `clear_soft_bounces` on a delivery. Counting never suppresses by
itself (invariant 5 of DESIGN.md).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.suppression.store import SOFT_TABLE, MemorySuppressionStore, SQLiteSuppressionStore

T0 = 1_700_000_000.0
DAY = 86400.0


class Clock:
    """A settable clock, passed in (STYLE rule 8)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


Store = SQLiteSuppressionStore | MemorySuppressionStore


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture(params=["sqlite", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path, clock: Clock) -> Iterator[Store]:
    s: Store = (SQLiteSuppressionStore(tmp_path / "var" / "suppression.db", clock=clock)
                if request.param == "sqlite" else MemorySuppressionStore(clock=clock))
    yield s
    s.close()


def test_consecutive_soft_bounces_count_from_the_first(store: Store) -> None:
    assert store.soft_bounces("r7@example.net") is None
    assert store.record_soft_bounce("r7@example.net", T0) == (1, T0)
    assert store.record_soft_bounce("r7@example.net", T0 + DAY) == (2, T0)
    assert store.record_soft_bounce("r7@example.net", T0 + 3 * DAY) == (3, T0)
    assert store.soft_bounces("r7@example.net") == (3, T0, T0 + 3 * DAY)


def test_now_defaults_to_the_clock(store: Store, clock: Clock) -> None:
    assert store.record_soft_bounce("r7@example.net") == (1, T0)
    clock.now = T0 + 60
    assert store.record_soft_bounce("r7@example.net") == (2, T0)
    assert store.soft_bounces("r7@example.net") == (2, T0, T0 + 60)


def test_a_delivery_clears_the_count(store: Store) -> None:
    store.record_soft_bounce("r7@example.net", T0)
    store.record_soft_bounce("r7@example.net", T0 + DAY)
    assert store.clear_soft_bounces("r7@example.net") is True
    assert store.soft_bounces("r7@example.net") is None
    assert store.clear_soft_bounces("r7@example.net") is False
    # the next soft bounce starts a new run
    assert store.record_soft_bounce("r7@example.net", T0 + 5 * DAY) == (1, T0 + 5 * DAY)


def test_addresses_are_counted_apart(store: Store) -> None:
    store.record_soft_bounce("a@example.net", T0)
    store.record_soft_bounce("a@example.net", T0 + 1)
    assert store.record_soft_bounce("b@example.net", T0 + 2) == (1, T0 + 2)
    store.clear_soft_bounces("b@example.net")
    assert store.soft_bounces("a@example.net") == (2, T0, T0 + 1)


@pytest.mark.parametrize(("first", "second", "same"), [
    ("bob@example.net", "bob@EXAMPLE.net", True),     # the domain is case-insensitive
    ("bob@example.net", "Bob@example.net", False),    # RFC 5321 2.4: the local part is not
])
def test_addresses_are_canonical(store: Store, first: str, second: str, same: bool) -> None:
    store.record_soft_bounce(first, T0)
    assert store.record_soft_bounce(second, T0 + 1) == ((2, T0) if same else (1, T0 + 1))
    assert store.clear_soft_bounces(second) is True
    assert (store.soft_bounces(first) is None) is same


def test_counting_soft_bounces_suppresses_nothing(store: Store) -> None:
    for day in range(10):
        store.record_soft_bounce("r7@example.net", T0 + day * DAY)
    assert store.check("r7@example.net") is None
    assert store.count() == 0
    assert store.list() == []


def test_the_limit_the_queue_applies(store: Store) -> None:
    """The queue's rule, sketched: at least N consecutive soft bounces over at least D days."""
    n, days = 3, 2

    def over_limit(address: str, now: float) -> bool:
        count, first_at = store.record_soft_bounce(address, now)
        return count >= n and now - first_at >= days * DAY

    assert [over_limit("r7@example.net", T0 + h * 3600) for h in range(5)] == [False] * 5
    assert over_limit("r7@example.net", T0 + 2 * DAY) is True
    assert over_limit("burst@example.net", T0) is False
    assert over_limit("burst@example.net", T0 + 3 * DAY) is False   # only 2 so far


# --- SQLite only ---------------------------------------------------------------------------

def test_sqlite_soft_bounces_are_durable(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SQLiteSuppressionStore(path)
    first.record_soft_bounce("r7@example.net", T0)
    first.close()
    second = SQLiteSuppressionStore(path)
    try:
        assert second.record_soft_bounce("r7@example.net", T0 + DAY) == (2, T0)
    finally:
        second.close()


def test_sqlite_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SQLiteSuppressionStore(path).close()
    conn = sqlite3.connect(path)
    try:
        info = list(conn.execute(f"PRAGMA table_info({SOFT_TABLE})"))
        assert [(row[1], row[2], row[5]) for row in info] == [
            ("address", "TEXT", 1), ("count", "INTEGER", 0), ("first_at", "REAL", 0),
            ("last_at", "REAL", 0)]
        (plan,) = [row[3] for row in conn.execute(
            f"EXPLAIN QUERY PLAN SELECT count FROM {SOFT_TABLE} WHERE address = ?", ("x",))]
        assert plan.startswith(f"SEARCH {SOFT_TABLE} USING INDEX sqlite_autoindex_")
    finally:
        conn.close()


def test_sqlite_a_store_made_before_soft_bounces_gets_the_table(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    SQLiteSuppressionStore(path).close()
    conn = sqlite3.connect(path)
    conn.execute(f"DROP TABLE {SOFT_TABLE}")
    conn.commit()
    conn.close()
    store = SQLiteSuppressionStore(path)
    try:
        assert store.record_soft_bounce("r7@example.net", T0) == (1, T0)
    finally:
        store.close()


def test_sqlite_memory_path_works_too() -> None:
    store = SQLiteSuppressionStore(":memory:", clock=Clock(T0))
    try:
        assert store.record_soft_bounce("r7@example.net") == (1, T0)
        assert store.soft_bounces("r7@example.net") == (1, T0, T0)
    finally:
        store.close()


def test_sqlite_concurrent_recorders_lose_no_count(tmp_path: Path) -> None:
    store = SQLiteSuppressionStore(tmp_path / "s.db")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                store.record_soft_bounce("r7@example.net", T0 + t * 100 + i)
                store.record_soft_bounce(f"t{t}@example.net", T0 + i)
                if i % 10 == 9:
                    assert store.clear_soft_bounces(f"t{t}@example.net")
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        shared = store.soft_bounces("r7@example.net")
        assert shared is not None and shared[0] == 4 * 50
        assert all(store.soft_bounces(f"t{t}@example.net") is None for t in range(4))
    finally:
        store.close()


def test_an_empty_table_is_not_read_after_every_delivery(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """soft_bounces() of an empty table answers None without a look-up for a while; a count
    recorded by this store ends that at once, one recorded by another process (another
    connection to the file) is seen once the re-check time has passed."""
    import time

    import relay.suppression.store as store_module

    monkeypatch.setattr(store_module, "SOFT_EMPTY_RECHECK", 0.3)
    path = tmp_path / "suppression.db"
    ours, other = SQLiteSuppressionStore(path), SQLiteSuppressionStore(path)
    try:
        assert ours.soft_bounces("a@example.net") is None       # table empty: remembered
        ours.record_soft_bounce("a@example.net", now=T0)
        assert ours.soft_bounces("a@example.net") == (1, T0, T0)   # at once
        assert ours.clear_soft_bounces("a@example.net") is True
        assert ours.soft_bounces("b@example.net") is None       # empty again: remembered
        other.record_soft_bounce("b@example.net", now=T0)
        assert ours.soft_bounces("b@example.net") is None       # not yet re-checked
        time.sleep(0.35)
        assert ours.soft_bounces("b@example.net") == (1, T0, T0)
    finally:
        ours.close()
        other.close()
