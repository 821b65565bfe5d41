"""Logging on stdout in the one format of `storage_backends.log_format` (JSON lines or
text); access and audit records carry their fields as `extra`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import sys
import threading
import time
from typing import Any

from storage_backends.log_format import LOG_FORMAT_ENV, JsonFormatter, TextFormatter

from ..config import LoggingConfig
from .logging_internals import skip_caller_lookup

access_log = logging.getLogger("gateway.access")
audit_log = logging.getLogger("gateway.audit")


class LoopBufferedHandler(logging.StreamHandler):
    """Writes the lines of one event-loop iteration in one write() instead of one each.

    Off the loop (threads, start-up, shutdown) it writes at once. At most one iteration's
    lines are in memory; logging.shutdown() at exit flushes them.

    A write that fails (stdout on a full disk, a closed pipe) never reaches the code that
    logged, as with the standard library's handlers: the lines are dropped and the loss is
    told on stderr, at most once every LOSS_REPORT_SECONDS with the count since the last.
    """

    LOSS_REPORT_SECONDS = 60.0

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._scheduled = False
        self._lost = 0  # lines dropped since the last report
        self._reported_at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.emit_line(line)

    def emit_line(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or threading.current_thread() is not threading.main_thread():
            self._write([line])
            return
        self._pending.append(line)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._pending:
            lines, self._pending = self._pending, []
            self._write(lines)

    def _write(self, lines: list[str]) -> None:
        with self.lock if self.lock is not None else _NO_LOCK:
            try:
                self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except Exception as exc:  # logging never fails the code that logged
                self._lost += len(lines)
                self._report_loss(repr(exc))
            else:
                if self._lost:  # writing again: the count since the last report
                    self._report_loss("writes work again", at_once=True)

    def _report_loss(self, why: str, at_once: bool = False) -> None:
        now = time.monotonic()
        last = self._reported_at
        if not at_once and last is not None and now - last < self.LOSS_REPORT_SECONDS:
            return
        self._reported_at = now
        lost, self._lost = self._lost, 0
        if not logging.raiseExceptions:  # the standard library's switch for such reports
            return
        with contextlib.suppress(Exception):  # stderr may be the same full disk
            sys.stderr.write(f"--- logging: {lost} log lines not written ({why})\n")
            sys.stderr.flush()


_NO_LOCK = contextlib.nullcontext()


def log_info(logger: logging.Logger, message: str, fields: dict[str, Any]) -> None:
    """`logger.info(message, extra={"fields": fields})`, faster for the lines of every request.

    When the record would only reach our JSON handler (the service's configuration), the
    line is written straight to it: no LogRecord, no handler chain — the access and audit
    lines cost ~25 % of the event loop's time under load the long way round. Any other
    set-up (text format, extra handlers or filters, pytest's capture) takes the long way.
    """
    if not logger.isEnabledFor(logging.INFO):
        return
    handler = _sole_json_handler(logger)
    if handler is None:
        logger.info(message, extra={"fields": fields})
        return
    formatter = handler.formatter
    assert isinstance(formatter, JsonFormatter)
    handler.emit_line(formatter.info_line(logger.name, message, fields))


def _sole_json_handler(logger: logging.Logger) -> LoopBufferedHandler | None:
    if logger.handlers or logger.filters or not logger.propagate:
        return None
    parent = logger.parent
    while parent is not None and parent is not logging.root:
        if parent.handlers or not parent.propagate:
            return None
        parent = parent.parent
    handlers = logging.root.handlers
    if len(handlers) != 1:
        return None
    handler = handlers[0]
    if (
        type(handler) is LoopBufferedHandler
        and type(handler.formatter) is JsonFormatter
        and not handler.filters
        and handler.level <= logging.INFO
    ):
        return handler
    return None


_LINK_IN_PATH = re.compile(r"(/backups/content/)[^\s\"?]+")


class QuietMalformedRequests(logging.Filter):
    """aiohttp logs every request its parser refuses as an error with a traceback: a
    stranger's typo (or a scan) then floods the error log. One line at debug instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None or type(exc).__module__ != "aiohttp.http_exceptions":
            return True
        if not logging.getLogger("gateway").isEnabledFor(logging.DEBUG):
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args, record.exc_info = f"malformed request: {exc!r}", None, None
        return True


class RedactDownloadLinks(logging.Filter):
    """aiohttp's own loggers (its access log under gunicorn or a test runner, its server
    errors) print request paths; a local download link in a path is a live capability.
    This filter, on those loggers, replaces it with the route template."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "/backups/content/" in message:
            record.msg = _LINK_IN_PATH.sub(r"\1{link}", message)
            record.args = None
        return True


def redact_download_links() -> None:
    """Install the filters once on aiohttp's loggers (idempotent)."""
    for name in ("aiohttp.access", "aiohttp.server", "aiohttp.web"):
        logger = logging.getLogger(name)
        for kind in (RedactDownloadLinks, QuietMalformedRequests):
            if not any(isinstance(f, kind) for f in logger.filters):
                logger.addFilter(kind())


def configure_logging(config: LoggingConfig) -> None:
    # Fields nobody reads here, each costing a call per record; and no stack walk per record
    # to find the caller's file and line (the logging HOWTO's "Optimization" section).
    logging.logThreads = False
    logging.logMultiprocessing = False
    skip_caller_lookup()
    handler = LoopBufferedHandler(sys.stdout)
    # the local I/O process writes its lines with the same formatters: it reads which
    # from its environment
    os.environ[LOG_FORMAT_ENV] = config.format
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.level)
    # aiohttp's own access logger would duplicate ours, without route templates or user ids.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # botocore at debug prints request signatures and headers: keep it quiet unless asked.
    if config.level != "DEBUG":
        logging.getLogger("botocore").setLevel(logging.WARNING)
        logging.getLogger("aiobotocore").setLevel(logging.WARNING)
