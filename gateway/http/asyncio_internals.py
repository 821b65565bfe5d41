"""The uses of asyncio's internals, pinned by tests/test_library_internals.py."""

from __future__ import annotations

import asyncio
import socket
from typing import Any


def make_socket_transport(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    protocol: asyncio.Protocol,
    peername: Any,
) -> asyncio.Transport:
    """A transport around an accepted socket, made at once: the protocol's connection_made
    is called at the loop's next turn, before the transport first reads.

    The public way, `loop.connect_accepted_socket()`, is a coroutine: a task and a future a
    connection, and a turn of the loop in which the socket is nobody's. This is the call
    the selector loop's own accept makes (`_accept_connection2`), without its task."""
    make = loop._make_socket_transport  # type: ignore[attr-defined]
    transport: asyncio.Transport = make(sock, protocol, extra={"peername": peername})
    return transport


def drop_read_callback(transport: asyncio.BaseTransport) -> None:
    """Break the reference cycle of a closing selector transport.

    Python 3.11's socket transport keeps its read callback as a bound method of itself
    (`_read_ready_cb`), so no transport is freed when its connection ends: each waits for
    the cycle collector, with its socket object and extra-info dict. Under a flood of
    connections opened and closed thousands of times a second, that garbage grew into
    full collections of ~40,000 objects (22 ms each, every second or so) in the middle of
    every request. Called from the protocol's connection_lost: the transport has stopped
    reading and never calls it again."""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None  # type: ignore[attr-defined]
