"""The log: Postfix-shaped lines, one per event, written where [log] says."""

from __future__ import annotations

import logging
import re

import pytest

from relay.config import LogConfig
from relay.log import configure_logging
from tests.support.downstream import Downstream
from tests.support.wire import Wire

LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z relay\.test relay/(\w+)\[\d+\]: (.*)$")


@pytest.fixture
def logfile(tmp_path):
    path = tmp_path / "relay.log"
    handler = configure_logging(LogConfig(file=str(path)), "relay.test")
    yield path
    root = logging.getLogger("relay")
    root.removeHandler(handler)
    logging.getLogger("mail.log").removeHandler(handler)
    root.propagate = True
    handler.close()


async def test_lines_are_postfix_shaped_and_refusals_are_logged(logfile, downstream: Downstream,
                                                                start_relay) -> None:
    relay = await start_relay(downstream.port, server={"max_message_size": "10KiB"})
    host, port = relay.smtp_addresses[0]
    wire = await Wire.open(host, port)
    await wire.cmd("EHLO c.example.net")
    assert (await wire.cmd("MAIL FROM:<a@example.com> SIZE=999999")).code == 552
    assert (await wire.cmd("MAIL FROM:<a@example.com>")).code == 250
    assert (await wire.cmd("RCPT TO:<r@example.net>")).code == 250
    await wire.cmd("DATA")
    await wire.send(b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n.\r\n")
    assert (await wire.reply()).code == 250
    await wire.cmd("MAIL FROM:<a@example.com>")
    assert (await wire.cmd(b"RCPT TO:<\"x\x01y\"@example.net>")).code == 501
    await wire.close()
    await downstream.wait_messages(1)
    await relay.stop(deadline=2)
    lines = logfile.read_text().splitlines()
    assert lines and all(LINE.match(line) for line in lines), lines
    text = "\n".join(lines)
    # aiosmtpd's own refusal (SIZE at MAIL) is logged, and so is ours (control characters)
    assert re.search(r"relay/smtpd\[\d+\]: NOQUEUE: reject: MAIL from unknown\[127\.0\.0\.1\]: "
                     r"552 5\.3\.4", text)
    assert "NOQUEUE: reject: RCPT from unknown[127.0.0.1]: 501 5.5.2" in text
    assert "\x01" not in text and '"x\\x01y"@example.net' in text
    qid = re.search(r"relay/qmgr\[\d+\]: ([0-9A-F]+): from=<a@example\.com>", text).group(1)
    for part in ("smtpd", "cleanup"):
        assert re.search(rf"relay/{part}\[\d+\]: {qid}: ", text)
    assert re.search(rf"relay/smtp\[\d+\]: {qid}: to=<r@example\.net>, relay=127\.0\.0\.1"
                     rf"\[127\.0\.0\.1\]:\d+, delay=[\d.]+, dsn=2\.0\.0, status=sent", text)
    assert re.search(rf"relay/qmgr\[\d+\]: {qid}: removed", text)
    assert "Traceback" not in text
