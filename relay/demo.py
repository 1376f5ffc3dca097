"""A local demo downstream: an SMTP server that writes every message it receives to a folder.

`relay demo-sink --listen 127.0.0.1:2526 --dir var/demo-mail` stands in for the smarthost in
the Quick start, so a newcomer sees mail go through: one .eml file per message, with the
envelope in X-Demo-* lines at the top.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session


class SaveToFolder:
    def __init__(self, folder: Path):
        self.folder = folder
        self.count = 0

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.count += 1
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{self.count:05d}.eml"
        sender = envelope.mail_from if envelope.mail_from != "<>" else ""
        head = (f"X-Demo-Mail-From: <{sender}>\r\n"
                + "".join(f"X-Demo-Rcpt-To: <{r}>\r\n" for r in envelope.rcpt_tos))
        path = self.folder / name
        path.write_bytes(head.encode("utf-8", "surrogateescape") + (envelope.original_content
                                                                     or b""))
        print(f"demo-sink: saved {path} from <{sender}> to "
              f"{', '.join('<' + r + '>' for r in envelope.rcpt_tos)}", flush=True)
        return "250 2.0.0 Ok: saved"


async def run_sink(host: str, port: int, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    handler = SaveToFolder(folder)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, enable_SMTPUTF8=True, hostname="demo-sink.test", loop=loop),
        host, port)
    print(f"demo-sink: listening on {host}:{port}, saving to {folder}", flush=True)
    stop = asyncio.Event()
    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()
