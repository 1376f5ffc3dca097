"""Packaging: the systemd unit verifies, the Dockerfile is complete, --version answers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay import __version__

ROOT = Path(__file__).resolve().parents[1]


def test_version() -> None:
    out = subprocess.run([sys.executable, "-m", "relay", "--version"], capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == f"relay {__version__}"


def test_systemd_unit_verifies(tmp_path) -> None:
    if shutil.which("systemd-analyze") is None:
        if os.environ.get("CI"):
            pytest.fail("systemd-analyze is not installed")
        pytest.skip("systemd-analyze is not installed")
    unit = (ROOT / "conf" / "relay.service").read_text()
    # Verify the unit with its binaries pointed at executables that exist here.
    unit = unit.replace("/opt/relay/.venv/bin/relay", shutil.which("true") or "/bin/true")
    path = tmp_path / "relay.service"
    path.write_text(unit)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", str(path)],
                         capture_output=True, text=True, timeout=60, check=False)
    problems = [line for line in out.stderr.splitlines()
                if "relay.service" in line and "Failed to" not in line.split(":")[0]]
    assert out.returncode == 0 and not problems, out.stderr


def test_dockerfile_installs_and_runs_the_relay() -> None:
    text = (ROOT / "Dockerfile").read_text()
    for needed in ("FROM python:3.11", "pip install", "COPY relay ./relay",
                   'CMD ["relay", "serve"]', "USER relay", "STOPSIGNAL SIGTERM", "/healthz"):
        assert needed in text
