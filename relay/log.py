"""Postfix-shaped log lines, so ops' grep habits and pflogsumm work.

    2026-12-03T10:00:00.123Z relay.example.test relay/smtpd[4242]: 7F3A9C21D0: client=...

Components log through `logging.getLogger("relay.<component>")` (smtpd, cleanup, qmgr,
smtp, ...); the formatter turns the logger name into Postfix's program/process field.
Every line starts with the queue ID or the peer (STYLE rule 11).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import warnings
from typing import TextIO

from relay.config import LogConfig

SMTPD = logging.getLogger("relay.smtpd")
CLEANUP = logging.getLogger("relay.cleanup")
QMGR = logging.getLogger("relay.qmgr")
SMTP = logging.getLogger("relay.smtp")
BOUNCE = logging.getLogger("relay.bounce")
MASTER = logging.getLogger("relay.master")


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")   # one event, one line: no CR, LF or NUL


def _timestamp(created: float) -> str:
    t = time.gmtime(created)
    return time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{int(created * 1000) % 1000:03d}Z"


class _RelayFormatter(logging.Formatter):
    def __init__(self, hostname: str):
        super().__init__()
        self.hostname = hostname
        self.pid = os.getpid()

    @staticmethod
    def component(record: logging.LogRecord) -> str:
        """relay.smtpd -> smtpd: Postfix's program name after "relay/"."""
        return record.name.rpartition(".")[2] if record.name.startswith("relay.") else "relay"


class PostfixFormatter(_RelayFormatter):
    def format(self, record: logging.LogRecord) -> str:
        component = self.component(record)
        msg = record.getMessage()
        if record.levelno >= logging.ERROR and not msg.startswith(("error:", "fatal:")):
            msg = "error: " + msg
        elif record.levelno == logging.WARNING and not msg.startswith("warning:"):
            msg = "warning: " + msg
        if record.exc_info:
            # One line per event: fold the traceback onto the same line.
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        msg = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", msg)
        return f"{_timestamp(record.created)} {self.hostname} relay/{component}[{self.pid}]: {msg}"


class JsonFormatter(_RelayFormatter):
    def format(self, record: logging.LogRecord) -> str:
        component = self.component(record)
        doc = {
            "ts": _timestamp(record.created),
            "host": self.hostname,
            "program": f"relay/{component}",
            "pid": self.pid,
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class ReopenableFileHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Appends to a file; `reopen()` (on SIGUSR1) starts a new file after rotation."""

    def __init__(self, path: str):
        self.path = path
        super().__init__(self._open())

    def _open(self) -> TextIO:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            self.stream = self._open()
            old.close()
        finally:
            self.release()


def configure_logging(cfg: LogConfig, hostname: str, level: int = logging.INFO) -> logging.Handler:
    """Install the one handler of the `relay` logger tree and return it."""
    handler: logging.Handler
    if cfg.file == "-":
        handler = logging.StreamHandler(sys.stderr)
    else:
        handler = ReopenableFileHandler(cfg.file)
    handler.setFormatter(JsonFormatter(hostname) if cfg.format == "json"
                         else PostfixFormatter(hostname))
    root = logging.getLogger("relay")
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    # aiosmtpd's own logger speaks in its own shape ("('1.2.3.4', 5) unrecognised: X") and
    # is chatty at INFO; the edge logs every refusal itself. Keep only its errors, in our
    # file and format.
    lib = logging.getLogger("mail.log")
    for old in list(lib.handlers):
        lib.removeHandler(old)
    lib.addHandler(handler)
    lib.setLevel(logging.ERROR)
    lib.propagate = False
    warnings.filterwarnings("ignore", message=".*login_data is deprecated.*")
    return handler
