"""Postfix-shaped log lines, so ops' grep habits and pflogsumm work.

    2026-12-03T10:00:00.123Z relay.example.test relay/smtpd[4242]: 7F3A9C21D0: client=...

Components log through `logging.getLogger("relay.<component>")` (smtpd, cleanup, qmgr,
smtp, ...); the formatter turns the logger name into Postfix's program/process field.
Every line starts with the queue ID or the peer (STYLE rule 11).
"""

from __future__ import annotations

import asyncio
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


def _escape_control(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


class _RelayFormatter(logging.Formatter):
    def __init__(self, hostname: str):
        super().__init__()
        self.hostname = hostname
        self.pid = os.getpid()
        # Per-record work done once: the seconds of the timestamp change once a second,
        # the "host relay/component[pid]: " part once per logger.
        self._second: tuple[int, str] = (-1, "")
        self._programs: dict[str, str] = {}

    @staticmethod
    def component(record: logging.LogRecord) -> str:
        """relay.smtpd -> smtpd: Postfix's program name after "relay/"."""
        return record.name.rpartition(".")[2] if record.name.startswith("relay.") else "relay"

    def timestamp(self, created: float) -> str:
        """_timestamp(created), with strftime once a second."""
        second, text = self._second
        if int(created) != second:
            text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
            self._second = (int(created), text)
        return f"{text}.{int(created * 1000) % 1000:03d}Z"


class PostfixFormatter(_RelayFormatter):
    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        if record.levelno >= logging.ERROR and not msg.startswith(("error:", "fatal:")):
            msg = "error: " + msg
        elif record.levelno == logging.WARNING and not msg.startswith("warning:"):
            msg = "warning: " + msg
        if record.exc_info:
            # One line per event: fold the traceback onto the same line.
            msg += " | " + self.formatException(record.exc_info).replace("\n", " | ")
        if _CONTROL.search(msg):
            msg = _CONTROL.sub(_escape_control, msg)
        program = self._programs.get(record.name)
        if program is None:
            program = f" {self.hostname} relay/{self.component(record)}[{self.pid}]: "
            self._programs[record.name] = program
        return self.timestamp(record.created) + program + msg


class JsonFormatter(_RelayFormatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": self.timestamp(record.created),
            "host": self.hostname,
            "program": f"relay/{self.component(record)}",
            "pid": self.pid,
            "level": record.levelname.lower(),
            "message": record.getMessage(),
        }
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class _LineStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """StreamHandler without the flush() after each line when the stream is line-buffered
    (stderr; our log file): the write of a line already hands it to the OS."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = self.stream
            stream.write(self.format(record) + self.terminator)
            if not getattr(stream, "line_buffering", False):
                self.flush()
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own error path, as in StreamHandler
            self.handleError(record)


class ReopenableFileHandler(_LineStreamHandler):
    """Appends to a file; `reopen()` (on SIGUSR1) starts a new file after rotation.

    Lines logged from the event loop's thread are written together at the end of the
    loop's turn (one write for the five lines of a message instead of five); from any other
    thread, or with no loop running, each line is written at once."""

    def __init__(self, path: str):
        self.path = path
        self._flush_pending = False
        self._held = 0
        super().__init__(self._open())

    def _open(self) -> TextIO:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return open(self.path, "a", encoding="utf-8", errors="backslashreplace",
                    buffering=1 << 16)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            self.stream.write(line)
            self._held += len(line)
            loop = asyncio._get_running_loop()
            # Another thread, no loop, or much held: write now, at a line's end (the buffer
            # must never fill and cut a line that the delivery process's lines could split).
            if loop is None or self._held > 16384:
                self.flush()
                self._held = 0
            elif not self._flush_pending:
                self._flush_pending = True
                loop.call_soon(self._flush_soon)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - logging's own error path, as in StreamHandler
            self.handleError(record)

    def _flush_soon(self) -> None:
        self.acquire()
        try:
            self._flush_pending = False
            self._held = 0
            self.flush()
        finally:
            self.release()

    def reopen(self) -> None:
        self.acquire()
        try:
            old = self.stream
            old.flush()
            self.stream = self._open()
            old.close()
        finally:
            self.release()


def configure_logging(cfg: LogConfig, hostname: str, level: int = logging.INFO) -> logging.Handler:
    """Install the one handler of the `relay` logger tree and return it."""
    handler: logging.Handler
    if cfg.file == "-":
        handler = _LineStreamHandler(sys.stderr)
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
    # Our formats use none of the caller's file and line, thread, process or
    # multiprocessing fields of a record: do not collect them for every record (the
    # logging HOWTO, "Optimization"). The stack walk of findCaller and these look-ups
    # were about a fifth of the cost of a log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging.logAsyncioTasks = False     # Python 3.12 and later
    return handler
