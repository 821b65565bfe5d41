"""The watch over sockets still waiting for a request head (gateway/http/socket_watch.py):
both implementations, epoll's and the loop's own readers, against one behaviour, on real
sockets. Every connection the gateway accepts passes through it (tests/test_connections.py
drives it through a gateway process); here, what each must do at its edges."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from gateway.http.socket_watch import EpollWatch, LoopWatch, SocketWatch

from .support import eventually

WATCHES: list[Callable[[asyncio.AbstractEventLoop], SocketWatch]] = [LoopWatch]
if hasattr(select, "epoll"):
    WATCHES.append(EpollWatch)


@pytest.fixture(params=WATCHES, ids=lambda kind: kind.__name__)
async def watch(request: pytest.FixtureRequest) -> AsyncIterator[SocketWatch]:
    made = request.param(asyncio.get_running_loop())
    yield made
    made.close()


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


async def test_a_watched_socket_is_read_when_bytes_come_and_not_before(
    watch: SocketWatch, pair: tuple[socket.socket, socket.socket]
) -> None:
    ours, theirs = pair
    received: list[bytes] = []

    def on_readable() -> None:
        received.append(ours.recv(100))

    watch.watch(ours.fileno(), on_readable)
    await asyncio.sleep(0)  # a turn of the loop with nothing to read
    assert received == []
    theirs.sendall(b"GET")
    await eventually(lambda: received == [b"GET"], "the bytes read")
    theirs.sendall(b" /")
    await eventually(lambda: received == [b"GET", b" /"], "the next bytes read")
    watch.forget(ours.fileno(), closing=False)


async def test_a_forgotten_socket_stays_open_and_is_read_no_more(
    watch: SocketWatch, pair: tuple[socket.socket, socket.socket]
) -> None:
    """A head complete: the socket is forgotten and handed to a transport, which reads on."""
    ours, theirs = pair
    calls: list[int] = []
    watch.watch(ours.fileno(), lambda: calls.append(1))
    watch.forget(ours.fileno(), closing=False)
    theirs.sendall(b"x")
    for _ in range(5):
        await asyncio.sleep(0)
    assert calls == []
    assert ours.recv(10) == b"x"  # still open, its bytes where they were


async def test_a_socket_closed_while_watched_leaves_no_trace(
    watch: SocketWatch, pair: tuple[socket.socket, socket.socket]
) -> None:
    """Closed to make room: forgotten, closed, and its descriptor number, reused by the next
    accept, is watched afresh for the new socket alone."""
    ours, _ = pair
    stale: list[int] = []
    watch.watch(ours.fileno(), lambda: stale.append(1))
    number = ours.fileno()
    watch.forget(number, closing=True)
    ours.close()
    again, again_theirs = socket.socketpair()
    try:
        assert again.fileno() == number  # the lowest free descriptor: the one just closed
        again.setblocking(False)
        fresh: list[bytes] = []
        watch.watch(again.fileno(), lambda: fresh.append(again.recv(10)))
        again_theirs.sendall(b"new")
        await eventually(lambda: fresh == [b"new"], "the new socket read")
        assert stale == []
        watch.forget(again.fileno(), closing=True)
    finally:
        again.close()
        again_theirs.close()
