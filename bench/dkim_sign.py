"""Cost of one DKIM signature: dkimpy's own path against relay's fast path.

    python bench/dkim_sign.py [-n 200] [--json]

For a 5 KB and a 50 KB message it times `Signer.sign` (median of N calls, in ms):

* dkimpy RSA-2048      - `Signer(fast=False)`: dkimpy's `dkim.sign`, pure-Python RSA
* fast RSA-2048        - dkimpy's canonicalisation + `cryptography`'s RSA, body hashed
* dkimpy Ed25519 / fast Ed25519
* fast RSA+Ed25519     - dual signing, one message, two signatures
* fast RSA per rcpt    - the same body for each recipient with a different
                         List-Unsubscribe header: the body hash is reused

Every message in the non-reuse rows has its own body, so the body-hash cache never hits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography.hazmat.primitives import serialization

from relay.outbound.dkim import DkimKey, Signer, generate_private_key

HEAD = (b"From: News <news@example.com>\r\n"
        b"To: reader@example.net\r\n"
        b"Subject: Weekly news from example.com\r\n"
        b"Date: Thu, 03 Dec 2026 10:00:00 +0000\r\n"
        b"Message-ID: <bench-%d@example.com>\r\n"
        b"MIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n")
LINE = b"The quick brown fox jumps over the lazy dog; the relay signs what it sends. \r\n"


def message(size: int, seq: int, extra_header: bytes = b"") -> bytes:
    """About `size` bytes: headers, then 78-byte lines; `seq` makes the body unique."""
    head = HEAD % seq + extra_header + b"\r\n"
    lines = max(1, (size - len(head)) // len(LINE))
    return head + b"message %08d\r\n" % seq + LINE * (lines - 1)


def key(algorithm: str, selector: str) -> DkimKey:
    pem = generate_private_key(algorithm).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return DkimKey.from_pem("example.com", selector, pem)


def median_ms(sign: Callable[[bytes], bytes], messages: list[bytes]) -> float:
    sign(messages[0])  # warm-up (imports, first-call caches)
    times = []
    for m in messages:
        start = time.perf_counter()
        sign(m)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def run(n: int) -> list[dict[str, object]]:
    rsa, ed = key("rsa", "rsa1"), key("ed25519", "ed1")
    rows: list[dict[str, object]] = []
    for size in (5 * 1024, 50 * 1024):
        fresh = [message(size, i) for i in range(n + 1)]
        same_body = [message(size, 0, b"List-Unsubscribe: <https://example.com/u/%d>\r\n" % i)
                     for i in range(n + 1)]
        # A fresh Message-ID header changes the header only; the body stays the same.
        same_body = [m.replace(b"<bench-0@", b"<bench-r%d@" % i, 1)
                     for i, m in enumerate(same_body)]
        slow_n = max(10, n // 5)  # dkimpy's RSA is slow: fewer rounds
        cases: list[tuple[str, Signer, list[bytes]]] = [
            ("dkimpy RSA-2048", Signer([rsa], fast=False), fresh[:slow_n + 1]),
            ("fast RSA-2048", Signer([rsa]), fresh),
            ("dkimpy Ed25519", Signer([ed], fast=False), fresh),
            ("fast Ed25519", Signer([ed]), fresh),
            ("fast RSA+Ed25519 (2 sigs)", Signer([rsa, ed]), fresh),
            ("fast RSA per rcpt, bh reused", Signer([rsa]), same_body),
            ("fast Ed25519 per rcpt, bh reused", Signer([ed]), same_body),
        ]
        for name, signer, messages in cases:
            ms = median_ms(signer.sign, messages)
            rows.append({"size": f"{size // 1024} KB", "case": name, "ms": round(ms, 3),
                         "n": len(messages) - 1})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", type=int, default=200, help="signatures per case (dkimpy RSA: n/5)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = run(args.n)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'size':>6}  {'case':<34} {'ms/signature':>12}  {'n':>5}")
    for row in rows:
        print(f"{row['size']:>6}  {row['case']:<34} {row['ms']:>12.3f}  {row['n']:>5}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
