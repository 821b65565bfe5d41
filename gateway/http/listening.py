"""The listening sockets of a serving process and the accept loop on them.

asyncio's own accept (`loop.create_server()`, under aiohttp's sites) makes a task, a future
and a transport for every connection before its protocol sees a byte: under a flood of
slow connections that reopen as fast as they are closed, that was most of what a closed
connection cost. Here a connection is accepted into a bare socket (`GuardedConnection`,
watched by socket_watch.py); a transport and aiohttp's handler are made only once its
first request head is complete. The sockets are bound as asyncio binds them, and the
kernel asked to hold a connection back until its first bytes (TCP_DEFER_ACCEPT)."""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Callable

from .connections import ACCEPT_BATCH, ConnectionGuard

# accept() failures that mean "no descriptor or buffer now": accepting pauses this long, as
# asyncio's own accept does, instead of failing again at every turn of the loop
_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_RETRY_SECONDS = 1.0

# How long the kernel holds an accepted handshake that has sent nothing. Linux counts it in
# SYN-ACK retransmissions: 1 s is one, so a silent connection is handed over at ~1 s and
# then meets the head deadline like any other (a client that speaks first, as HTTP clients
# do, is handed over with its first bytes, at once).
DEFER_ACCEPT_SECONDS = 1


def listening_socket(family: int, kind: int, proto: int, reuse_port: bool = False) -> socket.socket:
    """A socket to bind as asyncio binds: a port left in TIME_WAIT by a stopped gateway is
    free (SO_REUSEADDR), and an IPv6 one takes IPv6 only."""
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    return sock


async def bind(host: str, port: int, backlog: int, reuse_port: bool = False) -> list[socket.socket]:
    """Listening sockets on every address `host` resolves to (all, when empty), as
    `loop.create_server()` makes them: SO_REUSEADDR, IPv6 sockets IPv6-only, non-blocking."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = listening_socket(family, kind, proto, reuse_port)
            sockets.append(sock)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"error while attempting to bind on address {address!r}: {exc}"
                ) from None
            sock.listen(backlog)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def defer_accept_until_data(sockets: list[socket.socket]) -> bool:
    """Ask the kernel not to hand over a connection before its first bytes (or
    DEFER_ACCEPT_SECONDS); False where the platform has no TCP_DEFER_ACCEPT."""
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None:
        return False
    for sock in sockets:
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
    return True


class Acceptor:
    """Accepts on listening sockets, up to ACCEPT_BATCH connections a wake-up, each handed
    to the guard with aiohttp's protocol factory."""

    def __init__(self, guard: ConnectionGuard, factory: Callable[[], asyncio.Protocol]) -> None:
        self._guard = guard
        self._factory = factory
        self._loop = asyncio.get_running_loop()
        self._sockets: list[socket.socket] = []
        self._stopped = False

    def start(self, sockets: list[socket.socket]) -> None:
        self._sockets = list(sockets)
        for sock in self._sockets:
            self._loop.add_reader(sock.fileno(), self._accept, sock)

    def stop(self) -> None:
        """No connection is accepted any more, and the sockets are closed: the port is free."""
        self._stopped = True
        for sock in self._sockets:
            self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    def _accept(self, listening: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = listening.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                # the loop's handler (QuietLoopErrors) logs each message at most once a
                # second; asyncio's own words for the first, as before
                short = exc.errno in _OUT_OF_RESOURCES
                message = f"socket.accept() {'out of system resource' if short else 'failed'}"
                self._loop.call_exception_handler({"message": message, "exception": exc})
                if short:
                    self._loop.remove_reader(listening.fileno())
                    self._loop.call_later(ACCEPT_RETRY_SECONDS, self._resume, listening)
                return
            sock.setblocking(False)
            self._guard.accept(sock, peer, self._factory)

    def _resume(self, listening: socket.socket) -> None:
        if not self._stopped:
            self._loop.add_reader(listening.fileno(), self._accept, listening)
