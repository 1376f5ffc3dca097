"""The real `relay serve` process: SIGHUP reload (good and bad file), SIGTERM drain."""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, port: int, sink_port: int, extra: str = "",
                 outbound: str = "") -> None:
    path.write_text(f"""
[server]
hostname = "relay.test"
listen = ["127.0.0.1:{port}"]
[queue]
path = "var/relay.db"
[outbound]
smarthost = "127.0.0.1:{sink_port}"
{outbound}
[http]
listen = ""
[log]
file = "var/relay.log"
{extra}
""")


def wait_log(log: Path, text: str, timeout: float = 15.0) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        content = log.read_text() if log.exists() else ""
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in log:\n{log.read_text() if log.exists() else ''}")


@pytest.fixture
def served(tmp_path):
    port, sink_port = free_port(), free_port()
    cfg = tmp_path / "relay.toml"
    write_config(cfg, port, sink_port)
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "var" / "relay.log"
    try:
        wait_log(log, "daemon started")
        yield proc, cfg, log, port, sink_port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        c.sendmail("a@example.com", ["r@example.net"],
                   b"From: a@example.com\r\nSubject: s\r\n\r\nhi\r\n")


def test_sighup_reloads_good_config_and_keeps_old_on_bad(served) -> None:
    proc, cfg, log, port, sink_port = served
    write_config(cfg, port, sink_port, '[headers]\nremove = ["Bcc", "X-Mailer"]\n')
    os.kill(proc.pid, signal.SIGHUP)
    wait_log(log, "reload: configuration reloaded")
    cfg.write_text(cfg.read_text() + "\n[server2]\nbogus = 1\n")
    os.kill(proc.pid, signal.SIGHUP)
    content = wait_log(log, "keeping the running one")
    assert "server2: unknown section" in content
    assert proc.poll() is None
    send(port)   # still accepting with the old (good) policy
    wait_log(log, "(queue active)")


def test_sigterm_drains_and_exits_cleanly(served) -> None:
    proc, _cfg, log, port, _sink_port = served
    send(port)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=20) == 0
    content = wait_log(log, "daemon stopped")
    assert "shutdown requested" in content
    assert "Traceback" not in content


def test_serve_refuses_to_start_with_config_errors(tmp_path) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[server]\nlisten = ["127.0.0.1:x"]\nmax_recipients = 0\n')
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "server.listen" in out.stderr and "server.max_recipients" in out.stderr
    assert "refusing to start" in out.stderr


def test_second_process_on_the_same_queue_is_refused(served) -> None:
    proc, cfg, _log, port, sink_port = served
    other = cfg.parent / "other.toml"
    write_config(other, free_port(), sink_port)      # same queue path, other port
    out = subprocess.run([sys.executable, "-m", "relay", "serve", "--config", str(other)],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode != 0
    assert "another relay process is using the queue" in out.stderr
    assert proc.poll() is None                        # the first one is unharmed
    send(port)


def test_sigusr1_reopens_the_log_file(served) -> None:
    proc, _cfg, log, port, _sink_port = served
    rotated = log.with_name("relay.log.1")
    log.rename(rotated)
    os.kill(proc.pid, signal.SIGUSR1)
    time.sleep(0.3)
    send(port)
    content = wait_log(log, "(queue active)")         # a new file, written again
    assert "daemon started" not in content
    assert "daemon started" in rotated.read_text()


def test_json_log_format(tmp_path) -> None:
    port, sink_port = free_port(), free_port()
    cfg = tmp_path / "relay.toml"
    write_config(cfg, port, sink_port)
    cfg.write_text(cfg.read_text().replace('file = "var/relay.log"',
                                           'file = "var/relay.log"\nformat = "json"'))
    proc = subprocess.Popen([sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = tmp_path / "var" / "relay.log"
        wait_log(log, "daemon started")
        send(port)
        wait_log(log, "queue active")
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    import json
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert all({"ts", "host", "program", "pid", "level", "message"} <= set(r) for r in rows)
    assert any(r["program"] == "relay/qmgr" and "from=<a@example.com>" in r["message"]
               for r in rows)
