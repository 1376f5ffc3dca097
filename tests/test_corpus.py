"""Every message of ../shared/corpus/python-email goes through with its bytes unchanged
(or is refused at DATA with a precise 5xx). The relay may add a missing Date or Message-ID
at the end of the header section; nothing else changes."""

from __future__ import annotations

import re

import aiosmtplib
import pytest

from tests.conftest import CORPUS
from tests.support.downstream import Downstream
from tests.support.mail import assert_relayed

MESSAGES = sorted(CORPUS.glob("msg_*.txt")) if CORPUS.is_dir() else []


def as_sent(raw: bytes) -> bytes:
    """The corpus is stored with LF endings; a client sends CRLF, ending in CRLF."""
    data = re.sub(rb"\r?\n", b"\r\n", raw)
    return data if data.endswith(b"\r\n") else data + b"\r\n"


def test_corpus_is_there() -> None:
    assert len(MESSAGES) >= 40, f"corpus not found at {CORPUS}"


@pytest.mark.parametrize("path", MESSAGES, ids=[p.name for p in MESSAGES])
async def test_corpus_message_delivered_unchanged(path, downstream: Downstream,
                                                  start_relay) -> None:
    relay = await start_relay(downstream.port)
    host, port = relay.smtp_addresses[0]
    data = as_sent(path.read_bytes())
    async with aiosmtplib.SMTP(hostname=host, port=port) as client:
        try:
            await client.sendmail("news@example.com", ["reader@example.net"], data)
        except aiosmtplib.SMTPDataError as exc:
            # allowed only as a precise permanent refusal
            assert exc.code >= 500 and re.match(r"5\.\d+\.\d+ ", exc.message), exc
            assert await relay.store.list() == []
            return
    [msg] = await downstream.wait_messages(1)
    assert_relayed(msg.data, data)
