"""The parts of a multipart upload with a digest, each sent while the next is read.

A part's `x-amz-checksum-sha256` goes in its request's headers, so a part is read into
memory and hashed before it is sent; read and sent one after the other, the appliance's
connection stands still while each part goes up, and the store while each is read (a
1 GiB body went up at 0.7 of a raw client's speed, against the staging path that streams
through). Sent while the next is read, both move at once.

Memory is bounded twice: at most `limit` parts go up at once, and every part in memory
beyond the upload's first is taken from the process's held budget (`HeldBytes`): with the
budget spent by other uploads, the next part is read only once the oldest is up."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable
from typing import Any, Protocol

Part = dict[str, Any]  # as CompleteMultipartUpload takes it: number, ETag, checksum


class Budget(Protocol):
    def take(self, size: int) -> bool: ...

    def give_back(self, size: int) -> None: ...


class PartsInFlight:
    """Parts sent in the background, at most `limit` at once, in their order."""

    def __init__(self, budget: Budget, part_bytes: int, limit: int) -> None:
        self._budget = budget
        self._part_bytes = part_bytes  # what a part in memory is counted as, the last too
        self._limit = limit
        self._sending: deque[asyncio.Task[Part]] = deque()
        self._held = 0  # taken from the budget: the parts in memory beyond the first
        self.parts: list[Part] = []  # those up, in order

    async def room_for_next(self) -> None:
        """Returns once the next part may be read: no part in memory, or a part's room in
        the budget and fewer than `limit` going up."""
        while self._sending:
            if len(self._sending) < self._limit and self._budget.take(self._part_bytes):
                self._held += self._part_bytes
                return
            await self._oldest_up()

    def send(self, sending: Awaitable[Part]) -> None:
        self._sending.append(asyncio.ensure_future(sending))

    async def all_up(self) -> list[Part]:
        while self._sending:
            await self._oldest_up()
        return self.parts

    async def cancel(self) -> None:
        """Every part still going up is cancelled and waited for; the budget given back."""
        tasks = list(self._sending)
        self._sending.clear()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        for task in tasks:  # a sibling's failure is not news: the first one was raised
            if not task.cancelled():
                task.exception()
        self._budget.give_back(self._held)
        self._held = 0

    async def _oldest_up(self) -> None:
        task = self._sending[0]
        try:
            part = await asyncio.shield(task)  # cancelling the reader cancels it in `cancel`
        finally:
            if task.done():
                self._sending.popleft()
                if self._held:  # one part fewer in memory
                    self._held -= self._part_bytes
                    self._budget.give_back(self._part_bytes)
        self.parts.append(part)
