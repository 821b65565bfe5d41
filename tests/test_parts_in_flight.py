"""The parts of a digest upload going up while the next is read (storage_backends.s3.
parts_in_flight): how many at once, and the process's held budget they draw on. The
upload through a real gateway and store is in test_s3_multipart_digest.py; here the
bookkeeping, with parts whose sending the test finishes itself."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from storage_backends.s3.parts_in_flight import PartsInFlight
from storage_backends.s3.uploads import HeldBytes

PART = 64


class Parts:
    """Parts that go up when the test says so."""

    def __init__(self) -> None:
        self.done: dict[int, asyncio.Future[None]] = {}

    def _future(self, number: int) -> asyncio.Future[None]:
        if number not in self.done:
            self.done[number] = asyncio.get_running_loop().create_future()
        return self.done[number]

    async def send(self, number: int) -> dict[str, Any]:
        await self._future(number)
        return {"PartNumber": number}

    def up(self, number: int, error: BaseException | None = None) -> None:
        if error is None:
            self._future(number).set_result(None)
        else:
            self._future(number).set_exception(error)


async def started(task: asyncio.Task[Any]) -> bool:
    """Whether the task is still waiting once everything ready has run."""
    for _ in range(5):
        await asyncio.sleep(0)
    return not task.done()


async def test_the_next_part_is_read_while_one_goes_up_and_the_budget_pays_for_it() -> None:
    budget, parts = HeldBytes(PART), Parts()
    flight = PartsInFlight(budget, PART, limit=2)
    await flight.room_for_next()  # nothing in memory: the first part is the upload's own
    assert budget.held == 0
    flight.send(parts.send(1))
    await flight.room_for_next()  # one going up: the next is read, paid from the budget
    assert budget.held == PART
    flight.send(parts.send(2))
    waiting = asyncio.ensure_future(flight.room_for_next())
    assert await started(waiting)  # two in memory: the third waits for the first
    parts.up(1)
    await waiting
    assert budget.held == PART  # one given back, one taken for the third
    flight.send(parts.send(3))
    parts.up(2)
    parts.up(3)
    assert [p["PartNumber"] for p in await flight.all_up()] == [1, 2, 3]
    assert budget.held == 0
    await flight.cancel()
    assert budget.held == 0


async def test_with_the_budget_spent_one_part_goes_up_at_a_time() -> None:
    budget, parts = HeldBytes(PART), Parts()
    assert budget.take(PART)  # another upload holds it all
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(parts.send(1))
    waiting = asyncio.ensure_future(flight.room_for_next())
    assert await started(waiting)
    parts.up(1)
    await waiting
    assert budget.held == PART  # the other upload's, nothing of this one
    assert [p["PartNumber"] for p in await flight.all_up()] == [1]


async def test_a_failed_part_is_raised_and_the_rest_cancelled_with_the_budget_given_back() -> None:
    budget, parts = HeldBytes(2 * PART), Parts()
    flight = PartsInFlight(budget, PART, limit=3)
    flight.send(parts.send(1))
    await flight.room_for_next()
    flight.send(parts.send(2))
    await flight.room_for_next()
    flight.send(parts.send(3))
    assert budget.held == 2 * PART
    parts.up(1, ConnectionResetError("the store went away"))
    with pytest.raises(ConnectionResetError):
        await flight.all_up()
    await flight.cancel()
    assert budget.held == 0
    assert all(future.cancelled() for n, future in parts.done.items() if n > 1)


async def test_a_reader_cancelled_while_waiting_leaves_the_parts_to_cancel() -> None:
    budget, parts = HeldBytes(PART), Parts()
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(parts.send(1))
    await flight.room_for_next()
    flight.send(parts.send(2))
    waiting = asyncio.ensure_future(flight.room_for_next())
    assert await started(waiting)
    waiting.cancel()  # the request's deadline, the appliance gone
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert not parts.done[1].cancelled()  # shielded: the reader's cancel is not the part's
    await flight.cancel()
    assert parts.done[1].cancelled() and parts.done[2].cancelled()
    assert budget.held == 0
