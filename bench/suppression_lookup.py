"""How long does one suppression look-up take on a large store?

Fills a fresh SQLite suppression store with --entries addresses (one executemany in one
transaction, straight into the table the store created), reopens it as the relay would,
then times --checks check() calls for a random mix of present and absent addresses, with
the scopes the relay asks at send time: ("global", the sending domain).

    python bench/suppression_lookup.py [--entries 1000000] [--checks 100000] [--seed 7]
                                       [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from relay.suppression import GLOBAL, Reason
from relay.suppression.store import TABLE, SQLiteSuppressionStore

SCOPES = (GLOBAL, "shop.example")
REASONS = [str(r) for r in Reason]


def address(i: int) -> str:
    return f"user{i}.{i * 7919 % 100_003}@d{i % 5000}.example"


def rows(n: int, now: float, rng: random.Random) -> Iterator[tuple[object, ...]]:
    for i in range(n):
        scope = "shop.example" if i % 10 == 0 else GLOBAL  # a tenth per sending domain
        expires = now + 30 * 86400 if i % 20 == 1 else None
        yield (address(i), scope, REASONS[i % len(REASONS)], "550 5.1.1 user unknown",
               now - rng.random() * 365 * 86400, expires)


def fill(path: Path, n: int, rng: random.Random) -> float:
    """Insert n entries in one transaction; seconds taken."""
    SQLiteSuppressionStore(path).close()  # the schema, exactly as the relay creates it
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA synchronous=FULL")
    start = time.perf_counter()
    conn.execute("BEGIN")
    conn.executemany(
        f"INSERT INTO {TABLE} (address, scope, reason, detail, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?)", rows(n, time.time(), rng))
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - start


def percentile(sorted_values: list[float], p: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * p))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=1_000_000)
    ap.add_argument("--checks", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--dir", help="where to put the database (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="relay-supp-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "suppression.db"
    for old in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        old.unlink(missing_ok=True)

    fill_s = fill(path, args.entries, rng)
    size = path.stat().st_size
    print(f"filled {args.entries:,} entries in {fill_s:.2f} s "
          f"({args.entries / fill_s:,.0f}/s, one transaction); file {size / 2**20:.1f} MiB "
          f"({size / max(args.entries, 1):.0f} B/entry)")

    # Half present (any stored address), half absent (never stored), shuffled together.
    present = [address(rng.randrange(args.entries)) for _ in range(args.checks // 2)]
    absent = [address(args.entries + rng.randrange(10 * args.entries))
              for _ in range(args.checks - len(present))]
    work = [(a, True) for a in present] + [(a, False) for a in absent]
    rng.shuffle(work)

    store = SQLiteSuppressionStore(path)
    try:
        timings: dict[bool, list[float]] = {True: [], False: []}
        hits = 0
        clock = time.perf_counter_ns
        for addr, is_present in work:
            t0 = clock()
            found = store.check(addr, SCOPES)
            timings[is_present].append((clock() - t0) / 1000)
            hits += found is not None
        count = store.count()
    finally:
        store.close()

    # Present entries that expire (in 30 days) still suppress now; every present one hits.
    if hits != len(present):
        print(f"error: {hits} hits for {len(present)} present addresses", file=sys.stderr)
        return 1
    if not present or not absent:
        print("error: --checks must be at least 2", file=sys.stderr)
        return 2
    every = sorted(timings[True] + timings[False])
    print(f"{len(work):,} check() calls, scopes={SCOPES}, store of {count:,}:")
    for label, values in (("all", every), ("present", sorted(timings[True])),
                          ("absent", sorted(timings[False]))):
        print(f"  {label:<8} median {statistics.median(values):6.2f} us   "
              f"p99 {percentile(values, 0.99):6.2f} us   mean {statistics.fmean(values):6.2f} us")
    wal = path.with_name(path.name + "-wal")
    print(f"file: {path} {os.path.getsize(path) / 2**20:.1f} MiB"
          f" (+ wal {wal.stat().st_size if wal.exists() else 0} B)")
    if not args.keep and not args.dir:
        shutil.rmtree(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
