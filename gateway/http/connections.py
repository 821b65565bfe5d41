"""Connection-level defences of a serving process: what happens before a request exists.

A client that opens connections and sends nothing (or a byte every few seconds) costs a
file descriptor each, and aiohttp alone would keep them for its keep-alive default of an
hour. Here every accepted connection is wrapped before aiohttp's protocol sees it:

- a connection whose first request head (up to its blank line) is not complete within
  `server.request_head_timeout_seconds` is aborted; after a response, aiohttp's own
  keep-alive timer (`server.keepalive_timeout_seconds`) closes idle and half-sent ones;
- at `server.max_connections` open at once, the connection that has waited longest
  without a complete first request head is aborted to make room for the new one: a flood
  of slow connections that reopen as fast as they are closed then only ever displaces its
  own, while a client that sends its head at once is served. Only when every open
  connection has sent its head (requests in flight) is the new one reset, at once, before
  aiohttp makes a handler or a task for it;
- the open-files limit is raised to its hard limit at start, and the cap kept below it,
  less a reserve that absorbs one wake-up's accepts (ACCEPT_BATCH) and
  the descriptors open backups may hold (`storage.download.max_open_backups`: a
  download holds its connection's and its file's);
- asyncio's "socket.accept() out of system resource" (and any other loop error) is logged
  at most once a second per message, with a count of what was left out: asyncio logs one
  error per failed accept(), up to the listen backlog at every tick.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..telemetry.metrics import Metrics

log = logging.getLogger(__name__)

# descriptors kept free of connections: listening sockets, the I/O process, logs, clients,
# and the connections accepted at one wake-up (ACCEPT_BATCH) before the guard closes as
# many: more than the process has makes accept() fail, and asyncio then stops accepting
# for a second
RESERVED_FDS = 128
ACCEPT_BATCH = 16
_HEAD_END = b"\r\n\r\n"


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open-files limit raised from %d to %d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open-files limit stays at %d: %s", soft, exc)
    return soft


def connection_cap(configured: int, open_files: int, open_backups: int = 0) -> int:
    """The cap in force: the configured one, kept below the descriptors this process has
    once the reserve and the `open_backups` that downloads may hold are set aside."""
    usable = max(1, open_files - RESERVED_FDS - open_backups)
    if configured > usable:
        log.warning(
            "server.max_connections %d lowered to %d: the open-files limit is %d, "
            "of which %d are kept for open backups",
            configured,
            usable,
            open_files,
            open_backups,
        )
        return usable
    return configured


class ConnectionGuard:
    """Counts the open connections of one listening site and wraps each new one."""

    def __init__(self, max_connections: int, head_timeout: float) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        self.open = 0
        self.refused = 0  # reset at accept: over the cap, none to make room
        self.evicted = 0  # aborted to make room: the longest waiting for a request head
        self.head_timeouts = 0  # aborted: no complete request head in time
        # the admitted connections still without a complete first head, oldest first
        self._waiting: OrderedDict[GuardedConnection, None] = OrderedDict()

    def admit(self, connection: GuardedConnection) -> bool:
        """Count a new connection in, making room if the cap is reached; False: refused."""
        if self.open >= self.max_connections:
            if not self._waiting:
                self.refused += 1
                return False
            oldest, _ = self._waiting.popitem(last=False)
            self.evicted += 1
            oldest.close_now()
        self.open += 1
        self._waiting[connection] = None
        return True

    def head_complete(self, connection: GuardedConnection) -> None:
        self._waiting.pop(connection, None)

    def release(self, connection: GuardedConnection) -> None:
        self.open -= 1
        self._waiting.pop(connection, None)

    def export(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "gauge", "gateway_connections_open", "Client connections open", lambda: self.open
        )
        metrics.add_reading(
            "counter",
            "gateway_connections_refused",
            "Connections reset at accept: at server.max_connections, all with requests",
            lambda: self.refused,
        )
        metrics.add_reading(
            "counter",
            "gateway_connections_evicted",
            "Connections closed at server.max_connections to make room for a new one: "
            "the longest waiting for a request head",
            lambda: self.evicted,
        )
        metrics.add_reading(
            "counter",
            "gateway_connection_head_timeouts",
            "Connections aborted: no complete request head in time",
            lambda: self.head_timeouts,
        )

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for loop.create_server() around aiohttp's `factory`."""
        return lambda: GuardedConnection(self, factory)


class GuardedConnection(asyncio.Protocol):
    """Forwards to aiohttp's protocol, made only once the connection is admitted."""

    __slots__ = ("_counted", "_factory", "_guard", "_inner", "_tail", "_timer", "_transport")

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""
        self._counted = False  # in the guard's count of open connections

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        guard = self._guard
        if not guard.admit(self):
            transport.abort()  # a reset: no handler, no task, no buffer
            return
        self._counted = True
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(guard.head_timeout, self._head_expired)
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            # Only the blank line that ends the first head is looked for, across reads;
            # aiohttp parses everything.
            seen = self._tail + data
            if _HEAD_END in seen:
                self._timer.cancel()
                self._timer = None
                self._tail = b""
                self._guard.head_complete(self)
            else:
                self._tail = seen[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None:
            return
        self._release()
        inner, self._inner = self._inner, None
        self._transport = None
        inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def close_now(self) -> None:
        """Abort the connection, out of the count at once (the room is the next one's):
        aiohttp's protocol hears of it in connection_lost, as of any reset."""
        self._release()
        if self._transport is not None:
            self._transport.abort()

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._guard.release(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_expired(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._guard.head_timeouts += 1
            self.close_now()


class QuietLoopErrors:
    """A loop exception handler that logs each message at most once a second."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message", "event loop error"))
        now = self._clock()
        last = self._last.get(message)
        if last is not None and now - last < self._interval:
            self._left_out[message] = self._left_out.get(message, 0) + 1
            return
        self._last[message] = now
        left_out = self._left_out.pop(message, 0)
        since = now - last if last is not None else 0.0
        exc = context.get("exception")
        log.error(
            "%s%s",
            message,
            f" ({left_out} more like it in the last {since:.0f}s)" if left_out else "",
            extra={"fields": {"error": repr(exc) if exc is not None else None}},
        )
