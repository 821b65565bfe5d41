"""The one log line format of every process the gateway runs: JSON lines, or text.

It lives with storage because the local I/O process (`storage_backends.local.io_process`)
writes its own lines on the gateway's stdout and may not import the gateway; the gateway's
telemetry imports it from here, so both write one layout. The gateway picks the format
(`logging.format`) and hands it to the I/O process in `LOG_FORMAT_ENV`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from typing import Any

LOG_FORMAT_ENV = "BACKUP_GATEWAY_IO_LOG_FORMAT"  # json | text

_PID = os.getpid()


def _new_pid() -> None:
    global _PID
    _PID = os.getpid()


os.register_at_fork(after_in_child=_new_pid)


class _Timestamps:
    """`2026-01-02T03:04:05.678Z` (UTC), with strftime once a second, not once a line."""

    _second = -1
    _second_text = ""

    def timestamp(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"


class JsonFormatter(_Timestamps, logging.Formatter):
    """One JSON object a line: ts, level, logger, pid, msg, then the record's `fields` (and
    `process`, naming a helper process, when set)."""

    # one encoder for every line: json.dumps(..., separators=...) builds a new one per call
    _encode = json.JSONEncoder(separators=(",", ":"), default=str).encode

    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = self.entry(
            record.created, record.levelname.lower(), record.name, record.getMessage()
        )
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self._encode(entry)

    def entry(self, created: float, level: str, logger: str, message: str) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "ts": self.timestamp(created),
            "level": level,
            "logger": logger,
            "pid": _PID,
            "msg": message,
        }
        if self._process is not None:
            entry["process"] = self._process
        return entry

    def info_line(self, logger: str, message: str, fields: dict[str, Any]) -> str:
        """The line `format` would write for an INFO record with these fields."""
        entry = self.entry(time.time(), "info", logger, message)
        entry.update(fields)
        return self._encode(entry)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
TRACE_INDENT = "    "


def escape_controls(text: str) -> str:
    """CR, LF and every other control character as an escape: a percent-encoded newline in
    a URL must not start a forged log line."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


class TextFormatter(_Timestamps, logging.Formatter):
    """`ts LEVEL logger [process] message k=v ...`: one line, every part escaped, whatever
    it holds (a message, a field from a request).

    The traceback (or stack) a record carries is formatted apart and follows on lines of its
    own, each escaped and indented: an exception's message may hold request data too, and
    no line of it can then pass for a record, which starts with a timestamp."""

    def __init__(self, fmt: str | None = None, process: str | None = None) -> None:
        tag = f"[{process}] " if process else ""
        super().__init__(fmt or f"%(asctime)s %(levelname)s %(name)s {tag}%(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.timestamp(record.created)

    def format(self, record: logging.LogRecord) -> str:
        record.message = record.getMessage()
        if self.usesTime():
            record.asctime = self.formatTime(record)
        line = self.formatMessage(record)
        fields = getattr(record, "fields", None)
        if fields:
            line += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        trace = []
        if record.exc_info:
            trace.append(self.formatException(record.exc_info))
        if record.stack_info:
            trace.append(self.formatStack(record.stack_info))
        lines = [escape_controls(line)]
        for text in trace:
            lines += [TRACE_INDENT + escape_controls(part) for part in text.split("\n")]
        return "\n".join(lines)
