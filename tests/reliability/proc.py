"""The real `relay serve` process for reliability tests that need a process of its own
(memory high-water marks, resource limits, SIGKILL, a start that must fail)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp: Path, smarthost_port: int, extra: str = "", *,
                 queue: str = "var/relay.db", server: str = "") -> tuple[Path, int]:
    """A relay.toml in `tmp`: SMTP on a free port, delivery to 127.0.0.1:smarthost_port."""
    port = free_port()
    cfg = tmp / "relay.toml"
    cfg.write_text(f"""
[server]
hostname = "relay.test"
listen = ["127.0.0.1:{port}"]
mynetworks = ["127.0.0.0/8"]
{server}
[queue]
path = "{queue}"
retry = ["1s"]
lifetime = "1h"
[suppression]
path = "var/suppression.db"
[outbound]
smarthost = "127.0.0.1:{smarthost_port}"
connect_timeout = "5s"
command_timeout = "5s"
[http]
listen = ""
[log]
file = "var/relay.log"
{extra}
""")
    return cfg, port


class RelayProcess:
    """`python -m relay serve --config CFG`, with its own stdout/stderr files."""

    def __init__(self, cfg: Path, *, env: dict[str, str] | None = None) -> None:
        self.cfg = cfg
        self.dir = cfg.parent
        self.log = self.dir / "var" / "relay.log"
        self.out = self.dir / "relay.out"
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO), full_env.get("PYTHONPATH", "")) if p)
        full_env.update(env or {})
        with open(self.out, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "relay", "serve", "--config", str(cfg)],
                cwd=self.dir, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        text = ""
        for path in (self.out, self.log):
            with contextlib.suppress(OSError):
                text += path.read_text("utf-8", "replace")
        return text

    def wait_started(self, port: int, timeout: float = 20.0) -> None:
        """Until the SMTP port greets with 220 (fails if the process exits first)."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise AssertionError(f"relay exited with {self.proc.returncode}:\n"
                                     f"{self.output()[-3000:]}")
            with contextlib.suppress(OSError), \
                    socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.settimeout(5)
                if s.recv(512).startswith(b"220"):
                    s.sendall(b"QUIT\r\n")
                    return
            time.sleep(0.05)
        raise AssertionError(f"relay not ready within {timeout}s:\n{self.output()[-3000:]}")

    def status_kib(self, key: str) -> int:
        """A field of /proc/PID/status in KiB (VmHWM, VmRSS)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise KeyError(key)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)


@contextlib.contextmanager
def running_relay(cfg: Path, port: int, **kw: object) -> Iterator[RelayProcess]:
    relay = RelayProcess(cfg, **kw)  # type: ignore[arg-type]
    try:
        relay.wait_started(port)
        yield relay
    finally:
        relay.stop()
