"""The sockets still waiting for a request head, watched for readiness as one.

asyncio's `add_reader` and `remove_reader` cost a handle, a selector key and its
bookkeeping in Python, twice a connection: under a flood of slow connections reopened as
fast as they are closed that was a fifth of what each cost the gateway (py-spy). Where
Linux's epoll is available the waiting sockets are registered in an epoll of their own,
which the loop watches as one reader: watching a socket is one system call, and a socket
closed while watched needs none (the kernel drops a closed file from every epoll it is
in). Elsewhere the loop's own readers do it."""

from __future__ import annotations

import asyncio
import select
from collections.abc import Callable
from typing import Protocol


class SocketWatch(Protocol):
    """Calls `on_readable` whenever a watched socket has bytes (or its end) to read."""

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None: ...

    def forget(self, fd: int, closing: bool) -> None:
        """No longer watched; `closing`: the caller closes the socket next."""
        ...

    def close(self) -> None: ...


class EpollWatch:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callable[[], None]] = {}
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._epoll.register(fd, select.EPOLLIN)
        self._callbacks[fd] = on_readable

    def forget(self, fd: int, closing: bool) -> None:
        del self._callbacks[fd]
        if not closing:  # a closed socket leaves the epoll by itself
            self._epoll.unregister(fd)

    def _dispatch(self) -> None:
        # Level-triggered: a socket not read to its end is reported again at the next
        # turn. A descriptor forgotten by an earlier callback of this batch is skipped; one
        # closed and reused since the poll gets a read that finds nothing (non-blocking).
        for fd, _ in self._epoll.poll(0):
            callback = self._callbacks.get(fd)
            if callback is not None:
                callback()

    def close(self) -> None:
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._callbacks.clear()


class LoopWatch:
    """The loop's own readers, one a socket: where there is no epoll."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def watch(self, fd: int, on_readable: Callable[[], None]) -> None:
        self._loop.add_reader(fd, on_readable)

    def forget(self, fd: int, closing: bool) -> None:
        self._loop.remove_reader(fd)

    def close(self) -> None:
        pass


def socket_watch(loop: asyncio.AbstractEventLoop) -> SocketWatch:
    return EpollWatch(loop) if hasattr(select, "epoll") else LoopWatch(loop)
