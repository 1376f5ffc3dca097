"""Shared fixtures: a real relay on 127.0.0.1 port 0, a real scripted downstream, a real
SQLite file in the test's temporary folder. No protocol peer is mocked."""

from __future__ import annotations

import asyncio
import copy
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from relay.app import Relay
from relay.config import Config, parse_config
from tests.support.downstream import Downstream

SHARED = Path(__file__).resolve().parents[2] / "shared"
if not SHARED.is_dir():  # CI lays shared/ beside the clone; a developer's checkout too
    SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CASES = SHARED / "cases"
CORPUS = SHARED / "corpus" / "python-email"

# A test-only unsubscribe secret, made at run time (never a literal in the repo).
os.environ.setdefault("RELAY_UNSUBSCRIBE_SECRET", secrets.token_hex(32))


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def relay_config(tmp_path: Path, smarthost_port: int, **sections: dict[str, Any]) -> Config:
    """A test configuration: listen on port 0, deliver to the downstream, fast retries."""
    data: dict[str, Any] = {
        "server": {"hostname": "relay.test", "listen": ["127.0.0.1:0"],
                   "mynetworks": ["127.0.0.0/8"]},
        "queue": {"path": str(tmp_path / "relay.db"), "retry": ["200ms"], "lifetime": "1h"},
        "suppression": {"path": str(tmp_path / "suppression.db")},
        "outbound": {"mode": "smarthost", "smarthost": f"127.0.0.1:{smarthost_port}",
                     "max_connections": 4, "idle_timeout": "30s",
                     "connect_timeout": "5s", "command_timeout": "5s"},
        "http": {"listen": ""},
    }
    return parse_config(_merge(data, sections), tmp_path / "relay.toml")


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0,
                   what: str = "condition") -> None:
    """Wait until predicate() holds (polls); fail with `what` after `timeout` seconds."""
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


@pytest_asyncio.fixture
async def downstream() -> AsyncIterator[Downstream]:
    async with Downstream() as ds:
        yield ds


StartRelay = Callable[..., Awaitable[Relay]]


@pytest_asyncio.fixture
async def start_relay(tmp_path: Path) -> AsyncIterator[StartRelay]:
    """start_relay(downstream_port, **sections) -> a running Relay (stopped at teardown)."""
    running: list[Relay] = []

    async def start(port: int, **sections: dict[str, Any]) -> Relay:
        relay = Relay(relay_config(tmp_path, port, **sections))
        await relay.start()
        running.append(relay)
        return relay

    yield start
    for relay in running:
        await relay.stop(deadline=2.0)


@pytest.fixture
def cases_dir() -> Path:
    if not CASES.is_dir():
        pytest.fail(f"shared cases not found at {CASES}")
    return CASES


async def wait_events(relay: Relay, count: int, timeout: float = 10.0,
                      ) -> list[tuple[str, str, str, str]]:
    """Wait until the relay's event log holds at least `count` rows; return them all."""
    end = time.monotonic() + timeout
    while True:
        events = await relay.store.events()
        if len(events) >= count:
            return events
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {count} events; have {events}")
        await asyncio.sleep(0.02)
