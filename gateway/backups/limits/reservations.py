"""Bytes reserved by the uploads in flight, per system and per organization, shared by
every process (DESIGN.md §9, §11): the quotas hold under concurrency.

An upload announces its size. Before its body is read it must fit, with what is stored
and with every other upload in flight, under `max_bytes_per_system` (the bytes the keep
rules would keep with it) and `max_bytes_per_organization`. Where the reservations live:
the platform's Redis when `redis.url` is set, in keys of our own (`backup_gateway:
reserved:…`; the platform's `backup:org_usage:<org>` keeps its meaning, dropped after a
change), else the host's file that the workers share; while the shared place cannot
answer, this process's memory.

Check and reserve are one atomic step (a Lua script; one SQLite transaction): two uploads
never both pass on the same room. A reservation is released when its upload ends, however
it ends, and expires at the upload's deadline should its process die holding it.

The race left is between one upload's commit and its release, against another reading
what is stored. Upload A commits (its bytes become visible to `organization_usage` and
the listing), then releases. Upload B reads what is stored just before A's commit, and
reserves just after A's release: counted by neither, A's bytes would let B pass on room
A took. So every release (and every expiry) bumps a release count per system and per
organization, and B looks at those counts *before* reading what is stored (`look`). At
its reservation the counts are compared: unchanged, every upload whose bytes B's read
may have missed still held its reservation then, and was counted by it. Changed, B reads
what is stored again, after its reservation, and checks against the others' reservations
as they were when it reserved (`Reserved`): whatever released before that moment had
committed before the second read began. A committed upload counted both ways at once
(bytes and reservation) only makes a check stricter, for as long as its release takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, Protocol

from .counts import SHARED_FAILURES

log = logging.getLogger(__name__)

RELEASES_KEPT_SECONDS = 86400  # far beyond any upload: a count never restarts under one


@dataclass(frozen=True)
class Claim:
    """An upload's request for room."""

    id: str  # the upload's own, unique
    system_key: str
    organization_id: str
    size: int
    seconds: float  # until the upload's deadline: the reservation's expiry


@dataclass(frozen=True)
class Room:
    """The caps (0: none) and what storage held when read."""

    system_cap: int
    kept: int  # the bytes the keep rules keep of what is stored plus the new backup
    organization_cap: int
    used: int  # the organization's stored bytes


@dataclass(frozen=True)
class Seen:
    """Reservations and releases as they were before storage was read."""

    system_bytes: int
    organization_bytes: int
    system_releases: int
    organization_releases: int
    shared: bool = True  # False: seen in this process's memory


@dataclass(frozen=True)
class Reserved:
    """Held. The other uploads' reservations at that moment; `*_stale`: released since
    `Seen`, so storage must be read again and checked against these."""

    others_system: int
    others_organization: int
    system_stale: bool
    organization_stale: bool


@dataclass(frozen=True)
class Refused:
    full: Literal["system", "organization"]


class Book(Protocol):
    async def look(self, system_key: str, organization_id: str) -> Seen: ...

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused: ...

    async def release(self, claim: Claim) -> None: ...


def refusal(claim: Claim, room: Room, system: int, organization: int) -> Refused | None:
    """The check both books make atomically: `system` and `organization` are the bytes
    the other uploads hold reserved."""
    if room.system_cap and room.kept + system > room.system_cap:
        return Refused("system")
    if room.organization_cap and room.used + organization + claim.size > room.organization_cap:
        return Refused("organization")
    return None


class Reservations:
    """The shared book, or this process's while the shared one cannot answer (logged and
    counted in `failures`: the quotas then hold per process only)."""

    def __init__(self, shared: Book, here: Book) -> None:
        self._shared = shared
        self._here = here
        self._held_here: set[str] = set()
        self._releasing: set[asyncio.Task[None]] = set()
        self.failures = 0

    async def hold(
        self, claim: Claim, room: Room, seen: Seen, until: contextlib.AsyncExitStack
    ) -> Reserved | Refused:
        """Check and reserve; a reservation made is released when `until` closes, however
        the upload ends. A caller cancelled meanwhile (the client gone, the deadline) does
        not leave one behind: what was reserved is released once the step completes."""
        reserving = asyncio.ensure_future(self.reserve(claim, room, seen))
        try:
            answer = await asyncio.shield(reserving)
        except asyncio.CancelledError:

            def reserved(done: asyncio.Future[Reserved | Refused]) -> None:
                held = not done.cancelled() and done.exception() is None
                if held and isinstance(done.result(), Reserved):
                    self._release_soon(claim)

            reserving.add_done_callback(reserved)
            raise
        if isinstance(answer, Reserved):
            until.push_async_callback(self._release_whatever_happens, claim)
        return answer

    async def _release_whatever_happens(self, claim: Claim) -> None:
        # shielded: an upload cancelled while it releases still releases
        await asyncio.shield(self._release_soon(claim))

    def _release_soon(self, claim: Claim) -> asyncio.Task[None]:
        task = asyncio.ensure_future(self.release(claim))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)
        return task

    async def look(self, system_key: str, organization_id: str) -> Seen:
        try:
            return await self._shared.look(system_key, organization_id)
        except SHARED_FAILURES as exc:
            self._failed(exc)
        seen = await self._here.look(system_key, organization_id)
        return dataclasses.replace(seen, shared=False)

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused:
        try:
            answer = await self._shared.reserve(claim, room, seen)
            moved = not seen.shared
        except SHARED_FAILURES as exc:
            self._failed(exc)
            answer = await self._here.reserve(claim, room, seen)
            moved = seen.shared
            if isinstance(answer, Reserved):
                self._held_here.add(claim.id)
        if moved and isinstance(answer, Reserved):
            # seen in one book, held in the other: its release counts say nothing here
            answer = dataclasses.replace(answer, system_stale=True, organization_stale=True)
        return answer

    async def release(self, claim: Claim) -> None:
        if claim.id in self._held_here:
            self._held_here.discard(claim.id)
            await self._here.release(claim)
            return
        try:
            await self._shared.release(claim)
        except SHARED_FAILURES as exc:
            # it expires at the upload's deadline instead
            log.warning("reservation of %s not released: %s", claim.id, type(exc).__name__)

    def _failed(self, exc: BaseException) -> None:
        self.failures += 1
        log.warning("upload reservations in this process only: %s", type(exc).__name__)
