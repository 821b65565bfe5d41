"""The one use of asyncio's internals, pinned by tests/test_library_internals.py."""

from __future__ import annotations

import asyncio


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
