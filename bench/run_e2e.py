#!/usr/bin/env python3
"""End-to-end relay benchmark: loadgen -> relay -> sink.

For each run (``--repeat``, default 3) this script

1. creates a fresh temporary directory (fresh queue database),
2. starts ``bench/sink.py`` on an ephemeral loopback port,
3. writes ``relay.toml`` pointing the relay's smarthost at the sink and
   starts ``python -m relay serve --config TMP/relay.toml``,
4. waits until the relay's SMTP port answers with a 220 greeting,
5. runs ``bench/loadgen.py`` (``-n/-c/--size/--rcpts``) against the relay,
6. waits until the sink has received every accepted recipient (or
   ``--drain-timeout``),
7. samples the relay's CPU time (``/proc/PID/stat`` utime+stime, relay and
   its child processes) and memory (``VmHWM`` plus polled ``VmRSS``), then
   stops relay and sink.

It prints per run and as the median over runs: accepted/s (loadgen),
delivered/s end to end (accepted messages / (last arrival at the sink -
first send by loadgen)), p50/p99 time to 250, the relay's peak RSS and relay
CPU seconds per 1000 messages (measured from just before the load starts
until the last message reached the sink).

With ``--sink-only`` the relay is skipped and loadgen talks to the sink
directly: the "sink ceiling" (in practice the load generator's ceiling).

    python bench/run_e2e.py -n 10000 -c 10 --size 5120 --rcpts 1 --repeat 3
    python bench/run_e2e.py --sink-only -n 30000 -c 50
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

RELAY_TOML = """\
[server]
hostname = "relay.bench.test"
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
max_message_size = "25MiB"
max_recipients = 1000
[queue]
path = "var/relay.db"
[outbound]
mode = "smarthost"
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
max_connections = 10
[log]
file = "var/relay.log"
[http]
listen = "127.0.0.1:{http_port}"
"""


class BenchError(Exception):
    pass


# ---------------------------------------------------------------- helpers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def read_line_with_timeout(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError(f"no output from pid {proc.pid} within {timeout}s")
        return proc.stdout.readline().decode("utf-8", "replace").strip()
    finally:
        sel.close()


def tail(path: Path, n: int = 20) -> str:
    try:
        lines = path.read_text("utf-8", "replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def proc_tree(pid: int) -> list[int]:
    """pid plus all descendants (via /proc/PID/task/*/children)."""
    out: list[int] = []
    todo = [pid]
    while todo and len(out) < 10_000:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as fh:
                    todo.extend(int(c) for c in fh.read().split())
        except OSError:
            continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid, its live descendants and its reaped children."""
    total = 0.0
    for p in proc_tree(pid):
        try:
            with open(f"/proc/{p}/stat", encoding="ascii") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # after "(comm)": field 3 is index 0, so utime(14)=11, stime(15)=12,
        # cutime(16)=13, cstime(17)=14
        ticks = int(fields[11]) + int(fields[12])
        if p == pid:
            ticks += int(fields[13]) + int(fields[14])
        total += ticks / CLK_TCK
    return total


def status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Polls the summed VmRSS of a process tree; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.peak_kib = 0
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            total = sum(status_kib(p, "VmRSS") or 0 for p in proc_tree(self.pid))
            self.peak_kib = max(self.peak_kib, total)

    def stop(self) -> None:
        self._stop_evt.set()
        self.join(timeout=2)


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> tuple[int | None, float]:
    """SIGTERM, wait up to grace seconds, then SIGKILL. Returns (rc, seconds)."""
    t0 = time.monotonic()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
    return proc.returncode, time.monotonic() - t0


def wait_smtp_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> float:
    t0 = time.monotonic()
    deadline = t0 + timeout
    last_err = ""
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(
                f"relay exited with {proc.returncode} before accepting connections:\n" + tail(log)
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                greeting = s.recv(512)
                if greeting.startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    with contextlib.suppress(OSError):
                        s.recv(512)
                    return time.monotonic() - t0
                last_err = f"greeting {greeting[:60]!r}"
        except OSError as exc:
            last_err = str(exc)
        time.sleep(0.1)
    raise BenchError(f"relay SMTP port {port} not ready after {timeout}s ({last_err})")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# ---------------------------------------------------------------- one run
def relay_command(args: argparse.Namespace, cfg: Path) -> list[str]:
    if args.relay_cmd:
        return [
            part.replace("{config}", str(cfg)).replace("{python}", sys.executable)
            for part in shlex.split(args.relay_cmd)
        ]
    return [sys.executable, "-m", "relay", "serve", "--config", str(cfg)]


def start_sink(tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    log = open(tmp / "sink.log", "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        [
            sys.executable,
            str(BENCH_DIR / "sink.py"),
            "--listen",
            "127.0.0.1:0",
            "--stats-file",
            str(tmp / "sink.json"),
            "--max-runtime",
            "7200",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
    )
    log.close()
    try:
        line = read_line_with_timeout(proc, 15)
    except BenchError:
        stop_process(proc, 2)
        raise
    if not line.startswith("listening "):
        stop_process(proc, 2)
        raise BenchError(f"unexpected sink output {line!r}")
    return proc, int(line.rsplit(":", 1)[1])


def run_loadgen(args: argparse.Namespace, port: int, tmp: Path) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(BENCH_DIR / "loadgen.py"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-n",
        str(args.n),
        "-c",
        str(args.c),
        "--size",
        str(args.size),
        "--rcpts",
        str(args.rcpts),
        "--rcpt-domain",
        args.rcpt_domain,
        "--max-duration",
        str(args.load_timeout),
        "--json",
    ]
    if args.no_pipelining:
        cmd.append("--no-pipelining")
    try:
        cp = subprocess.run(cmd, capture_output=True, timeout=args.load_timeout + 120, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"loadgen did not finish within {args.load_timeout + 120}s") from exc
    (tmp / "loadgen.json").write_bytes(cp.stdout)
    if cp.stderr:
        (tmp / "loadgen.err").write_bytes(cp.stderr)
    try:
        result = json.loads(cp.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError) as exc:
        raise BenchError(
            f"loadgen rc={cp.returncode} gave no JSON: {cp.stderr.decode()[-2000:]}"
        ) from exc
    assert isinstance(result, dict)
    return result


def wait_delivered(
    stats_path: Path,
    expected_rcpts: int,
    timeout: float,
    relay: subprocess.Popen[bytes] | None,
) -> tuple[dict[str, Any], bool]:
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    last_change = last_print = time.monotonic()
    last_rcpts = -1
    while True:
        s = read_json(stats_path)
        if s is not None:
            stats = s
        got = int(stats.get("rcpts", 0))
        if got >= expected_rcpts:
            return stats, True
        if got != last_rcpts:
            last_rcpts, last_change = got, time.monotonic()
        if time.monotonic() > deadline:
            return stats, False
        if relay is not None and relay.poll() is not None:
            return stats, False
        # Progress report if delivery stalls for a while.
        now = time.monotonic()
        if now - last_change > 30 and now - last_print > 30:
            last_print = now
            print(f"    ... sink has {got}/{expected_rcpts} recipients", file=sys.stderr)
        time.sleep(0.2)


def one_run(args: argparse.Namespace, idx: int) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix=f"relay-bench-{idx}-"))
    (tmp / "var").mkdir()
    sink: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None
    sampler: RssSampler | None = None
    ok = False
    m: dict[str, Any] = {"tmp": str(tmp)}
    try:
        sink, sink_port = start_sink(tmp)
        m["sink_port"] = sink_port
        target_port = sink_port
        cpu0 = 0.0
        t_cpu0 = time.monotonic()
        if not args.sink_only:
            smtp_port, http_port = free_port(), free_port()
            while http_port == smtp_port:
                http_port = free_port()
            cfg = tmp / "relay.toml"
            cfg.write_text(
                RELAY_TOML.format(port=smtp_port, sink_port=sink_port, http_port=http_port)
            )
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
            )
            env.setdefault("PYTHONUNBUFFERED", "1")
            relay_log = tmp / "relay.out"
            with open(relay_log, "wb") as out:
                relay = subprocess.Popen(
                    relay_command(args, cfg),
                    cwd=tmp,
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            m["relay_pid"] = relay.pid
            m["startup_s"] = round(
                wait_smtp_ready(smtp_port, relay, args.start_timeout, relay_log), 3
            )
            sampler = RssSampler(relay.pid)
            sampler.start()
            cpu0 = cpu_seconds(relay.pid)
            t_cpu0 = time.monotonic()
            target_port = smtp_port

        lg = run_loadgen(args, target_port, tmp)
        m["loadgen"] = lg
        accepted = int(lg["accepted"])
        expected = int(lg.get("accepted_rcpts", accepted * args.rcpts))
        stats, complete = wait_delivered(tmp / "sink.json", expected, args.drain_timeout, relay)
        m["delivery_complete"] = complete
        if relay is not None:
            m["relay_cpu_s"] = cpu_seconds(relay.pid) - cpu0
            m["relay_cpu_util"] = round(m["relay_cpu_s"] / (time.monotonic() - t_cpu0), 3)
            m["relay_cpu_total_s"] = cpu_seconds(relay.pid)
            hwm = status_kib(relay.pid, "VmHWM")
            m["relay_vmhwm_mib"] = None if hwm is None else hwm / 1024
            assert sampler is not None
            sampler.stop()
            m["relay_peak_rss_tree_mib"] = sampler.peak_kib / 1024
            rc, secs = stop_process(relay, args.stop_timeout)
            m["relay_exit"] = rc
            m["relay_stop_s"] = round(secs, 3)
        stop_process(sink, 5)
        final = read_json(tmp / "sink.json") or stats
        m["sink"] = {
            k: final.get(k) for k in ("count", "rcpts", "first_ts", "last_ts", "connections")
        }

        first = lg.get("first_send_ts")
        last_arrival = final.get("last_ts")
        # Message equivalents: the relay may group or split recipients.
        rcpts_per_msg = expected / accepted if accepted else float(args.rcpts)
        delivered_msgs = int(final.get("rcpts", 0)) / max(1.0, rcpts_per_msg)
        m["accepted"] = accepted
        m["n"] = args.n
        m["delivered"] = delivered_msgs
        m["accepted_per_s"] = lg.get("accepted_per_s")
        m["p50_ms"] = lg["latency_ms"]["p50"]
        m["p99_ms"] = lg["latency_ms"]["p99"]
        if first and last_arrival and last_arrival > first:
            m["delivered_per_s"] = round(min(delivered_msgs, accepted) / (last_arrival - first), 1)
            m["e2e_s"] = round(last_arrival - first, 3)
            if lg.get("last_reply_ts"):
                m["drain_after_last_250_s"] = round(last_arrival - lg["last_reply_ts"], 3)
        else:
            m["delivered_per_s"] = None
        if relay is not None and accepted:
            m["relay_cpu_s_per_1000"] = round(m["relay_cpu_s"] / accepted * 1000, 3)
        ok = complete and accepted == args.n
        return m
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if relay is not None and relay.poll() is None:
            stop_process(relay, 5)
        if sink is not None and sink.poll() is None:
            stop_process(sink, 5)
        if args.keep or not ok:
            m["kept"] = True
            print(f"    run dir kept: {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- output
SUMMARY_KEYS = [
    ("accepted_per_s", "accepted/s", "{:.0f}"),
    ("delivered_per_s", "delivered/s e2e", "{:.0f}"),
    ("p50_ms", "p50 to 250 ms", "{:.2f}"),
    ("p99_ms", "p99 to 250 ms", "{:.2f}"),
    ("relay_vmhwm_mib", "relay VmHWM MiB", "{:.1f}"),
    ("relay_peak_rss_tree_mib", "relay peak RSS (tree) MiB", "{:.1f}"),
    ("relay_cpu_s_per_1000", "relay CPU s/1000 msgs", "{:.3f}"),
    ("relay_cpu_util", "relay CPU busy (cores)", "{:.2f}"),
    ("drain_after_last_250_s", "drain after last 250 s", "{:.2f}"),
]


def fmt(v: Any, f: str) -> str:
    return "-" if v is None else f.format(v)


def describe_run(i: int, m: dict[str, Any]) -> str:
    parts = [f"run {i}: accepted {m['accepted']}/{m['n']}, delivered {m['delivered']:.0f}"]
    if not m.get("delivery_complete"):
        parts.append("INCOMPLETE")
    for key, label, f in SUMMARY_KEYS:
        if key in m:
            parts.append(f"{label} {fmt(m[key], f)}")
    lg = m.get("loadgen", {})
    if lg.get("refused_by_code"):
        parts.append(f"refused {lg['refused_by_code']}")
    if "relay_exit" in m and m["relay_exit"] != 0:
        parts.append(f"relay exit {m['relay_exit']} after {m.get('relay_stop_s')}s")
    if lg.get("rcpt_refused_by_code"):
        parts.append(f"rcpt refused {lg['rcpt_refused_by_code']}")
    if lg.get("errors"):
        parts.append(f"errors {lg['error_kinds']}")
    return "; ".join(parts)


def median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, Any] = {}
    for key, _, _ in SUMMARY_KEYS:
        vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        med[key] = statistics.median(vals) if vals else None
    return med


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="end-to-end relay benchmark")
    p.add_argument("-n", type=int, default=10000, help="messages per run")
    p.add_argument("-c", type=int, default=10, help="loadgen connections")
    p.add_argument("--size", type=int, default=5120, help="body size in bytes")
    p.add_argument("--rcpts", type=int, default=1, help="recipients per message")
    p.add_argument("--rcpt-domain", default="example.net")
    p.add_argument("--repeat", type=int, default=3, help="runs; the median is reported")
    p.add_argument("--keep", action="store_true", help="keep the temp dir of every run")
    p.add_argument("--sink-only", action="store_true", help="loadgen -> sink, no relay")
    p.add_argument("--no-pipelining", action="store_true", help="passed to loadgen")
    p.add_argument(
        "--relay-cmd",
        default=None,
        help="command to start the relay instead of 'python -m relay serve --config "
        "{config}' ({config} and {python} are substituted); run with cwd = run dir",
    )
    p.add_argument("--start-timeout", type=float, default=30.0)
    p.add_argument("--load-timeout", type=float, default=900.0)
    p.add_argument("--drain-timeout", type=float, default=300.0)
    p.add_argument("--stop-timeout", type=float, default=20.0)
    p.add_argument("--json", action="store_true", help="print one JSON object at the end")
    args = p.parse_args(argv)
    if args.n < 1 or args.c < 1 or args.repeat < 1 or args.rcpts < 1:
        p.error("-n, -c, --rcpts and --repeat must be >= 1")

    log = sys.stderr if args.json else sys.stdout
    label = "sink ceiling (loadgen -> sink)" if args.sink_only else "relay e2e"
    print(
        f"{label}: n={args.n} c={args.c} size={args.size} rcpts={args.rcpts} repeat={args.repeat}",
        file=sys.stderr,
    )
    runs: list[dict[str, Any]] = []
    failed = 0
    for i in range(1, args.repeat + 1):
        try:
            m = one_run(args, i)
        except BenchError as exc:
            failed += 1
            print(f"run {i}: FAILED: {exc}", file=log, flush=True)
            continue
        runs.append(m)
        print(describe_run(i, m), file=log, flush=True)
        if not m.get("delivery_complete") or m["accepted"] != args.n:
            failed += 1

    med = median_of(runs) if runs else {}
    if args.json:
        print(json.dumps({"label": label, "args": vars(args), "median": med, "runs": runs}))
    elif runs:
        print(f"\n{label}, median of {len(runs)} run(s):")
        for key, lbl, f in SUMMARY_KEYS:
            if med.get(key) is not None:
                print(f"  {lbl:<28} {fmt(med[key], f)}")
    return 1 if failed or not runs else 0


if __name__ == "__main__":
    sys.exit(main())
