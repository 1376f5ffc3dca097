"""The short form of bench/crash.py: the real `relay serve` process SIGKILLed five times at
chosen moments (mid-DATA, during the commit, mid-delivery, right after the next hop's 250,
at random), restarted each time; every message that got a 250 must reach the sink
(DESIGN.md invariant 1), the queue database must pass PRAGMA integrity_check, and no lease
may be left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CRASH = Path(__file__).resolve().parents[2] / "bench" / "crash.py"


def test_sigkill_at_random_moments_loses_nothing_acknowledged() -> None:
    proc = subprocess.run(
        [sys.executable, str(CRASH), "--messages", "300", "--kills", "5", "--seconds", "45",
         "--drain-timeout", "40"],
        capture_output=True, text=True, timeout=120, check=False)
    print(proc.stdout)
    print(proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    figures = dict(line.split(None, 1) for line in proc.stdout.splitlines()
                   if line.split(None, 1)[:1] in (["lost"], ["kills"], ["250s"]))
    assert figures["lost"].split()[0] == "0"
    assert int(figures["kills"].split()[0]) == 5
    assert int(figures["250s"].split()[0]) > 0
