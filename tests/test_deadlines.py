"""One timer for every request's deadline: each request still expires on time, alone."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from gateway.http.deadlines import DeadlineExceeded, RequestDeadlines

from .support import eventually


async def guarded(deadlines: RequestDeadlines, work: float) -> str:
    try:
        await deadlines.run(asyncio.sleep(work))
        return "answered"
    except DeadlineExceeded:
        return "timed out"


async def test_each_request_expires_at_its_own_deadline() -> None:
    deadlines = RequestDeadlines(0.3)
    loop = asyncio.get_running_loop()
    started = loop.time()
    slow_first = asyncio.create_task(guarded(deadlines, 5))
    await asyncio.sleep(0.1)  # the scenario: the others arrive a moment later
    second_started = loop.time()  # before theirs: their deadlines are 0.3 s past it, or later
    quick = asyncio.create_task(guarded(deadlines, 0.05))
    slow_second = asyncio.create_task(guarded(deadlines, 5))
    ends: dict[str, float] = {}

    async def timed(name: str, task: asyncio.Task[str]) -> str:
        result = await task
        ends[name] = loop.time() - started
        return result

    results = await asyncio.gather(
        timed("first", slow_first), timed("quick", quick), timed("second", slow_second)
    )
    assert results == ["timed out", "answered", "timed out"]
    # each at its own deadline, never before it (the second not with the first); "timed
    # out" says it was before its 5 s of work, however loaded the machine
    assert ends["first"] >= 0.3 - 0.001
    assert ends["second"] >= second_started - started + 0.3 - 0.001
    assert not deadlines._running and not deadlines._expired


async def test_someone_elses_cancellation_is_not_a_timeout() -> None:
    deadlines = RequestDeadlines(0.2)
    task = asyncio.create_task(guarded(deadlines, 5))
    while task not in deadlines._running:  # turns of the loop, until its deadline is set
        await asyncio.sleep(0)
    task.cancel()  # e.g. shutdown, before the deadline
    with pytest.raises(asyncio.CancelledError):
        await task
    # the timer fires later and finds nothing to cancel
    await eventually(lambda: deadlines._timer is None, "the timer fired")
    assert not deadlines._running and not deadlines._expired


async def test_swallowed_cancellation_is_given_back() -> None:
    deadlines = RequestDeadlines(0.05)

    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # work that ignores cancellation
            await asyncio.sleep(5)
        return "late answer"

    async def request() -> str:
        answer = await deadlines.run(stubborn())
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        return answer

    assert await request() == "late answer"


async def test_a_connection_task_serves_on_after_a_timeout() -> None:
    # aiohttp serves a keep-alive connection's requests in one task: after a 504 the
    # task must not carry a pending cancellation into the next request.
    deadlines = RequestDeadlines(0.1)

    async def connection() -> list[str]:
        first = await guarded(deadlines, 5)
        second = await guarded(deadlines, 0.01)
        task = asyncio.current_task()
        assert task is not None and task.cancelling() == 0
        return [first, second]

    assert await connection() == ["timed out", "answered"]
