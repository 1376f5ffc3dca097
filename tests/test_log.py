"""The log: Postfix-shaped lines, one per event, written where [log] says."""

from __future__ import annotations

import logging
import os
import re

import pytest

from relay.config import LogConfig
from relay.log import QMGR, SMTPD, PostfixFormatter, _timestamp, configure_logging
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


def test_the_cached_timestamp_is_the_plain_one() -> None:
    """PostfixFormatter computes the seconds once a second; the text must not change."""
    formatter = PostfixFormatter("relay.test")
    base = 1780000000.0
    instants = [base + step / 1000 for step in range(-1500, 2500, 7)]
    instants += [base - 1e-7, base, base + 0.9995, base + 0.999999, base + 1 - 1e-9, 5.9999999999,
                 0.0, 59.9995, 86399.9999, base + 3600.5]
    for created in instants + instants[::-1]:       # forwards, then backwards in time
        assert formatter.timestamp(created) == _timestamp(created), created


def test_handler_writes_exactly_the_formatted_line(logfile) -> None:
    """One format, one write, no extra flush: the file holds exactly the formatted lines,
    each readable as soon as it was logged (line-buffered)."""
    handler = logging.getLogger("relay").handlers[0]
    formatted: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            formatted.append(handler.format(record))

    capture = Capture()
    logging.getLogger("relay").addHandler(capture)
    try:
        SMTPD.info("%s: client=%s", "7F3A9C21D0", "unknown[127.0.0.1]")
        assert logfile.read_text() == formatted[0] + "\n"       # already on disk
        QMGR.warning("%s: from=<%s> \x01\r\n", "7F3A9C21D0", "jörg@example.com")
        try:
            raise ValueError("boom")
        except ValueError:
            SMTPD.exception("internal error in SMTP session: %s", "ValueError")
    finally:
        logging.getLogger("relay").removeHandler(capture)
    assert logfile.read_text(encoding="utf-8") == "".join(f"{line}\n" for line in formatted)
    lines = logfile.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3 and all(LINE.match(line) for line in lines), lines
    assert lines[1].endswith(f"relay/qmgr[{os.getpid()}]: warning: 7F3A9C21D0: "
                             "from=<jörg@example.com> \\x01\\x0d\\x0a")
    assert "error: internal error in SMTP session: ValueError | Traceback" in lines[2]


async def test_lines_from_one_loop_turn_share_a_write_and_none_waits_longer(logfile) -> None:
    """Lines logged on the event loop reach the file at the end of the loop's turn, in
    order; from another thread (or with no loop) at once."""
    import asyncio
    import threading

    for i in range(5):
        QMGR.info("turn line %d", i)
    await asyncio.sleep(0)          # the end of this turn of the loop
    lines = logfile.read_text().splitlines()
    assert [LINE.match(x).group(2) for x in lines[-5:]] == [f"turn line {i}" for i in range(5)]

    def other() -> None:
        SMTPD.info("from a thread")
        assert logfile.read_text().splitlines()[-1].endswith("from a thread")

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()


def test_no_loop_writes_at_once(logfile) -> None:
    QMGR.info("no loop here")
    assert logfile.read_text().splitlines()[-1].endswith("no loop here")
