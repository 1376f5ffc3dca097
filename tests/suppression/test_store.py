"""The SuppressionStore contract: one set of tests that both stores pass (STYLE rule 1).

`SQLiteSuppressionStore` runs on a real SQLite file in the test's temporary folder; the
`MemorySuppressionStore` twin must behave the same. Durability, the index and sharing the
store between threads are SQLite-only tests at the end.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.config import parse_config
from relay.suppression import GLOBAL, Reason, Suppression, SuppressionStore
from relay.suppression.store import (
    CHECK_ANY_SQL,
    CHECK_ONE_SQL,
    MemorySuppressionStore,
    SQLiteSuppressionStore,
    suppression_path,
)

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


def entry(address: str, scope: str = GLOBAL, reason: Reason = Reason.MANUAL,
          **kw: object) -> Suppression:
    return Suppression(address=address, scope=scope, reason=reason, created_at=T0,
                       **kw)  # type: ignore[arg-type]


def test_both_stores_satisfy_the_protocol(store: Store) -> None:
    typed: SuppressionStore = store
    assert typed.count() == 0


# --- add, check, remove, list, count -------------------------------------------------------

def test_add_then_check_returns_the_entry(store: Store) -> None:
    e = entry("bob@example.net", reason=Reason.HARD_BOUNCE, detail="550 5.1.1 user unknown")
    assert store.add(e) is True
    assert store.check("bob@example.net") == e
    assert store.check("alice@example.net") is None
    assert store.count() == 1


def test_remove(store: Store) -> None:
    store.add(entry("bob@example.net"))
    assert store.remove("bob@example.net", "example.com") is False  # wrong scope
    assert store.remove("bob@example.net") is True
    assert store.remove("bob@example.net") is False
    assert store.check("bob@example.net") is None
    assert store.count() == 0


def test_list_is_ordered_and_filters_by_scope(store: Store) -> None:
    for address, scope in [("c@example.net", GLOBAL), ("a@example.net", "shop.example"),
                           ("a@example.net", GLOBAL), ("b@example.net", "shop.example")]:
        store.add(entry(address, scope))
    assert [(e.address, e.scope) for e in store.list()] == [
        ("a@example.net", GLOBAL), ("a@example.net", "shop.example"),
        ("b@example.net", "shop.example"), ("c@example.net", GLOBAL)]
    assert [e.address for e in store.list("shop.example")] == ["a@example.net",
                                                               "b@example.net"]
    assert store.list("nobody.example") == []
    assert store.count() == 4


def test_created_at_zero_is_stamped_with_the_clock(store: Store, clock: Clock) -> None:
    clock.now = T0 + 123
    store.add(Suppression("bob@example.net", GLOBAL, Reason.MANUAL))
    found = store.check("bob@example.net")
    assert found is not None
    assert found.created_at == T0 + 123


def test_fields_round_trip(store: Store) -> None:
    e = Suppression("bob@example.net", "list:news", Reason.SOFT_BOUNCE_LIMIT,
                    detail="5 soft bounces, last: 452 4.2.2 mailbox full\u2026",
                    created_at=T0 + 0.25, expires_at=T0 + 30 * DAY)
    store.add(e)
    assert store.list() == [e]
    assert isinstance(store.list()[0].reason, Reason)


# --- scopes ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("stored_scope", "scopes", "suppressed"), [
    (GLOBAL, (GLOBAL,), True),
    (GLOBAL, (GLOBAL, "example.com"), True),
    ("example.com", (GLOBAL,), False),
    ("example.com", (GLOBAL, "example.com"), True),
    ("example.com", (GLOBAL, "other.example"), False),
    ("example.com", ("example.com",), True),
    (GLOBAL, (), False),
])
def test_scopes(store: Store, stored_scope: str, scopes: tuple[str, ...],
                suppressed: bool) -> None:
    store.add(entry("bob@example.net", stored_scope))
    assert (store.check("bob@example.net", scopes) is not None) is suppressed


def test_the_first_listed_scope_wins(store: Store) -> None:
    store.add(entry("bob@example.net", GLOBAL, Reason.HARD_BOUNCE))
    store.add(entry("bob@example.net", "example.com", Reason.UNSUBSCRIBE))
    both = store.check("bob@example.net", (GLOBAL, "example.com"))
    assert both is not None
    assert both.scope == GLOBAL
    reverse = store.check("bob@example.net", ("example.com", GLOBAL))
    assert reverse is not None
    assert reverse.reason is Reason.UNSUBSCRIBE
    assert store.count() == 2


def test_same_address_in_two_scopes_are_two_entries(store: Store) -> None:
    assert store.add(entry("bob@example.net", GLOBAL))
    assert store.add(entry("bob@example.net", "example.com"))
    assert store.remove("bob@example.net", "example.com")
    assert store.check("bob@example.net", ("example.com",)) is None
    assert store.check("bob@example.net") is not None


# --- expiry ----------------------------------------------------------------------------------

def test_an_expired_entry_does_not_suppress(store: Store, clock: Clock) -> None:
    store.add(entry("bob@example.net", expires_at=T0 + DAY))
    assert store.check("bob@example.net", now=T0 + DAY - 1) is not None
    assert store.check("bob@example.net", now=T0 + DAY) is None
    assert store.check("bob@example.net") is not None  # the clock says T0
    clock.now = T0 + 2 * DAY
    assert store.check("bob@example.net") is None
    # Still listed (an admin can see why mail stopped for a while) until purged.
    assert [e.address for e in store.list()] == ["bob@example.net"]


def test_an_expired_entry_in_one_scope_leaves_the_other(store: Store) -> None:
    store.add(entry("bob@example.net", GLOBAL, expires_at=T0 + DAY))
    store.add(entry("bob@example.net", "example.com", Reason.UNSUBSCRIBE))
    found = store.check("bob@example.net", (GLOBAL, "example.com"), now=T0 + 2 * DAY)
    assert found is not None
    assert found.scope == "example.com"


def test_purge_expired(store: Store) -> None:
    store.add(entry("gone@example.net", expires_at=T0 + DAY))
    store.add(entry("edge@example.net", expires_at=T0 + 2 * DAY))
    store.add(entry("later@example.net", expires_at=T0 + 3 * DAY))
    store.add(entry("forever@example.net"))
    assert store.purge_expired(T0 + 2 * DAY) == 2
    assert [e.address for e in store.list()] == ["forever@example.net", "later@example.net"]
    assert store.purge_expired(T0 + 2 * DAY) == 0


def test_adding_over_an_expired_entry_counts_as_new(store: Store, clock: Clock) -> None:
    store.add(entry("bob@example.net", expires_at=T0 + DAY))
    clock.now = T0 + 2 * DAY
    assert store.add(entry("bob@example.net", reason=Reason.COMPLAINT)) is True
    assert store.check("bob@example.net") is not None
    assert store.count() == 1


# --- replace semantics -----------------------------------------------------------------------

def test_adding_twice_replaces(store: Store) -> None:
    assert store.add(entry("bob@example.net", reason=Reason.MANUAL, detail="first")) is True
    second = entry("bob@example.net", reason=Reason.COMPLAINT, detail="second",
                   expires_at=T0 + DAY)
    assert store.add(second) is False
    assert store.count() == 1
    assert store.list() == [second]
    assert store.check("bob@example.net") == second


def test_replacing_can_lift_an_expiry(store: Store) -> None:
    store.add(entry("bob@example.net", expires_at=T0 + DAY))
    assert store.add(entry("bob@example.net")) is False
    assert store.check("bob@example.net", now=T0 + 10 * DAY) is not None


def test_add_many_counts_added_and_replaced(store: Store) -> None:
    store.add(entry("old@example.net"))
    added, replaced = store.add_many([
        entry("new@example.net"), entry("old@example.net", reason=Reason.COMPLAINT),
        entry("New@EXAMPLE.net"), entry("new@example.net", detail="again")])
    assert (added, replaced) == (2, 2)
    assert [(e.address, e.detail) for e in store.list()] == [
        ("New@example.net", ""), ("new@example.net", "again"), ("old@example.net", "")]


# --- canonicalisation (RFC 5321 2.4: domain case-insensitive, local part as is) ------------

@pytest.mark.parametrize(("stored", "looked_up", "suppressed"), [
    ("bob@Example.NET", "bob@example.net", True),
    ("bob@example.net", "bob@EXAMPLE.NET", True),
    ("Bob@example.net", "bob@example.net", False),  # the local part is case-sensitive
    ("bob@example.net", "Bob@example.net", False),
    ('"odd user"@Example.NET', '"odd user"@example.net', True),
    ('"odd user"@example.net', '"odd user"@EXAMPLE.net', True),
    ('"odd user"@example.net', "odd user@example.net", False),
    ('"odd user"@example.net', '"Odd User"@example.net', False),
    ('"bob"@example.net', "bob@example.net", False),  # only exactly that form matches
    ('"a@b"@example.net', '"a@b"@Example.net', True),  # the @ inside quotes is not the split
    ("jos\u00e9@B\u00dcCHER.example", "jos\u00e9@b\u00fccher.example", True),
    ("bob@[192.0.2.1]", "bob@[192.0.2.1]", True),
    ("bob@[IPv6:2001:DB8::1]", "bob@[ipv6:2001:db8::1]", True),
])
def test_canonicalisation(store: Store, stored: str, looked_up: str, suppressed: bool) -> None:
    store.add(entry(stored))
    assert (store.check(looked_up) is not None) is suppressed


@pytest.mark.parametrize(("given", "kept"), [
    ("Bob@Example.NET", "Bob@example.net"),
    ('"Odd User"@Example.NET', '"Odd User"@example.net'),
])
def test_addresses_are_stored_canonical(store: Store, given: str, kept: str) -> None:
    store.add(entry(given))
    assert [e.address for e in store.list()] == [kept]
    assert store.remove(given) is True  # remove canonicalises too


# --- SQLite only -----------------------------------------------------------------------------

def test_suppression_path_is_beside_the_queue(tmp_path: Path) -> None:
    cfg = parse_config({"queue": {"path": "var/relay.db"},
                        "outbound": {"smarthost": "127.0.0.1:9"}, "http": {"listen": ""}},
                       tmp_path / "relay.toml")
    assert suppression_path(cfg) == tmp_path / "var" / "suppression.db"


def test_sqlite_is_durable_across_store_objects(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    first = SQLiteSuppressionStore(path)
    e = entry('"odd user"@example.net', "example.com", Reason.COMPLAINT, detail="arf",
              expires_at=T0 + 365 * DAY)
    first.add(e)
    second = SQLiteSuppressionStore(path)  # open at the same time: the CLI beside `serve`
    assert second.check('"odd user"@Example.NET', (GLOBAL, "example.com"), now=T0) == e
    second.add(entry("more@example.net"))
    assert first.check("more@example.net", now=T0) is not None
    first.close()
    second.close()
    third = SQLiteSuppressionStore(path)
    assert third.count() == 2
    assert third.list()[0] == e
    third.close()


def test_sqlite_schema_and_pragmas(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = SQLiteSuppressionStore(path)
    try:
        conn = sqlite3.connect(path)
        columns = [row[1] for row in conn.execute("PRAGMA table_info(suppressions)")]
        assert columns == ["address", "scope", "reason", "detail", "created_at", "expires_at"]
        unique = [row[1] for row in conn.execute("PRAGMA index_list(suppressions)") if row[2]]
        assert [[c[2] for c in conn.execute(f"PRAGMA index_info({name})")]
                for name in unique] == [["address", "scope"]]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        for sql, params, uses in [
                (CHECK_ONE_SQL, ("a@b.c", GLOBAL, T0), "(address=? AND scope=?)"),
                (CHECK_ANY_SQL, ("a@b.c", T0), "(address=?)")]:
            (plan,) = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            assert plan == f"SEARCH suppressions USING INDEX suppressions_address_scope {uses}"
        conn.close()
        for c in (store._reader, store._writer):  # per-connection settings
            assert c.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()


def test_sqlite_memory_path_works_too() -> None:
    store = SQLiteSuppressionStore(":memory:", clock=Clock(T0))
    store.add(entry("bob@example.net"))
    assert store.check("bob@example.net") is not None
    store.close()


def test_sqlite_writes_from_threads_while_the_loop_reads(tmp_path: Path) -> None:
    store = SQLiteSuppressionStore(tmp_path / "s.db")
    store.add(entry("always@example.net"))

    async def run() -> int:
        misses = 0
        writes = [asyncio.to_thread(store.add, entry(f"u{i}@example.net")) for i in range(200)]
        pending = asyncio.gather(*writes)
        while not pending.done():
            if store.check("always@example.net", now=T0) is None:
                misses += 1
            await asyncio.sleep(0)
        assert all(await pending)
        return misses

    try:
        assert asyncio.run(run()) == 0
        assert store.count() == 201
    finally:
        store.close()


def test_sqlite_concurrent_writers_in_threads(tmp_path: Path) -> None:
    store = SQLiteSuppressionStore(tmp_path / "s.db")
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(50):
                store.add(entry(f"t{t}-{i}@example.net"))
                if i % 2:
                    assert store.remove(f"t{t}-{i - 1}@example.net")
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    try:
        assert errors == []
        assert store.count() == 4 * 25  # each odd i removed i - 1: 25 of 50 stay per thread
    finally:
        store.close()
