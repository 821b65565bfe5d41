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
committed before the second read began.

The opposite race would refuse an upload on room that is there: A commits, B reads what
is stored (A's bytes in it) and then checks against the reservations, A's still among
them: A counted twice. So an upload marks its reservation as landing just before its
commit (`landing`), and a check that fails only through landing reservations says so
(`Refused.settling`): the upload waits for a release (a commit lasts at most the store's
operation time) and checks again from the start, instead of answering 413.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Literal, Protocol

from ...telemetry.metrics import Metrics
from .counts import SHARED_FAILURES

log = logging.getLogger(__name__)

RELEASES_KEPT_SECONDS = 86400  # far beyond any upload: a count never restarts under one
# how often an upload refused through landing uploads looks for their release (a commit
# takes milliseconds to seconds; a look is one short transaction or script)
SETTLE_POLL_SECONDS = 0.01
SETTLE_POLL_MAX_SECONDS = 0.1
# checks made again after uploads landed, at most: each follows a release, of any upload of
# the system or the organization
SETTLE_ROUNDS = 16


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
class Releases:
    """The release counts of a system and its organization at one moment, in one book."""

    system: int
    organization: int
    shared: bool = True


@dataclass(frozen=True)
class Seen:
    """Reservations and releases as they were before storage was read."""

    system_bytes: int
    organization_bytes: int
    system_releases: int
    organization_releases: int
    shared: bool = True  # False: seen in this process's memory
    # of the bytes reserved, those of uploads whose commit has been sent
    system_landing: int = 0
    organization_landing: int = 0

    @property
    def releases(self) -> Releases:
        return Releases(self.system_releases, self.organization_releases, self.shared)


@dataclass(frozen=True)
class Reserved:
    """Held. The other uploads' reservations at that moment; `*_stale`: released since
    `Seen`, so storage must be read again and checked against these."""

    others_system: int
    others_organization: int
    system_stale: bool
    organization_stale: bool
    releases: Releases | None = None  # at the reservation


@dataclass(frozen=True)
class Refused:
    full: Literal["system", "organization"]
    settling: bool = False  # it would fit but for uploads landing: check again after they end
    releases: Releases | None = None  # at the check


class Book(Protocol):
    async def look(self, system_key: str, organization_id: str) -> Seen: ...

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused: ...

    async def landing(self, claim: Claim) -> None: ...

    async def release(self, claim: Claim) -> None: ...


def refusal(
    claim: Claim,
    room: Room,
    system: int,
    organization: int,
    landing_system: int = 0,
    landing_organization: int = 0,
) -> Refused | None:
    """The check both books make atomically: `system` and `organization` are the bytes
    the other uploads hold reserved, `landing_*` the part of them landing."""
    full = _full(claim, room, system, organization)
    if full is None:
        return None
    settling = _full(claim, room, system - landing_system, organization - landing_organization)
    return Refused(full, settling=settling is None)


def _full(
    claim: Claim, room: Room, system: int, organization: int
) -> Literal["system", "organization"] | None:
    if room.system_cap and room.kept + system > room.system_cap:
        return "system"
    if room.organization_cap and room.used + organization + claim.size > room.organization_cap:
        return "organization"
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
        self.waits = 0

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "counter",
            "gateway_upload_room_waits",
            "Uploads that waited for another upload's commit to end before checking their"
            " room again, rather than count its bytes twice",
            lambda: self.waits,
        )
        metrics.add_reading(
            "counter",
            "gateway_upload_reservation_failures",
            "Reservation steps the shared place (Redis or the host's file) did not answer:"
            " the quotas then held per process",
            lambda: self.failures,
        )

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
            shared = True
        except SHARED_FAILURES as exc:
            self._failed(exc)
            answer = await self._here.reserve(claim, room, seen)
            shared = False
            if isinstance(answer, Reserved):
                self._held_here.add(claim.id)
        if shared != seen.shared and isinstance(answer, Reserved):
            # seen in one book, held in the other: its release counts say nothing here
            answer = dataclasses.replace(answer, system_stale=True, organization_stale=True)
        if answer.releases is not None and not shared:
            answer = dataclasses.replace(
                answer, releases=dataclasses.replace(answer.releases, shared=False)
            )
        return answer

    async def landing(self, claim: Claim) -> None:
        """Mark the claim's reservation as landing: its commit is about to be sent. Best
        effort: unmarked, a check that counts it twice refuses (the safe way) as before."""
        book = self._here if claim.id in self._held_here else self._shared
        try:
            await book.landing(claim)
        except SHARED_FAILURES as exc:
            self.failures += 1
            log.warning("reservation of %s not marked landing: %s", claim.id, type(exc).__name__)

    def waiting_room(self, system_key: str, organization_id: str, seconds: float) -> WaitingRoom:
        """An upload's wait for the uploads landing that made its checks fail: at most
        `seconds` over all of its checks, and `SETTLE_ROUNDS` checks again."""
        return WaitingRoom(self, system_key, organization_id, seconds)

    async def released_since(
        self, system_key: str, organization_id: str, then: Releases, until: float
    ) -> bool:
        """Wait until the loop's time `until` for a release of the system or the
        organization after `then`, in the book that gave `then`; True once there was one
        (or that book stopped answering: the check is made again, in the other one)."""
        self.waits += 1
        loop = asyncio.get_running_loop()
        pause = SETTLE_POLL_SECONDS
        while True:
            try:
                book = self._shared if then.shared else self._here
                now = await book.look(system_key, organization_id)
            except SHARED_FAILURES as exc:
                self._failed(exc)
                return True
            if (now.system_releases, now.organization_releases) != (
                then.system,
                then.organization,
            ):
                return True
            if loop.time() >= until:
                return False
            await asyncio.sleep(min(pause, max(0.0, until - loop.time())))
            pause = min(pause * 2, SETTLE_POLL_MAX_SECONDS)

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


class WaitingRoom:
    """One upload's waits for uploads landing (see the module's note)."""

    def __init__(
        self, reservations: Reservations, system_key: str, organization_id: str, seconds: float
    ) -> None:
        self._reservations = reservations
        self._system_key = system_key
        self._organization_id = organization_id
        self._until = asyncio.get_running_loop().time() + seconds
        self.rounds = 0

    async def look(self) -> Seen:
        return await self._reservations.look(self._system_key, self._organization_id)

    async def worth_another_check(self, settling: bool, then: Releases | None) -> bool:
        """Whether the check that failed may pass when made again: it failed only through
        uploads landing (`settling`), and one of the system's or the organization's uploads
        released since `then` (waited for)."""
        if not settling or then is None or self.rounds >= SETTLE_ROUNDS:
            return False
        self.rounds += 1
        return await self._reservations.released_since(
            self._system_key, self._organization_id, then, self._until
        )
