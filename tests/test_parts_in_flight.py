"""The parts of a digest upload going up while the next is read (storage_backends.s3.
parts_in_flight): how many at once, the process's held budget they draw on, and what a
failure or a cancellation leaves. The upload through a real gateway and store is in
test_s3_multipart_digest.py; here the bookkeeping, with parts whose sending (and reads
whose bytes) the test finishes itself."""

from __future__ import annotations

import asyncio
import functools
from typing import Any

import pytest

from storage_backends.s3.parts_in_flight import PartsInFlight
from storage_backends.s3.uploads import HeldBytes

PART = 64


class Steps:
    """Parts that go up, and reads that end, when the test says so."""

    def __init__(self) -> None:
        self.futures: dict[str, asyncio.Future[None]] = {}

    def future(self, name: str) -> asyncio.Future[None]:
        if name not in self.futures:
            self.futures[name] = asyncio.get_running_loop().create_future()
        return self.futures[name]

    async def send(self, number: int) -> dict[str, Any]:
        await self.future(f"part {number}")
        return {"PartNumber": number}

    async def read(self, name: str) -> str:
        await self.future(name)
        return name

    def end(self, name: str, error: BaseException | None = None) -> None:
        if error is None:
            self.future(name).set_result(None)
        else:
            self.future(name).set_exception(error)


async def settled() -> None:
    """Everything ready has run (a few turns of the loop, no time waited)."""
    for _ in range(5):
        await asyncio.sleep(0)


async def waiting(task: asyncio.Task[Any]) -> bool:
    """Whether the task still waits once everything ready has run."""
    await settled()
    return not task.done()


async def test_the_next_part_is_read_while_one_goes_up_and_the_budget_pays_for_it() -> None:
    budget, steps = HeldBytes(PART), Steps()
    flight = PartsInFlight(budget, PART, limit=2)
    steps.end("read 1")
    assert await flight.read_next(lambda: steps.read("read 1")) == "read 1"
    assert budget.held == 0  # nothing else in memory: the upload's own part
    flight.send(steps.send(1))
    steps.end("read 2")
    await flight.read_next(lambda: steps.read("read 2"))  # part 1 going up: paid from the budget
    assert budget.held == PART
    flight.send(steps.send(2))
    third = asyncio.ensure_future(flight.read_next(lambda: steps.read("read 3")))
    assert await waiting(third)
    assert "read 3" not in steps.futures  # two in memory: the third is not read yet
    steps.end("part 1")
    steps.end("read 3")
    await third
    assert budget.held == PART  # part 1's share back, one taken for the third
    flight.send(steps.send(3))
    steps.end("part 3")  # out of order: still completed in order
    steps.end("part 2")
    assert [p["PartNumber"] for p in await flight.all_up()] == [1, 2, 3]
    assert budget.held == 0


async def test_a_share_comes_back_when_its_part_is_up_even_while_the_next_is_read() -> None:
    """A slow appliance keeps its next part coming for long: the part that went up meanwhile
    no longer holds the budget small bodies need."""
    budget, steps = HeldBytes(PART), Steps()
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(steps.send(1))
    reading = asyncio.ensure_future(flight.read_next(lambda: steps.read("read 2")))
    assert await waiting(reading)
    assert budget.held == PART
    steps.end("part 1")
    assert await waiting(reading)
    assert budget.held == 0  # one part in memory: the one being read
    steps.end("read 2")
    await reading
    assert [p["PartNumber"] for p in await flight.all_up()] == [1]


async def test_with_the_budget_spent_one_part_is_in_memory_at_a_time() -> None:
    budget, steps = HeldBytes(PART), Steps()
    assert budget.take(PART)  # another upload holds it all
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(steps.send(1))
    reading = asyncio.ensure_future(flight.read_next(lambda: steps.read("read 2")))
    assert await waiting(reading)
    assert "read 2" not in steps.futures
    steps.end("part 1")
    steps.end("read 2")
    await reading
    assert budget.held == PART  # the other upload's, nothing of this one


async def test_a_part_that_fails_while_the_next_is_read_stops_the_read() -> None:
    budget, steps = HeldBytes(PART), Steps()
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(steps.send(1))
    reading = asyncio.ensure_future(flight.read_next(lambda: steps.read("read 2")))
    assert await waiting(reading)
    steps.end("part 1", ConnectionResetError("the store went away"))
    with pytest.raises(ConnectionResetError):
        await reading  # not once the appliance's whole next part came in
    assert steps.futures["read 2"].cancelled()
    assert budget.held == 0


async def test_a_failed_part_is_raised_and_the_rest_cancelled_with_the_budget_given_back() -> None:
    budget, steps = HeldBytes(2 * PART), Steps()
    flight = PartsInFlight(budget, PART, limit=3)
    for number in (1, 2, 3):
        steps.end(f"read {number}")
        await flight.read_next(functools.partial(steps.read, f"read {number}"))
        flight.send(steps.send(number))
    assert budget.held == 2 * PART
    steps.end("part 2", ConnectionResetError("the store went away"))
    with pytest.raises(ConnectionResetError):
        await flight.all_up()
    flight.cancel()
    await flight.stopped()
    assert steps.futures["part 1"].cancelled() and steps.futures["part 3"].cancelled()
    assert budget.held == 0


async def test_the_budget_comes_back_however_often_the_upload_is_cancelled() -> None:
    """The request cancelled (its deadline), and again while its parts stop (shutdown):
    the shares come back as the parts end, whoever waits for them."""
    budget, steps = HeldBytes(PART), Steps()
    flight = PartsInFlight(budget, PART, limit=2)
    flight.send(steps.send(1))
    reading = asyncio.ensure_future(flight.read_next(lambda: steps.read("read 2")))
    assert await waiting(reading)
    reading.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reading
    assert steps.futures["read 2"].cancelled()
    assert not steps.futures["part 1"].cancelled()  # the reader's cancel is not the part's
    flight.cancel()
    stopping = asyncio.ensure_future(flight.stopped())
    stopping.cancel()  # cancelled again before it waited for the parts to stop
    with pytest.raises(asyncio.CancelledError):
        await stopping
    await settled()
    assert steps.futures["part 1"].cancelled()
    assert budget.held == 0
