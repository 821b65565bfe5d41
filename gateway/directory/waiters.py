"""Handing one answer, or one failure, to everyone who waits for it on a future of their own.

The cache, the batcher and the case scan each let many callers wait for one question; a
waiter that went away (its future cancelled) is skipped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import TypeVar

T = TypeVar("T")


def answer_all(waiters: Iterable[asyncio.Future[T]], answer: T) -> None:
    for waiter in waiters:
        if not waiter.done():
            waiter.set_result(answer)


def fail_all(waiters: Iterable[asyncio.Future[T]], failure: BaseException) -> None:
    """A cancellation or an exit is not theirs to re-raise: they get a RuntimeError."""
    if not isinstance(failure, Exception):
        failure = RuntimeError("lookup stopped")
    for waiter in waiters:
        if not waiter.done():
            waiter.set_exception(failure)
