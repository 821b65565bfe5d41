"""Storage calls from the routes: under the backpressure gate, timed, errors mapped once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web

from storage_backends import BackupStore, StorageError

from ..http.backpressure import STORAGE_GATE
from ..http.errors import storage_error
from ..telemetry.metrics import METRICS

A = TypeVar("A")
T = TypeVar("T")

STORE = web.AppKey("store", BackupStore)


async def run_storage(
    request: web.Request,
    operation: str,
    call: Callable[[A], Awaitable[T]],
    target: A,
    failure: str | None = None,
) -> T:
    """Run one storage call under the concurrency gate, with metrics and error mapping.

    A 502 says "failed to <failure>" (default: "<operation> backup")."""
    app = request.app
    backend = app[STORE].name
    metrics = app[METRICS]
    gate = app[STORAGE_GATE]
    await gate.enter()
    started = time.perf_counter()
    outcome = "ok"
    try:
        return await call(target)
    except StorageError as exc:
        outcome = type(exc).__name__
        raise storage_error(exc, failure or f"{operation} backup") from None
    except asyncio.CancelledError:
        outcome = "cancelled"
        raise
    finally:
        gate.leave()
        metrics.storage_operation(backend, operation, outcome, time.perf_counter() - started)
