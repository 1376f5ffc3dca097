#!/usr/bin/env python3
"""relay against Postfix, same load, same machine, one go (issue 9).

Targets, each measured with bench/loadgen.py into bench/sink.py (helpers imported from
bench/run_e2e.py), on loopback only:

* Postfix (Debian package; installed with apt-get when missing) as a relay to the sink: a
  private instance with its own config_directory, queue_directory and data_directory in a
  temp dir, started with ``postfix -c DIR start`` and stopped with ``postfix -c DIR stop``;
  the system instance is neither needed nor touched.
* relay with DKIM (RSA-2048 key generated at run time by ``python -m relay dkim keygen``) and
  List-Unsubscribe (default_stream = "marketing", RELAY_UNSUBSCRIBE_SECRET generated at run
  time, [http] on a free port), delivering to the sink.

Rows: 5 KB and 50 KB bodies x 10 and 50 sessions x 1 and 10 recipients. Per row and target:
accepted/s, delivered/s end to end, p50/p99 time to the 250, CPU seconds per 1000 messages
and peak RSS (summed over the process tree) of the server, and relay / Postfix (delivered/s).

Then the targets of the issue, each printed with PASS/FAIL:

* delivered/s e2e >= 1.5 x Postfix, 5 KB, 10 and 50 sessions (from the rows);
* relay p99 time to 250 <= 20 ms at 10 sessions (from the rows);
* relay peak RSS <= 150 MB with 1000 idle client connections (greeting + EHLO, then idle),
  measured separately, with a 5 KB c=10 load run while they are open;
* relay throughput flat within 10 % between a store holding 10,000 and one holding
  1,000,000 queued-but-not-due messages (the queue DB is filled offline with SQL matching
  relay/queue/sqlite.py), measured separately.

    python bench/compare.py                      # everything, medians of --repeat 3
    python bench/compare.py --quick --repeat 1   # 5 KB rows only
    python bench/compare.py --skip-rows --store-big 200000   # only idle + store checks
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import run_e2e as e2e  # bench/ is not a package: imported by path

MIB = 1024 * 1024
DKIM_DOMAIN = "bench.test"  # loadgen's From: is bench@bench.test
DKIM_SELECTOR = "bench"

RELAY_TOML = """\
[server]
hostname = "relay.bench.test"
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
default_stream = "marketing"
max_message_size = "25MiB"
max_recipients = 1000
max_sessions = {max_sessions}
[queue]
path = "var/relay.db"
[outbound]
mode = "smarthost"
smarthost = "127.0.0.1:{sink_port}"
tls = "none"
max_connections = {out_conns}
delivery_process = {delivery_process}
[log]
file = "var/relay.log"
[http]
listen = "127.0.0.1:{http_port}"
public_url = "http://127.0.0.1:{http_port}"
[unsubscribe]
secret_env = "RELAY_UNSUBSCRIBE_SECRET"
[suppression]
path = "var/suppression.db"
[[dkim]]
domain = "{dkim_domain}"
selector = "{dkim_selector}"
key = "{key}"
"""

POSTFIX_MAIN_CF = """\
# private benchmark instance written by bench/compare.py
compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
syslog_name = postfix-bench
maillog_file = {d}/maillog
maillog_file_prefixes = {d}
myhostname = postfix.bench.test
mydomain = bench.test
myorigin = $myhostname
inet_interfaces = loopback-only
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
mydestination =
relay_domains =
local_recipient_maps =
local_transport = error:5.1.1 local delivery is disabled
alias_maps =
alias_database =
relayhost = [127.0.0.1]:{sink_port}
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_banner = $myhostname ESMTP
smtpd_peername_lookup = no
smtpd_recipient_limit = 1000
message_size_limit = 26214400
default_destination_concurrency_limit = {out_conns}
smtp_connection_cache_on_demand = yes
smtp_tls_security_level = none
smtpd_tls_security_level = none
biff = no
"""

# chroot off everywhere (nothing to copy into the queue dir); no local, no pipes, no TLS.
POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
proxywrite unix - - n - 1 proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


POSTFIX_EXE_DIRS = ("/usr/lib/postfix/", "/usr/libexec/postfix/", "/usr/sbin/post")


def relay_revision() -> str:
    """The commit the relay runs from, "+dirty" when relay/ has uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10, check=False)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--",
                                "relay"], capture_output=True, text=True, timeout=10,
                               check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class PidProc:
    """Enough of Popen (poll/returncode) for run_e2e's waits, for a daemon we did not fork."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and not os.path.exists(f"/proc/{self.pid}"):
            self.returncode = -1
        return self.returncode


def pss_kib(pid: int) -> int:
    """Proportional set size: shared pages split between the processes that map them, so a
    sum over Postfix's many processes does not count libc and friends fifty times."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class MemSampler(e2e.RssSampler):
    """run_e2e's tree RSS sampler, also keeping the peak of the tree's summed PSS."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(pid, interval)
        self.peak_pss_kib = 0

    def run(self) -> None:
        while not self._stop_evt.wait(self.interval):
            tree = e2e.proc_tree(self.pid)
            self.peak_kib = max(self.peak_kib, sum(e2e.status_kib(p, "VmRSS") or 0 for p in tree))
            self.peak_pss_kib = max(self.peak_pss_kib, sum(pss_kib(p) for p in tree))


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent not idle (all cores, /proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / e2e.CLK_TCK  # not idle, not iowait


def cpu_snapshot() -> dict[int, tuple[bool, int]]:
    """pid -> (is a kernel thread, utime+stime ticks of that process alone)."""
    out: dict[int, tuple[bool, int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(name)] = (fields[1] == "2" or name == "2", int(fields[11]) + int(fields[12]))
    return out


def cpu_split(before: dict[int, tuple[bool, int]], after: dict[int, tuple[bool, int]],
              ours: set[int]) -> tuple[float, float]:
    """(kernel threads, other user processes) CPU seconds between two snapshots. Processes
    that started and ended in between are missed; that is the price of not double-counting
    what a parent reaps."""
    kernel = foreign = 0
    for pid, (kthread, ticks) in after.items():
        was = before.get(pid)
        delta = ticks - (was[1] if was is not None and was[0] == kthread else 0)
        if kthread:
            kernel += max(0, delta)
        elif pid not in ours:
            foreign += max(0, delta)
    return kernel / e2e.CLK_TCK, foreign / e2e.CLK_TCK


def wait_quiet(max_wait: float, threshold: float = 0.3) -> float:
    """Before a run: wait (up to max_wait s) until the machine is nearly idle, i.e. other
    work on this shared VM uses less than `threshold` cores over one second. Returns the
    cores in use when it stopped waiting."""
    deadline = time.monotonic() + max_wait
    waited = False
    while True:
        b0 = machine_busy_s()
        time.sleep(1.0)
        used = machine_busy_s() - b0
        if used < threshold or time.monotonic() >= deadline:
            if waited:
                log(f"    (machine busy: {used:.2f} cores in use; going on)")
            return used
        if not waited:
            log(f"    (machine busy: {used:.2f} cores in use by other work; waiting up to "
                f"{max_wait:.0f} s)")
            waited = True
        time.sleep(2.0)


def own_cpu_s(*pids: int) -> float:
    """CPU seconds of this script, its reaped children (loadgen) and the given process
    trees (the server, the sink)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + sum(e2e.cpu_seconds(p) for p in pids))


def raise_nofile(want: int = 65536) -> tuple[int, int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def loadgen_args(args: argparse.Namespace, n: int, c: int, size: int, rcpts: int,
                 ) -> argparse.Namespace:
    """The namespace run_e2e.run_loadgen reads."""
    return argparse.Namespace(n=n, c=c, size=size, rcpts=rcpts, rcpt_domain="example.net",
                              load_timeout=args.load_timeout, no_pipelining=False)


# ---------------------------------------------------------------- Postfix
def postfix_binary() -> str | None:
    return shutil.which("postfix") or (
        "/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)


def ensure_postfix() -> str:
    """Path of the postfix command; installs the Debian package when it is missing."""
    found = postfix_binary()
    if found:
        return found
    log("postfix is not installed: apt-get install -y postfix")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "postfix"]
    cp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, check=False)
    if cp.returncode != 0:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600,
                       check=False)
        cp = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900,
                            check=False)
    found = postfix_binary()
    if not found:
        raise e2e.BenchError(f"apt-get install postfix failed (rc={cp.returncode}): "
                             f"{cp.stderr[-1500:]}")
    return found


class Postfix:
    """A private Postfix instance in DIR (config, queue, data and maillog all under it)."""

    def __init__(self, postfix: str, d: Path, port: int, sink_port: int, out_conns: int) -> None:
        self.postfix = postfix
        self.dir = d
        self.conf = d / "conf"
        self.port = port
        self.master: PidProc | None = None
        self.conf.mkdir(parents=True)
        (d / "queue").mkdir()
        (d / "data").mkdir()
        # Postfix daemons run as `postfix` and chdir into the queue: they must get through.
        for p in (d.parent, d, self.conf, d / "queue"):
            p.chmod(0o755)
        shutil.chown(d / "data", "postfix")
        (self.conf / "main.cf").write_text(POSTFIX_MAIN_CF.format(
            d=d, sink_port=sink_port, out_conns=out_conns))
        (self.conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=port))

    def _run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([self.postfix, "-c", str(self.conf), *argv], capture_output=True,
                              text=True, timeout=timeout, check=False)

    def start(self, timeout: float) -> float:
        cp = self._run("check")
        if cp.returncode != 0 or "warning" in (cp.stdout + cp.stderr).lower():
            raise e2e.BenchError(f"postfix -c {self.conf} check failed (rc={cp.returncode}):\n"
                                 f"{cp.stdout}{cp.stderr}\n{e2e.tail(self.dir / 'maillog')}")
        t0 = time.monotonic()
        cp = self._run("start")
        if cp.returncode != 0:
            raise e2e.BenchError(f"postfix -c {self.conf} start failed (rc={cp.returncode}):\n"
                                 f"{cp.stdout}{cp.stderr}\n{e2e.tail(self.dir / 'maillog')}")
        pidfile = self.dir / "queue" / "pid" / "master.pid"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, ValueError):
                self.master = PidProc(int(pidfile.read_text().split()[0]))
                break
            time.sleep(0.05)
        if self.master is None:
            raise e2e.BenchError(f"no {pidfile} after postfix start\n"
                                 f"{e2e.tail(self.dir / 'maillog')}")
        e2e.wait_smtp_ready(self.port, self.master, timeout,  # type: ignore[arg-type]
                            self.dir / "maillog")
        return time.monotonic() - t0

    def stop(self) -> None:
        if self.master is None:
            return
        pids = e2e.proc_tree(self.master.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._run("stop", timeout=30)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{p}") for p in pids):
            time.sleep(0.1)
        for p in pids:  # leftovers of this instance only: by pid, and still a Postfix program
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{p}/exe").startswith(POSTFIX_EXE_DIRS):
                    os.kill(p, 9)
        self.master = None


# ---------------------------------------------------------------- relay
class RelaySetup:
    """What every relay run shares: the DKIM key and the unsubscribe secret."""

    def __init__(self, root: Path, args: argparse.Namespace) -> None:
        self.args = args
        self.secret = secrets.token_urlsafe(32)
        keydir = root / "dkim"
        cp = subprocess.run(
            [sys.executable, "-m", "relay", "dkim", "keygen", "--domain", DKIM_DOMAIN,
             "--selector", DKIM_SELECTOR, "--bits", "2048", "--out", str(keydir)],
            cwd=root, env=self.env(), capture_output=True, text=True, timeout=120, check=False)
        self.key = keydir / f"{DKIM_DOMAIN}.{DKIM_SELECTOR}.pem"
        if cp.returncode != 0 or not self.key.exists():
            raise e2e.BenchError(f"relay dkim keygen failed: {cp.stdout}{cp.stderr}")

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["RELAY_UNSUBSCRIBE_SECRET"] = self.secret
        return env

    def write_config(self, d: Path, sink_port: int) -> tuple[Path, int]:
        (d / "var").mkdir(exist_ok=True)
        port = e2e.free_port()
        http_port = e2e.free_port()
        while http_port == port:
            http_port = e2e.free_port()
        cfg = d / "relay.toml"
        cfg.write_text(RELAY_TOML.format(
            port=port, sink_port=sink_port, http_port=http_port,
            max_sessions=self.args.max_sessions, out_conns=self.args.out_conns,
            delivery_process="false" if self.args.single_process else "true",
            dkim_domain=DKIM_DOMAIN, dkim_selector=DKIM_SELECTOR, key=self.key))
        return cfg, port

    def start(self, d: Path, cfg: Path, port: int) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "relay", "serve", "--config", str(cfg)]
        with open(d / "relay.out", "ab") as out:
            proc = subprocess.Popen(
                cmd,
                cwd=d, env=self.env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            e2e.wait_smtp_ready(port, proc, self.args.start_timeout, d / "relay.out")
        except BaseException:
            e2e.stop_process(proc, 5)
            raise
        if self.args.profile:
            # py-spy attached to the relay and its delivery process; it writes its raw
            # stacks when the relay exits
            out_file = Path(self.args.profile).resolve() / f"{d.name}.txt"
            out_file.parent.mkdir(parents=True, exist_ok=True)
            subprocess.Popen(["py-spy", "record", "--subprocesses", "--threads", "-r", "250",
                              "-f", "raw", "-o", str(out_file), "--pid", str(proc.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        return proc


def verify_relay_output(setup: RelaySetup, root: Path) -> str:
    """One message through the relay into `relay demo-sink`: DKIM-Signature (verified with
    dkimpy against the generated key) and List-Unsubscribe must be on it."""
    import smtplib

    import dkim  # dkimpy, a dependency of relay

    from relay.outbound.dkim import DkimKey

    d = root / "verify"
    d.mkdir()
    sink_port = e2e.free_port()
    mail_dir = d / "mail"
    sink = subprocess.Popen([sys.executable, "-m", "relay", "demo-sink", "--listen",
                             f"127.0.0.1:{sink_port}", "--dir", str(mail_dir)],
                            cwd=d, env=setup.env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    relay: subprocess.Popen[bytes] | None = None
    try:
        cfg, port = setup.write_config(d, sink_port)
        relay = setup.start(d, cfg, port)
        msg = (b"From: Bench <bench@bench.test>\r\nTo: rcpt0@example.net\r\n"
               b"Subject: verify\r\nMessage-ID: <verify@bench.test>\r\n\r\nhello\r\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.sendmail("bench@bench.test", ["rcpt0@example.net"], msg)
        deadline = time.monotonic() + 30
        files: list[Path] = []
        while time.monotonic() < deadline and not files:
            files = sorted(mail_dir.glob("*.eml")) if mail_dir.exists() else []
            time.sleep(0.1)
        if not files:
            raise e2e.BenchError("verify: nothing reached the demo sink\n"
                                 + e2e.tail(d / "var" / "relay.log"))
        raw = files[0].read_bytes()
        body = b"\r\n".join(line for line in raw.split(b"\r\n")
                            if not line.startswith(b"X-Demo-"))
        key = DkimKey.load(DKIM_DOMAIN, DKIM_SELECTOR, setup.key)
        txt = key.txt_record().encode()
        ok = dkim.verify(body, dnsfunc=lambda name, timeout=5: txt)
        lu = b"\nList-Unsubscribe:" in body and b"\nList-Unsubscribe-Post:" in body
        if not ok or b"a=rsa-sha256" not in body or not lu:
            raise e2e.BenchError(f"verify: DKIM ok={ok}, List-Unsubscribe={lu}:\n"
                                 f"{body[:1500].decode('utf-8', 'replace')}")
        return "DKIM rsa-sha256 signature verified (dkimpy), List-Unsubscribe(-Post) present"
    finally:
        if relay is not None:
            e2e.stop_process(relay, 10)
        e2e.stop_process(sink, 5)


# ---------------------------------------------------------------- one measured run
def measure(args: argparse.Namespace, kind: str, run_dir: Path, lg: argparse.Namespace,
            start: Callable[[int], tuple[int, Any]], stop: Callable[[Any], None],
            pid_of: Callable[[Any], int]) -> dict[str, Any]:
    """sink -> server (start(sink_port) -> (smtp_port, handle)) -> loadgen -> drain.

    Same arithmetic as run_e2e.one_run: delivered/s = accepted messages / (last arrival at
    the sink - first MAIL by loadgen); CPU and RSS of the server's process tree."""
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet = getattr(args, "quiet_wait", 0)
    idle_before = wait_quiet(quiet) if quiet > 0 else None
    sink, sink_port = e2e.start_sink(run_dir)
    handle: Any = None
    sampler: MemSampler | None = None
    m: dict[str, Any] = {"kind": kind, "busy_before_cores": idle_before}
    try:
        port, handle = start(sink_port)
        pid = pid_of(handle)
        sampler = MemSampler(pid)
        sampler.start()
        cpu0, t0 = e2e.cpu_seconds(pid), time.monotonic()
        busy0, own0, snap0 = machine_busy_s(), own_cpu_s(pid, sink.pid), cpu_snapshot()
        ours0 = set(e2e.proc_tree(pid))
        sink_cpu0 = e2e.cpu_seconds(sink.pid)
        kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        res = e2e.run_loadgen(lg, port, run_dir)
        kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # loadgen, reaped by now
        accepted = int(res["accepted"])
        expected = int(res.get("accepted_rcpts", accepted * lg.rcpts))
        alive = handle if isinstance(handle, subprocess.Popen) else PidProc(pid)
        stats, complete = e2e.wait_delivered(run_dir / "sink.json", expected,
                                             args.drain_timeout, alive)
        cpu = e2e.cpu_seconds(pid) - cpu0
        sink_cpu = e2e.cpu_seconds(sink.pid) - sink_cpu0
        loadgen_cpu = (kids1.ru_utime + kids1.ru_stime) - (kids0.ru_utime + kids0.ru_stime)
        wall = max(1e-9, time.monotonic() - t0)
        m["cpu_busy"] = round(cpu / wall, 3)
        # CPU not used by the benchmark's processes: kernel threads (kworkers, the journal:
        # partly work the server causes, e.g. fsync and process churn), other user
        # processes on this shared machine (a run with much of it is flagged as noisy), and
        # the rest (interrupts, softirq, tick rounding over many processes).
        ours = ours0 | set(e2e.proc_tree(pid)) | set(e2e.proc_tree(os.getpid()))
        kthreads, other = cpu_split(snap0, cpu_snapshot(), ours)
        rest = (machine_busy_s() - busy0) - (own_cpu_s(pid, sink.pid) - own0) - kthreads - other
        m["kthreads_cores"] = round(kthreads / wall, 2)
        m["other_cores"] = round(other / wall, 2)
        m["unattributed_cores"] = round(rest / wall, 2)
        hwm = e2e.status_kib(pid, "VmHWM")
        sampler.stop()
        stop(handle)
        handle = None
        e2e.stop_process(sink, 5)
        final = e2e.read_json(run_dir / "sink.json") or stats
        first, last = res.get("first_send_ts"), final.get("last_ts")
        per_msg = expected / accepted if accepted else float(lg.rcpts)
        delivered = int(final.get("rcpts", 0)) / max(1.0, per_msg)
        m.update(
            n=lg.n, accepted=accepted, delivered=delivered, complete=complete,
            accepted_per_s=res.get("accepted_per_s"),
            p50_ms=res["latency_ms"]["p50"], p99_ms=res["latency_ms"]["p99"],
            cpu_s_per_1000=round(cpu / accepted * 1000, 3) if accepted else None,
            # the next hop's and the load generator's CPU: work on the same two cores
            sink_cpu_s_per_1000=round(sink_cpu / accepted * 1000, 3) if accepted else None,
            loadgen_cpu_s_per_1000=(round(loadgen_cpu / accepted * 1000, 3) if accepted
                                    else None),
            vmhwm_mib=None if hwm is None else round(hwm / 1024, 1),
            peak_rss_mib=round(sampler.peak_kib / 1024, 1),
            peak_pss_mib=round(sampler.peak_pss_kib / 1024, 1),
            refused=res.get("refused_by_code") or None, errors=res.get("error_kinds") or None,
            # SMTP transactions the sink saw per accepted message (relay: one per recipient
            # on the marketing stream, each with its own List-Unsubscribe and signature)
            tx_per_msg=round(int(final.get("count", 0)) / accepted, 2) if accepted else None,
            delivered_per_s=(round(min(delivered, accepted) / (last - first), 1)
                             if first and last and last > first else None))
        if not complete or accepted != lg.n:
            m["problem"] = (f"accepted {accepted}/{lg.n}, sink has {final.get('rcpts')}/"
                            f"{expected} rcpts")
        return m
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if handle is not None:
            stop(handle)
        if sink.poll() is None:
            e2e.stop_process(sink, 5)


def run_postfix(args: argparse.Namespace, pf_bin: str, d: Path, lg: argparse.Namespace,
                ) -> dict[str, Any]:
    def start(sink_port: int) -> tuple[int, Postfix]:
        port = e2e.free_port()
        pf = Postfix(pf_bin, d / "postfix", port, sink_port, args.out_conns)
        try:
            pf.start(args.start_timeout)
        except BaseException:
            pf.stop()
            raise
        return port, pf

    def stop(pf: Postfix) -> None:
        pf.stop()

    def pid_of(pf: Postfix) -> int:
        assert pf.master is not None
        return pf.master.pid

    return measure(args, "postfix", d, lg, start, stop, pid_of)


def run_relay(args: argparse.Namespace, setup: RelaySetup, d: Path, lg: argparse.Namespace,
              ) -> dict[str, Any]:
    def start(sink_port: int) -> tuple[int, subprocess.Popen[bytes]]:
        cfg, port = setup.write_config(d, sink_port)
        return port, setup.start(d, cfg, port)

    def stop(proc: subprocess.Popen[bytes]) -> None:
        rc, _ = e2e.stop_process(proc, args.stop_timeout)
        if rc not in (0, None):
            log(f"    relay exited with {rc}: {e2e.tail(d / 'relay.out', 5)}")

    return measure(args, "relay", d, lg, start, stop, lambda p: p.pid)


# ---------------------------------------------------------------- rows
KEYS = ("accepted_per_s", "delivered_per_s", "p50_ms", "p99_ms", "cpu_s_per_1000",
        "sink_cpu_s_per_1000", "loadgen_cpu_s_per_1000",
        "peak_rss_mib", "peak_pss_mib", "vmhwm_mib", "cpu_busy", "other_cores", "kthreads_cores",
        "unattributed_cores", "tx_per_msg")


def median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(runs)}
    for k in KEYS:
        vals = [r[k] for r in runs if isinstance(r.get(k), int | float)]
        out[k] = statistics.median(vals) if vals else None
    out["problems"] = [r["problem"] for r in runs if r.get("problem")]
    return out


def rows_wanted(args: argparse.Namespace) -> list[tuple[int, int, int, int]]:
    """(size, sessions, rcpts, n) in the order they run."""
    sizes = [5120] if args.quick else [5120, 51200]
    n_large = args.n_large if args.n_large is not None else (
        2000 if args.n is None else max(1, args.n // 5))
    n_small = args.n if args.n is not None else 10000
    rows = [(size, c, r, n_small if size == 5120 else n_large)
            for size in sizes for c in (10, 50) for r in (1, 10)]
    if args.rows:
        # "--rows 50:10:1,5:50:10": KB:sessions:recipients, only those rows
        wanted = {tuple(int(x) for x in spec.split(":")) for spec in args.rows.split(",")}
        rows = [row for row in rows if (row[0] // 1024, row[1], row[2]) in wanted]
    return rows


def run_rows(args: argparse.Namespace, root: Path, setup: RelaySetup, pf_bin: str | None,
             pf_error: str | None) -> list[dict[str, Any]]:
    table: list[dict[str, Any]] = []
    for size, c, rcpts, n in rows_wanted(args):
        row: dict[str, Any] = {"size": size, "c": c, "rcpts": rcpts, "n": n}
        lg = loadgen_args(args, n, c, size, rcpts)
        runs: dict[str, list[dict[str, Any]]] = {"postfix": [], "relay": []}
        for rep in range(1, args.repeat + 1):
            # Interleaved, so that drift on this shared VM hits both alike.
            for kind in ("postfix", "relay"):
                if kind == "postfix" and pf_bin is None:
                    continue
                d = Path(tempfile.mkdtemp(prefix=f"{kind}-", dir=root))
                try:
                    if kind == "postfix":
                        assert pf_bin is not None
                        m = run_postfix(args, pf_bin, d, lg)
                    else:
                        m = run_relay(args, setup, d, lg)
                except e2e.BenchError as exc:
                    log(f"  {size // 1024}KB c={c} r={rcpts} {kind} run {rep}: FAILED: {exc}")
                    runs[kind].append({"problem": str(exc)[:300]})
                    continue
                runs[kind].append(m)
                log(f"  {size // 1024}KB c={c} r={rcpts} {kind} run {rep}: "
                    f"acc/s {m['accepted_per_s']} del/s {m['delivered_per_s']} "
                    f"p50/p99 {m['p50_ms']}/{m['p99_ms']} ms cpu/1k {m['cpu_s_per_1000']} "
                    f"rss {m['peak_rss_mib']} MiB busy {m['cpu_busy']} "
                    f"kthreads {m['kthreads_cores']} other {m['other_cores']} "
                    f"unattributed {m['unattributed_cores']}"
                    + (f" PROBLEM {m['problem']}" if m.get("problem") else ""))
                if not args.keep and not m.get("problem"):
                    shutil.rmtree(d, ignore_errors=True)
        row["postfix"] = median(runs["postfix"]) if runs["postfix"] else {"error": pf_error}
        row["relay"] = median(runs["relay"])
        pf_d, r_d = row["postfix"].get("delivered_per_s"), row["relay"].get("delivered_per_s")
        row["ratio"] = round(r_d / pf_d, 2) if pf_d and r_d else None
        table.append(row)
    return table


def f(v: Any, spec: str = "{:.0f}") -> str:
    return "-" if v is None else spec.format(v)


def print_rows(table: list[dict[str, Any]], repeat: int) -> None:
    print(f"\nRows (median of {repeat} run(s); CPU, RSS and PSS summed over each server's "
          "process tree; busy = CPU s / wall s, load start to last delivery)")
    hdr = (f"{'size':>5} {'sess':>4} {'rcpt':>4} {'server':<8} {'acc/s':>7} {'del/s':>7} "
           f"{'p50 ms':>7} {'p99 ms':>7} {'CPU s/1k':>8} {'busy':>5} {'RSS MiB':>8} {'PSS MiB':>8}"
           f" {'tx/msg':>6}  relay/postfix")
    print(hdr)
    print("-" * len(hdr))
    for row in table:
        for kind in ("postfix", "relay"):
            m = row[kind]
            ratio = f"{row['ratio']:.2f}" if kind == "relay" and row["ratio"] else ""
            extra = " (" + m["error"] + ")" if m.get("error") else ""
            if m.get("problems"):
                extra += f" [{len(m['problems'])} incomplete run(s)]"
            if (m.get("other_cores") or 0) > 0.1:
                extra += f" [noisy: other work used {m['other_cores']:.2f} cores]"
            print(f"{row['size'] // 1024:>3}KB {row['c']:>4} {row['rcpts']:>4} {kind:<8} "
                  f"{f(m.get('accepted_per_s')):>7} {f(m.get('delivered_per_s')):>7} "
                  f"{f(m.get('p50_ms'), '{:.1f}'):>7} {f(m.get('p99_ms'), '{:.1f}'):>7} "
                  f"{f(m.get('cpu_s_per_1000'), '{:.2f}'):>8} "
                  f"{f(m.get('cpu_busy'), '{:.2f}'):>5} {f(m.get('peak_rss_mib'), '{:.1f}'):>8} "
                  f"{f(m.get('peak_pss_mib'), '{:.1f}'):>8} "
                  f"{f(m.get('tx_per_msg'), '{:.0f}'):>6}  {ratio}{extra}")


# ---------------------------------------------------------------- idle connections
Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(port: int, count: int, timeout: float) -> tuple[list[Conn], list[str]]:
    """count connections that read the 220, send EHLO, read the whole 250 reply, stay."""
    sem = asyncio.Semaphore(100)  # do not flood the listen backlog

    async def one(i: int) -> Conn:
        async with sem:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout)
            try:
                greet = await asyncio.wait_for(reader.readline(), timeout)
                if not greet.startswith(b"220"):
                    raise OSError(f"greeting {greet[:60]!r}")
                writer.write(f"EHLO idle{i}.bench.test\r\n".encode())
                while True:
                    line = await asyncio.wait_for(reader.readline(), timeout)
                    if not line.startswith(b"250"):
                        raise OSError(f"EHLO reply {line[:60]!r}")
                    if line[3:4] == b" ":
                        return reader, writer
            except BaseException:
                writer.close()
                raise

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    conns = [r for r in results if isinstance(r, tuple)]
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    return conns, errors


async def noop_all(conns: list[Conn], timeout: float) -> int:
    """How many of the connections still answer NOOP with a 250."""

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        try:
            writer.write(b"NOOP\r\n")
            line = await asyncio.wait_for(reader.readline(), timeout)
        except (OSError, TimeoutError):
            return False
        return line.startswith(b"250")

    return sum(await asyncio.gather(*(one(r, w) for r, w in conns)))


def run_idle(args: argparse.Namespace, setup: RelaySetup, root: Path) -> dict[str, Any]:
    d = Path(tempfile.mkdtemp(prefix="idle-", dir=root))
    sink, sink_port = e2e.start_sink(d)
    relay: subprocess.Popen[bytes] | None = None
    sampler: e2e.RssSampler | None = None
    out: dict[str, Any] = {"connections_wanted": args.idle}
    try:
        cfg, port = setup.write_config(d, sink_port)
        relay = setup.start(d, cfg, port)
        sampler = e2e.RssSampler(relay.pid)
        sampler.start()
        time.sleep(1.0)
        out["rss_before_mib"] = (e2e.status_kib(relay.pid, "VmRSS") or 0) / 1024

        async def hold() -> None:
            conns, errors = await open_idle(port, args.idle, 30)
            out["connections_open"] = len(conns)
            out["connection_errors"] = sorted(set(errors))[:5]
            await asyncio.sleep(args.idle_settle)
            out["rss_idle_mib"] = (e2e.status_kib(relay.pid, "VmRSS") or 0) / 1024
            out["hwm_idle_mib"] = (e2e.status_kib(relay.pid, "VmHWM") or 0) / 1024
            # Then a 5 KB c=10 load while the idle connections stay open.
            lg = loadgen_args(args, args.idle_load_n, 10, 5120, 1)
            res = await asyncio.to_thread(e2e.run_loadgen, lg, port, d)
            out["load_accepted"] = res["accepted"]
            out["load_accepted_per_s"] = res.get("accepted_per_s")
            out["load_p99_ms"] = res["latency_ms"]["p99"]
            _, complete = await asyncio.to_thread(
                e2e.wait_delivered, d / "sink.json", int(res["accepted"]), args.drain_timeout,
                relay)
            out["load_delivered_complete"] = complete
            out["rss_after_load_mib"] = (e2e.status_kib(relay.pid, "VmRSS") or 0) / 1024
            # Are the idle ones still served (not timed out, not dropped)?
            out["connections_answering_noop"] = await noop_all(conns, 30)
            out["hwm_mib"] = (e2e.status_kib(relay.pid, "VmHWM") or 0) / 1024
            for _, w in conns:
                w.close()

        asyncio.run(hold())
        sampler.stop()
        out["peak_rss_tree_mib"] = sampler.peak_kib / 1024
        return out
    finally:
        if sampler is not None and sampler.is_alive():
            sampler.stop()
        if relay is not None:
            e2e.stop_process(relay, args.stop_timeout)
        e2e.stop_process(sink, 5)
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- store size
def fill_store(setup: RelaySetup, d: Path, count: int, body_size: int) -> float:
    """A queue DB holding `count` messages, one queued recipient each, due in 30+ days."""
    from relay.queue.sqlite import SQLiteQueueStore

    (d / "var").mkdir(parents=True, exist_ok=True)
    db = d / "var" / "relay.db"

    async def create() -> None:  # the relay's own schema, indexes and pragmas
        store = SQLiteQueueStore(db)
        await store.open()
        await store.close()

    t0 = time.monotonic()
    asyncio.run(create())
    now = time.time()
    line = b"x" * 76 + b"\r\n"
    body_text = (line * (body_size // len(line) + 1))[:body_size]
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA synchronous=OFF")
    batch = 50_000
    t_us = int((now - count * 0.001 - 3600) * 1_000_000)  # one a millisecond, in the past
    for start in range(0, count, batch):
        msgs, rcpts = [], []
        for i in range(start, min(count, start + batch)):
            qid = f"{t_us + i * 1000:X}"[-10:] + f"{i & 0xFFFF:04X}"
            received = now - 3600 - (count - i) * 0.001
            body = (f"Received: from bench by relay.bench.test with ESMTP id {qid}\r\n"
                    f"From: Held <held@bench.test>\r\nTo: held{i}@example.org\r\n"
                    f"Subject: held {i}\r\nMessage-ID: <held-{i}@bench.test>\r\n\r\n"
                    ).encode() + body_text
            msgs.append((qid, "held@bench.test", body, len(body), 0, 0, "127.0.0.1", None,
                         "marketing", json.dumps({"message_id": f"<held-{i}@bench.test>"}),
                         received))
            nxt = now + 30 * 86400 + (i % 86400)
            rcpts.append((qid, f"held{i}@example.org", "queued", 1, nxt, "451 4.0.0 later",
                          now))
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO messages (queue_id, sender, body, size, smtputf8, eightbit, client,"
            " app, stream, meta, received_at) VALUES (?,?,?,?,?,?,?,?,?,?,?)", msgs)
        conn.executemany(
            "INSERT INTO recipients (queue_id, address, state, attempts, next_attempt,"
            " last_reply, updated_at) VALUES (?,?,?,?,?,?,?)", rcpts)
        conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.monotonic() - t0


def run_store(args: argparse.Namespace, setup: RelaySetup, root: Path) -> dict[str, Any]:
    sizes = [args.store_small, args.store_big]
    dirs: dict[int, Path] = {}
    out: dict[str, Any] = {"sizes": sizes, "fill_body_size": args.fill_size, "n": args.store_n}
    for size in sizes:
        d = Path(tempfile.mkdtemp(prefix=f"store{size}-", dir=root))
        log(f"  filling a queue DB with {size} not-due messages ...")
        secs = fill_store(setup, d, size, args.fill_size)
        db = d / "var" / "relay.db"
        out[f"fill_{size}"] = {"seconds": round(secs, 1),
                               "db_mib": round(db.stat().st_size / MIB, 1)}
        log(f"  ... {secs:.1f} s, {db.stat().st_size / MIB:.0f} MiB")
        dirs[size] = d
    runs: dict[int, list[dict[str, Any]]] = {s: [] for s in sizes}
    lg = loadgen_args(args, args.store_n, 10, 5120, 1)
    try:
        for rep in range(1, args.repeat + 1):
            for size in sizes:  # interleaved; the same DB again each time (held mail stays)
                rd = dirs[size] / f"run{rep}"
                try:
                    m = run_relay_in(args, setup, dirs[size], rd, lg)
                except e2e.BenchError as exc:
                    log(f"  store {size} run {rep}: FAILED: {exc}")
                    continue
                runs[size].append(m)
                log(f"  store {size} run {rep}: acc/s {m['accepted_per_s']} "
                    f"del/s {m['delivered_per_s']} p99 {m['p99_ms']} ms "
                    f"cpu/1k {m['cpu_s_per_1000']} rss {m['peak_rss_mib']} MiB "
                    f"other {m['other_cores']}" + (f" PROBLEM {m['problem']}" if m.get("problem") else ""))
    finally:
        if not args.keep:
            for d in dirs.values():
                shutil.rmtree(d, ignore_errors=True)
    for size in sizes:
        out[str(size)] = median(runs[size]) if runs[size] else {}
    return out


def run_relay_in(args: argparse.Namespace, setup: RelaySetup, home: Path, rd: Path,
                 lg: argparse.Namespace) -> dict[str, Any]:
    """A relay run whose config (and so queue DB) lives in `home`; sink files in `rd`."""
    rd.mkdir()

    def start(sink_port: int) -> tuple[int, subprocess.Popen[bytes]]:
        cfg, port = setup.write_config(home, sink_port)
        return port, setup.start(home, cfg, port)

    def stop(proc: subprocess.Popen[bytes]) -> None:
        e2e.stop_process(proc, args.stop_timeout)

    return measure(args, "relay", rd, lg, start, stop, lambda p: p.pid)


# ---------------------------------------------------------------- targets
def verdict(ok: bool | None) -> str:
    return "n/a " if ok is None else ("PASS" if ok else "FAIL")


def rsa_signs_per_s(key_path: Path, seconds: float = 2.0) -> float:
    """RSA-2048 signatures a second on every core at once, the machine doing nothing else:
    the relay's key, the relay's call (cryptography, PKCS #1 v1.5 over a SHA-256 digest),
    one thread per core (OpenSSL releases the GIL while it signs)."""
    import concurrent.futures
    import hashlib

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding
    from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    digest = hashlib.sha256(b"bench").digest()

    def work(deadline: float) -> int:
        n = 0
        while time.perf_counter() < deadline:
            key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
            n += 1
        return n

    cores = os.cpu_count() or 1
    with concurrent.futures.ThreadPoolExecutor(cores) as pool:
        deadline = time.perf_counter() + seconds
        return sum(pool.map(work, [deadline] * cores)) / seconds


def targets(args: argparse.Namespace, table: list[dict[str, Any]], idle: dict[str, Any] | None,
            store: dict[str, Any] | None, signs_per_s: float | None = None,
            ) -> list[tuple[str, bool | None, str]]:
    out: list[tuple[str, bool | None, str]] = []
    for row in table:
        if row["size"] != 5120:
            continue
        r = row["ratio"]
        name = f"delivered/s >= 1.5x Postfix, 5KB c={row['c']} rcpts={row['rcpts']}"
        detail = (f"relay {f(row['relay'].get('delivered_per_s'))}/s, Postfix "
                  f"{f(row['postfix'].get('delivered_per_s'))}/s, ratio {f(r, '{:.2f}')}")
        pf_d = row["postfix"].get("delivered_per_s")
        sink_ms = row["relay"].get("sink_cpu_s_per_1000")
        load_ms = row["relay"].get("loadgen_cpu_s_per_1000")
        if row["rcpts"] > 1 and signs_per_s and pf_d and sink_ms is not None and load_ms:
            # Every copy carries its own List-Unsubscribe token, so its own signature. At
            # the target rate, what do the signatures alone, the sink taking the copies and
            # the load generator sending take of the machine, before relay does anything?
            want = 1.5 * pf_d
            cores = os.cpu_count() or 1
            rsa = want * row["rcpts"] * cores / signs_per_s
            peers = want * (sink_ms + load_ms) / 1000
            detail += (f"; relay sends {row['rcpts']} signed copies a message, Postfix one "
                       f"transaction; at {f(want)} msg/s the {f(want * row['rcpts'])} "
                       f"RSA-2048 signatures/s alone take {rsa:.2f} cores ({f(signs_per_s)}/s"
                       f" on all {cores} cores, nothing else running), the sink and the load "
                       f"generator {peers:.2f} more: {rsa + peers:.2f} of {cores} cores "
                       "before any other work of relay's")
        out.append((name, None if r is None else r >= 1.5, detail))
    for row in table:
        if row["c"] != 10:
            continue
        p99 = row["relay"].get("p99_ms")
        name = f"relay p99 to 250 <= 20 ms, {row['size'] // 1024}KB c=10 rcpts={row['rcpts']}"
        detail = (f"p99 {f(p99, '{:.1f}')} ms (Postfix "
                  f"{f(row['postfix'].get('p99_ms'), '{:.1f}')} ms)")
        out.append((name, None if p99 is None else p99 <= 20.0, detail))
    if idle is not None:
        peak = max(idle.get("hwm_mib") or 0, idle.get("peak_rss_tree_mib") or 0)
        ok = idle.get("connections_open") == args.idle and peak <= 150 * 1e6 / MIB
        detail = (f"{idle.get('connections_open')} open, "
                  f"{idle.get('connections_answering_noop')} answer NOOP at the end; RSS "
                  f"{idle.get('rss_before_mib', 0):.1f} MiB before, "
                  f"{idle.get('rss_idle_mib', 0):.1f} MiB idle, "
                  f"{idle.get('rss_after_load_mib', 0):.1f} MiB after a {args.idle_load_n}-"
                  f"message load; VmHWM {idle.get('hwm_mib', 0):.1f} MiB; process tree "
                  f"(relay + delivery process) peak {idle.get('peak_rss_tree_mib') or 0:.1f} "
                  "MiB")
        out.append((f"relay peak RSS <= 150 MB with {args.idle} idle connections", ok, detail))
    if store is not None:
        small, big = store.get(str(args.store_small), {}), store.get(str(args.store_big), {})
        for key, label in (("accepted_per_s", "accepted/s"), ("delivered_per_s", "delivered/s")):
            a, b = small.get(key), big.get(key)
            ratio = b / a if a and b else None
            change = None if ratio is None else (ratio - 1) * 100
            name = (f"{label} flat within 10 %, store {args.store_small:,} -> "
                    f"{args.store_big:,}")
            detail = f"{f(a)}/s -> {f(b)}/s ({f(change, '{:+.1f}')} %)"
            out.append((name, None if ratio is None else ratio >= 0.9, detail))
    return out


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="relay vs Postfix (issue 9)")
    p.add_argument("--quick", action="store_true", help="only the 5 KB rows")
    p.add_argument("--rows", default=None,
                   help="only these rows, KB:sessions:recipients, comma-separated (5:10:1,50:10:1)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="run the relay under py-spy (raw stacks into DIR; figures then skew)")
    p.add_argument("--single-process", action="store_true",
                   help="relay with [outbound] delivery_process = false (default: true)")
    p.add_argument("-n", type=int, default=None,
                   help="messages per 5 KB row (default 10000; 50 KB rows get n/5)")
    p.add_argument("--n-large", type=int, default=None,
                   help="messages per 50 KB row (default 2000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; median")
    p.add_argument("--skip-rows", action="store_true", help="no relay/Postfix rows")
    p.add_argument("--skip-postfix", action="store_true", help="relay rows only")
    p.add_argument("--skip-idle", action="store_true", help="no idle-connections check")
    p.add_argument("--skip-million", "--skip-store", dest="skip_store", action="store_true",
                   help="no store-size check (the fill takes a while)")
    p.add_argument("--idle", type=int, default=1000, help="idle connections (default 1000)")
    p.add_argument("--idle-settle", type=float, default=3.0)
    p.add_argument("--idle-load-n", type=int, default=3000,
                   help="messages sent while the idle connections are open")
    p.add_argument("--store-small", type=int, default=10_000)
    p.add_argument("--store-big", type=int, default=1_000_000)
    p.add_argument("--store-n", type=int, default=10_000, help="messages per store-size run")
    p.add_argument("--fill-size", type=int, default=5120, help="body bytes of held messages")
    p.add_argument("--max-sessions", type=int, default=1100, help="relay [server] max_sessions")
    p.add_argument("--out-conns", type=int, default=20,
                   help="relay [outbound] max_connections = Postfix "
                        "default_destination_concurrency_limit (default 20)")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the check that relay output is DKIM-signed with List-Unsubscribe")
    p.add_argument("--quiet-wait", type=float, default=60.0,
                   help="before each run, wait up to this many seconds for other work on the "
                        "machine to stop (0: do not wait)")
    p.add_argument("--start-timeout", type=float, default=60.0)
    p.add_argument("--load-timeout", type=float, default=900.0)
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--stop-timeout", type=float, default=30.0)
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--json-out", default=None, help="write every figure here as JSON")
    args = p.parse_args(argv)
    if args.repeat < 1 or args.idle < 1 or args.max_sessions < args.idle + 20:
        p.error("need --repeat >= 1 and --max-sessions >= --idle + 20")

    nofile = raise_nofile()
    root = Path(tempfile.mkdtemp(prefix="relay-compare-"))
    root.chmod(0o755)  # Postfix daemons (user postfix) reach their queue through it
    report: dict[str, Any] = {"args": vars(args), "nofile": nofile, "started": time.time(),
                              "relay_revision": relay_revision()}
    log(f"relay vs Postfix: relay {report['relay_revision']}, temp dir {root}, "
        f"RLIMIT_NOFILE {nofile[0]}")
    try:
        setup = RelaySetup(root, args)
        if not args.no_verify:
            report["verify"] = verify_relay_output(setup, root)
            log(f"relay output: {report['verify']}")

        table: list[dict[str, Any]] = []
        if not args.skip_rows:
            pf_bin: str | None = None
            pf_error: str | None = None
            if args.skip_postfix:
                pf_error = "skipped"
            else:
                try:
                    pf_bin = ensure_postfix()
                    ver = subprocess.run(["postconf", "-d", "-h", "mail_version"],
                                         capture_output=True, text=True, check=False)
                    report["postfix_version"] = ver.stdout.strip()
                except (e2e.BenchError, OSError, subprocess.SubprocessError) as exc:
                    pf_error = f"Postfix unavailable: {exc}"
                    log(pf_error)
            log(f"rows: Postfix {report.get('postfix_version', '-')} and relay (DKIM "
                "RSA-2048 + List-Unsubscribe)")
            print(f"relay {report['relay_revision']} (DKIM RSA-2048, List-Unsubscribe) vs "
                  f"Postfix {report.get('postfix_version', '-')}", flush=True)
            table = run_rows(args, root, setup, pf_bin, pf_error)
            report["rows"] = table
            print_rows(table, args.repeat)

        idle = None
        if not args.skip_idle:
            log(f"idle: {args.idle} connections (greeting + EHLO) held open to the relay")
            idle = run_idle(args, setup, root)
            report["idle"] = idle

        store = None
        if not args.skip_store:
            log(f"store size: {args.store_small:,} vs {args.store_big:,} held messages, "
                f"{args.store_n} x 5 KB at c=10")
            store = run_store(args, setup, root)
            report["store"] = store
            print(f"\nStore size (median of {args.repeat}; {args.store_n} x 5 KB, c=10, 1 rcpt)")
            for size in (args.store_small, args.store_big):
                m = store.get(str(size), {})
                print(f"  {size:>9,} held: acc/s {f(m.get('accepted_per_s'))} del/s "
                      f"{f(m.get('delivered_per_s'))} p50/p99 {f(m.get('p50_ms'), '{:.1f}')}/"
                      f"{f(m.get('p99_ms'), '{:.1f}')} ms CPU s/1k "
                      f"{f(m.get('cpu_s_per_1000'), '{:.2f}')} RSS "
                      f"{f(m.get('peak_rss_mib'), '{:.1f}')} MiB; DB "
                      f"{store[f'fill_{size}']['db_mib']} MiB filled in "
                      f"{store[f'fill_{size}']['seconds']} s")

        signs = None
        if table and any(row["rcpts"] > 1 for row in table):
            signs = rsa_signs_per_s(setup.key)
            report["rsa2048_signs_per_s_all_cores"] = round(signs)
            print(f"\nRSA-2048 signatures/s, all {os.cpu_count()} cores, nothing else "
                  f"running: {signs:.0f}")
        res = targets(args, table, idle, store, signs)
        report["targets"] = [{"target": t, "pass": ok, "detail": d} for t, ok, d in res]
        print("\nTargets")
        for t, ok, detail in res:
            print(f"  {verdict(ok)}  {t}: {detail}")
        return 0
    finally:
        report["finished"] = time.time()
        report["relay_revision_at_end"] = relay_revision()
        if report["relay_revision_at_end"] != report["relay_revision"]:
            log(f"note: relay/ changed during the run: {report['relay_revision']} -> "
                f"{report['relay_revision_at_end']}")
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(report, indent=1, default=str))
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
