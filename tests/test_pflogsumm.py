"""Debian's pflogsumm reads our log and counts what happened (ops' tools work on it)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import aiosmtplib
import pytest

from tests.conftest import wait_events
from tests.support.downstream import Downstream
from tests.test_log import logfile  # noqa: F401 - the fixture

MESSAGE = b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n"


def pflogsumm(log) -> str:
    if shutil.which("pflogsumm") is None:
        if os.environ.get("CI"):
            pytest.fail("pflogsumm is not installed (apt-get install pflogsumm)")
        pytest.skip("pflogsumm is not installed")
    out = subprocess.run(["pflogsumm", "--syslog-name=relay", str(log)], capture_output=True,
                         text=True, timeout=60, check=True)
    return out.stdout


def total(report: str, what: str) -> int:
    m = re.search(rf"^\s+(\d+)\s+{what}\b", report, re.MULTILINE)
    assert m, f"no '{what}' line in:\n{report}"
    return int(m.group(1))


async def test_pflogsumm_counts_received_delivered_deferred_bounced(
        logfile, downstream: Downstream, start_relay) -> None:  # noqa: F811
    downstream.script("EOD", "451 4.3.0 try later", match="slow@", times=1)
    downstream.script("RCPT", "550 5.1.1 no such user", match="gone@", times=None)
    relay = await start_relay(downstream.port)
    host, port = relay.smtp_addresses[0]
    async with aiosmtplib.SMTP(hostname=host, port=port) as c:
        for rcpt in ("a@example.net", "b@example.net", "slow@example.net", "gone@example.net"):
            await c.sendmail("a@example.com", [rcpt], MESSAGE)
        with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
            await c.sendmail("a@example.com", ["bad@"], MESSAGE)
    # a, b, slow (after one deferral) and the notice to a@example.com about gone
    await downstream.wait_messages(4)
    await wait_events(relay, 6)
    await relay.stop(deadline=2)
    report = pflogsumm(logfile)
    assert total(report, "received") == 4    # as with Postfix, a notice is not "received"
    assert total(report, "delivered") == 4
    assert total(report, "deferred") == 1
    assert total(report, "bounced") == 1
    assert total(report, "rejected") == 1
