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
  connection has sent its head (requests in flight) is the new one closed, at once, before
  anything is made for it;
- the open-files limit is raised to its hard limit at start, and the cap kept below it,
  less a reserve that absorbs one wake-up's accepts (ACCEPT_BATCH); an open backup (a
  local download holds its connection's descriptor and its file's) takes its descriptor
  from the same budget when it opens, closing a connection still waiting for its head
  if that is what makes room;
- a connection is a bare socket until its first head is complete (the accept loop is
  ours: listening.py), its first bytes read as it is accepted and the rest as they come
  (one epoll for all such sockets: socket_watch.py): no transport, aiohttp handler, task
  or timer, so a flood of connections that never send one costs as little as it can;
- before all that, the kernel itself holds a connection that has sent nothing
  (TCP_DEFER_ACCEPT, as nginx's `deferred`): it is not accepted until its first bytes
  come, or about a second has passed, so a silent flood takes no descriptor and no turn
  of the loop for that second, and one that reconnects as fast as it is closed churns
  once a second a connection, not as fast as the gateway can close it;
- "socket.accept() out of system resource" (then accepting pauses for a second, as
  asyncio's own accept does) and any other loop error are logged at most once a second
  per message, with a count of what was left out.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web

from ..telemetry.metrics import Metrics
from .asyncio_internals import drop_read_callback, make_socket_transport
from .socket_watch import SocketWatch, socket_watch

log = logging.getLogger(__name__)

# descriptors kept free of connections: listening sockets, the I/O process, logs, clients,
# and the connections accepted at one wake-up (ACCEPT_BATCH) before the guard closes as
# many: more than the process has makes accept() fail, and accepting then pauses for a
# second (listening.py)
RESERVED_FDS = 128
# Few a wake-up: each accept at the cap closes a connection to make room (~30 us together),
# and a request whose answer is ready waits for the accepts of the turn it falls in. Under
# a flood that reopens as fast as it is closed, 4 rather than 16 took the deletes' p99 from
# a median of 5.9 ms to 4.9 over six runs each (docs/benchmarks.md); the queue stays short.
ACCEPT_BATCH = 4
# The end of a head: CRLF CRLF, or a blank line ended with bare LFs (LF LF, LF CRLF). The
# second is not HTTP/1.1 (aiohttp's parser answers it with a 400), but a head all the same,
# handed over at once for that answer. b"\n\r\n" is the end of CRLF CRLF too.
_HEAD_ENDS = (b"\n\r\n", b"\n\n")
# bytes held before a head is complete; past them aiohttp's parser decides (its limits on
# a line and a field are 8 and 16 KiB by default)
HANDOVER_BYTES = 64 * 1024


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


def descriptor_budget(open_files: int) -> int:
    """The descriptors connections, open backups and uploads' files may take together:
    the open-files limit less the reserve."""
    return max(1, open_files - RESERVED_FDS)


def connection_cap(configured: int, open_files: int) -> int:
    """The cap in force: the configured one, kept below the descriptors this process has
    once the reserve is set aside (open backups are counted as they open: ConnectionGuard)."""
    usable = descriptor_budget(open_files)
    if configured > usable:
        log.warning(
            "server.max_connections %d lowered to %d: the open-files limit is %d",
            configured,
            usable,
            open_files,
        )
        return usable
    return configured


class DescriptorBudget(Protocol):
    """Where a descriptor held beside a connection's (an open backup, an upload's files) is
    counted: take_descriptors may close connections waiting for their head to make room, and
    is False (nothing taken) when every other descriptor is a request's."""

    def take_descriptors(self, count: int) -> bool: ...

    def give_descriptors(self, count: int) -> None: ...


# the serving process's budget (serve.py); absent where nothing counts connections
DESCRIPTORS = web.AppKey("descriptors", DescriptorBudget)


class ConnectionGuard:
    """Counts the open connections of one listening site and wraps each new one.

    Open backups (local downloads and restores) and local uploads' files take descriptors
    from the same budget as connections: each is counted in when opened
    (`take_descriptors`), so the cap is what is left beside those open now, not beside as
    many as could ever be."""

    def __init__(
        self, max_connections: int, head_timeout: float, descriptors: int | None = None
    ) -> None:
        self.max_connections = max_connections
        self.head_timeout = head_timeout
        # connections, open backups and uploads' files together; the reserve set aside
        self.descriptors = max_connections if descriptors is None else descriptors
        self.open = 0
        self.held = 0  # descriptors held beside connections: open backups, uploads' files
        self.refused = 0  # reset at accept: over the cap, none to make room
        self.evicted = 0  # aborted to make room: the longest waiting for a request head
        self.head_timeouts = 0  # aborted: no complete request head in time
        # the admitted connections still without a complete first head, oldest first, with
        # the loop time each was admitted at
        self._waiting: OrderedDict[GuardedConnection, float] = OrderedDict()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closing = False  # shutting down: nothing admitted, no head taken up
        # the serving loop, and what watches the sockets still waiting for a head: both
        # from the first accept on (the guard is made before it may be in a loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watch: SocketWatch | None = None

    def _attached(self) -> tuple[asyncio.AbstractEventLoop, SocketWatch]:
        if self._loop is None or self._watch is None:
            self._loop = asyncio.get_running_loop()
            self._watch = socket_watch(self._loop)
        return self._loop, self._watch

    def _full(self) -> bool:
        return self.open >= self.max_connections or self.open + self.held >= self.descriptors

    def _make_room(self) -> bool:
        """Abort the connection that has waited longest for its first head; False: every
        open connection is past its head (requests in flight), none is aborted."""
        if not self._waiting:
            return False
        oldest, _ = self._waiting.popitem(last=False)
        self.evicted += 1
        oldest.close_now()
        return True

    def admit(self, connection: GuardedConnection) -> bool:
        """Count a new connection in, making room if the cap is reached; False: refused."""
        if self.closing or (self._full() and not self._make_room()):
            return False
        self.open += 1
        loop, _ = self._attached()
        self._waiting[connection] = loop.time()
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_interval(), self._sweep)
        return True

    def close_waiting(self) -> None:
        """At shutdown, before aiohttp's: the connections still waiting for a head are
        closed (aiohttp knows nothing of them), none is admitted any more, and a head that
        completes from now on is not taken up."""
        self.closing = True
        while self._waiting:
            oldest, _ = self._waiting.popitem(last=False)
            oldest.close_now()
        if self._watch is not None:
            self._watch.close()

    def take_descriptors(self, count: int) -> bool:
        """`count` descriptors are about to be opened beside a connection's (a backup, an
        upload's files): count them in, closing as many connections waiting for their head
        as that needs; False, and nothing closed or taken, when fewer are waiting than
        that (every other descriptor is a request's)."""
        short = self.open + self.held + count - self.descriptors
        if short > len(self._waiting):
            return False
        for _ in range(max(short, 0)):
            self._make_room()
        self.held += count
        return True

    def give_descriptors(self, count: int) -> None:
        self.held -= count

    def head_complete(self, connection: GuardedConnection) -> None:
        self._waiting.pop(connection, None)

    def release(self, connection: GuardedConnection) -> None:
        self.open -= 1
        self._waiting.pop(connection, None)

    def _sweep_interval(self) -> float:
        return min(1.0, self.head_timeout / 4)

    def _sweep(self) -> None:
        """Abort the connections whose first head is overdue. One timer for all, not one a
        connection: the waiting are in the order they came, so the overdue are in front,
        and a flood of reconnections costs no timer to set and cancel each."""
        self._sweeper = None
        expired_before = asyncio.get_running_loop().time() - self.head_timeout
        while self._waiting:
            oldest, admitted_at = next(iter(self._waiting.items()))
            if admitted_at > expired_before:
                break
            del self._waiting[oldest]
            self.head_timeouts += 1
            oldest.close_now()
        if self._waiting:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._sweep_interval(), self._sweep
            )

    def export(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "gauge", "gateway_connections_open", "Client connections open", lambda: self.open
        )
        metrics.add_reading(
            "gauge",
            "gateway_descriptors_held",
            "Descriptors held beside connections: open backups and local uploads' files",
            lambda: self.held,
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

    def accept(
        self,
        sock: socket.socket,
        peer: Any,
        factory: Callable[[], asyncio.Protocol],
        again: bool = True,
    ) -> None:
        """A socket just accepted: admitted and watched for its head, or closed (over the
        cap with none to make room, or shutting down). Refused once, it is looked at again
        at the loop's next turn before it is closed: a connection closed in this turn (an
        answer with `Connection: close`) is counted out only then, by its transport's
        connection_lost, and a socket closed with its request unread is a reset."""
        loop, watch = self._attached()
        connection = GuardedConnection(self, loop, watch, factory, sock, peer)
        if self.admit(connection):
            connection.admitted()
        elif again and not self.closing:
            loop.call_soon(self.accept, sock, peer, factory, False)
        else:
            self.refused += 1
            sock.close()  # no handler, no task, no buffer


class GuardedConnection(asyncio.Protocol):
    """One connection from its accept on: until its first request head is complete it is
    a bare socket the loop watches, its bytes held here; then a transport is made around
    it and aiohttp's protocol, made only then, is given the bytes held.

    A connection that never completes a head (a slowloris, or one closed to make room) so
    costs a socket, a reader and this object: no transport, no aiohttp handler, no task,
    no timer. Past HANDOVER_BYTES without the blank line, aiohttp gets what came (its
    parser's limits answer an oversized head as before), and the connection goes on
    waiting for its head as far as the guard is concerned."""

    __slots__ = (
        "_closed",
        "_counted",
        "_factory",
        "_guard",
        "_head",
        "_head_done",
        "_inner",
        "_loop",
        "_peer",
        "_scan",
        "_sock",
        "_transport",
        "_watch",
        "_watched",
    )

    def __init__(
        self,
        guard: ConnectionGuard,
        loop: asyncio.AbstractEventLoop,
        watch: SocketWatch,
        factory: Callable[[], asyncio.Protocol],
        sock: socket.socket,
        peer: Any,
    ) -> None:
        self._guard = guard
        self._factory = factory
        self._loop = loop
        self._watch = watch
        self._watched = False  # its socket in the watch: read when readable
        self._sock: socket.socket | None = sock  # until the transport is made around it
        self._peer = peer
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.Transport | None = None
        self._head = bytearray()  # the bytes held for aiohttp, until it is made
        # what is looked at for the blank line: from the first byte that is not part of a
        # blank line before the request line, then its last two bytes between reads
        self._scan = bytearray()
        self._head_done = False  # its first head's blank line has come
        self._counted = False  # in the guard's count of open connections
        self._closed = False

    def admitted(self) -> None:
        """Counted in by the guard: its bytes are read from now on. Handed over by the
        kernel's deferred accept, a connection has its first bytes here already, often its
        whole head: they are read at once, and a head complete in them is handed over
        without the socket ever being watched."""
        self._counted = True
        self._on_readable()
        if self._sock is not None:  # not closed, not handed over: waits for more
            self._watch.watch(self._sock.fileno(), self._on_readable)
            self._watched = True

    def _on_readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(HANDOVER_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close_now()  # reset by the client: nothing to answer
            return
        if not data:
            self.close_now()  # closed before its head: nothing to answer
            return
        self._look_for_head_end(data)
        self._head += data
        if self._head_done or len(self._head) > HANDOVER_BYTES:
            self._hand_over()

    def _look_for_head_end(self, data: bytes) -> None:
        """Only the blank line that ends the first head is looked for; aiohttp parses it
        all. Blank lines before the request line are skipped (RFC 9112 §2.2, as aiohttp
        does): they end no head, or a client could send one and then trickle the rest past
        every deadline."""
        self._scan += data if self._scan else data.lstrip(b"\r\n")
        if any(self._scan.find(end) >= 0 for end in _HEAD_ENDS):
            self._head_done = True
            self._scan = bytearray()
            self._guard.head_complete(self)
        else:
            del self._scan[:-2]

    def _hand_over(self) -> None:
        """A transport made around the socket; aiohttp's protocol follows in
        connection_made. Past HANDOVER_BYTES without a blank line the connection is handed
        over still waiting for its head: its deadline and its place among the first to make
        room stay."""
        if self._guard.closing:
            self.close_now()  # shutting down: nothing new is taken up
            return
        sock, self._sock = self._sock, None
        assert sock is not None
        self._unwatch(sock, closing=False)
        self._transport = make_socket_transport(self._loop, sock, self, self._peer)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._closed:
            return  # closed between the hand-over and now: connection_lost follows
        assert isinstance(transport, asyncio.Transport)
        head, self._head = bytes(self._head), bytearray()
        self._inner = self._factory()
        self._inner.connection_made(transport)
        self._inner.data_received(head)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return  # closed to make room, or its head overdue: what follows is dropped
        if not self._head_done:
            self._look_for_head_end(data)
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        transport, self._transport = self._transport, None
        if self._inner is not None:
            inner, self._inner = self._inner, None
            inner.connection_lost(exc)
        if transport is not None:
            drop_read_callback(transport)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def close_now(self) -> None:
        """Abort the connection, out of the count at once (the room is the next one's)."""
        self._release()
        self._closed = True
        self._head = bytearray()
        if self._transport is not None:
            self._transport.abort()  # it stops reading at once
            drop_read_callback(self._transport)
            self._transport = None
        elif self._sock is not None:
            sock, self._sock = self._sock, None
            self._unwatch(sock, closing=True)
            sock.close()

    def _unwatch(self, sock: socket.socket, closing: bool) -> None:
        if self._watched:
            self._watched = False
            self._watch.forget(sock.fileno(), closing)

    def _release(self) -> None:
        if self._counted:
            self._counted = False
            self._guard.release(self)


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
