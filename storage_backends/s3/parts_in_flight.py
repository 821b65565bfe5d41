"""The parts of a multipart upload with a digest, each sent while the next is read.

A part's `x-amz-checksum-sha256` goes in its request's headers, so a part is read into
memory and hashed before it is sent; read and sent one after the other, the appliance's
connection stands still while each part goes up, and the store while each is read (a
1 GiB body went up at 0.7 of a raw client's speed, against the staging path that streams
through). Sent while the next is read, both move at once.

Memory is bounded twice: at most `limit` parts are in memory at once (those going up and
the one being read), and every one beyond the first is taken from the process's held
budget (`HeldBytes`): with the budget spent by other uploads, the next part is read only
once the others are up. A part's share goes back the moment its request ends, whoever
waits for it or not, so no cancellation keeps the budget."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

Part = dict[str, Any]  # as CompleteMultipartUpload takes it: number, ETag, checksum
T = TypeVar("T")


class Budget(Protocol):
    def take(self, size: int) -> bool: ...

    def give_back(self, size: int) -> None: ...


class PartsInFlight:
    """Parts sent in the background, up in their order; `read_next` reads the next once
    there is room for it."""

    def __init__(self, budget: Budget, part_bytes: int, limit: int) -> None:
        self._budget = budget
        self._part_bytes = part_bytes  # what a part in memory is counted as, the last too
        self._limit = limit
        self._sending: deque[asyncio.Task[Part]] = deque()
        # taken from the budget: one share for each part in memory beyond the first (a part
        # is in memory while it is read and while its request runs)
        self._held = 0
        self.parts: list[Part] = []  # those up, in order

    async def read_next(self, reading: Callable[[], Awaitable[T]]) -> T:
        """`reading()` (the next part from the appliance), once there is room for it. A part
        that fails meanwhile stops the read and is raised: the appliance's bytes would be
        thrown away."""
        await self._room()
        read = asyncio.ensure_future(reading())
        try:
            while not read.done():
                self._raise_failed()
                await asyncio.wait([read, *self._running()], return_when=asyncio.FIRST_COMPLETED)
            self._raise_failed()
            return read.result()
        finally:
            read.cancel()  # a no-op once it is done

    def send(self, sending: Awaitable[Part]) -> None:
        task = asyncio.ensure_future(sending)
        task.add_done_callback(self._ended)
        self._sending.append(task)

    async def all_up(self) -> list[Part]:
        """Every part up, in order; the first failure raised."""
        while running := self._running():
            self._raise_failed()
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
        self._raise_failed()
        self._collect()
        return self.parts

    def cancel(self) -> None:
        """Every part still going up is cancelled (their shares come back as each ends);
        `stopped` waits for them. A sibling's failure is not news: the first was raised."""
        for task in self._sending:
            task.cancel()  # marks a failure as seen, on a task already done too

    async def stopped(self) -> None:
        if running := self._running():
            await asyncio.wait(running)

    def _running(self) -> list[asyncio.Task[Part]]:
        return [task for task in self._sending if not task.done()]

    async def _room(self) -> None:
        while True:
            self._raise_failed()
            self._collect()
            running = self._running()
            if not running:
                return  # the upload's own part: no share
            if len(running) < self._limit and self._budget.take(self._part_bytes):
                self._held += self._part_bytes
                return
            await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)

    def _ended(self, task: asyncio.Task[Part]) -> None:
        if self._held:  # one part fewer in memory
            self._held -= self._part_bytes
            self._budget.give_back(self._part_bytes)

    def _raise_failed(self) -> None:
        for task in self._sending:
            if task.done() and not task.cancelled() and (failure := task.exception()):
                raise failure

    def _collect(self) -> None:
        """The parts up at the front, in order, moved to `parts`."""
        while self._sending and self._sending[0].done():
            self.parts.append(self._sending.popleft().result())
