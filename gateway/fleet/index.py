"""The fleet's index of storage (DESIGN.md §13): per system folder the count, the bytes and
the newest backup's time.

Built by a scan at start-up and every `fleet.scan_seconds` (the store's `folder_summaries`:
batches as storage is read, the event loop free between them), swapped in whole when the
scan ends; between scans every upload, delete and prune of this process updates it. Each
process keeps its own index from the same storage: another process's changes show at the
next scan.

A scan reads a folder at some moment of its run, so a change made meanwhile may or may not
be in what it read. Every change during a scan is applied to the index in service and
re-read from storage once the scan is in: the folder's listing (names and sizes only)
settles it, and a change during that listing reads it again. A delete takes a ticket
(`ticket`) before it asks the store: told with the change, it says whether a scan was
swapped in since the delete began, which may or may not have seen it; only then is the
folder read again. Any other delete is applied as it is: deletes in a steady stream cost
no listing each. (A delete that began before a re-read of its folder and is told after
it may be counted twice; a re-read does not make it re-read again, which under a steady
stream of deletes would re-read the folder for ever. Its mark is dropped, so the next
scan reads the folder and settles it.)

A scan after the first reads only the folders that changed: the index keeps each folder's
change mark (local: its inode and ctime) as the scan read it, and the store answers
"unchanged" for a folder still carrying it. A change of this process drops the folder's
mark. Every folder is still read in full once a day, whatever its mark says: each scan
after the first reads in full one slice of the folders (by a hash of the name), the slices
taking turns (and any slice a failed scan left unread for a day with them), so no scan
after the first costs a whole read.

Per folder the index holds its numbers and mark packed in one bytes object under one
"org/key" string: 212 bytes a system at 100,000 folders, the RSS growth bench/fleet_scan.py
measures (a tuple of the same numbers took 317).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NewType

from aiohttp import web

from storage_backends import (
    BackupStore,
    FolderMark,
    FolderUnchanged,
    StorageError,
    SystemFolder,
)
from storage_backends.ids import backup_unix_ms

from ..config import FleetConfig
from ..directory import Directory, DirectoryUnavailable
from ..telemetry.metrics import Metrics

log = logging.getLogger(__name__)

STATES = ("fresh", "stale", "never")
# how long a folder's re-read waits, so that a stream of changes to it (a newest-first
# cleanup deletes the newest each time) costs one listing, not one a change; meanwhile
# count and bytes are the change's, only the newest backup's time may lag
_REREAD_DELAY_SECONDS = 5.0
# every folder read in full at least this often: a change its mark cannot show (a file
# rewritten in place, a clock stepped back) lasts a day at most
_FULL_READ_SECONDS = 86400.0

# backups, bytes, the newest backup's Unix milliseconds, and the folder's mark (inode and
# ctime) when a scan read it (inode 0, which no file system gives, for none: once this
# process changed the folder, the next scan reads it), packed: one 73-byte object a folder,
# where a tuple and its numbers took about twice that
_Entry = bytes
_PACKED = struct.Struct("<QQqQq")
_NEWEST = struct.Struct("<16xq")  # the newest backup's milliseconds alone
_BYTES = struct.Struct("<8xQ")  # the bytes alone


def _entry(count: int, total: int, newest_ms: int, mark: FolderMark | None = None) -> _Entry:
    if mark is None:
        return _PACKED.pack(count, total, newest_ms, 0, 0)
    return _PACKED.pack(count, total, newest_ms, mark.inode, mark.changed_ns)


def _fields(entry: _Entry) -> tuple[int, int, int, FolderMark | None]:
    count, total, newest_ms, inode, changed_ns = _PACKED.unpack(entry)
    return count, total, newest_ms, FolderMark(inode, changed_ns) if inode else None


@dataclass(frozen=True, slots=True)
class FolderStats:
    backups: int
    bytes: int
    newest_ms: int

    @property
    def newest_at(self) -> datetime:
        return datetime.fromtimestamp(self.newest_ms / 1000, UTC)


def folder_key(organization_id: str, system_key: str) -> str:
    return f"{organization_id}/{system_key}"


# the scans swapped in when a delete began: a delete told after another was swapped in
# may be in what it read
ChangeTicket = NewType("ChangeTicket", int)


class FleetIndex:
    def __init__(
        self,
        config: FleetConfig,
        store: BackupStore,
        directory: Directory,
        clock: Callable[[], float] = time.time,
        full_read_seconds: float = _FULL_READ_SECONDS,
        reread_delay_seconds: float = _REREAD_DELAY_SECONDS,
    ) -> None:
        self._store = store
        self._reread_delay = reread_delay_seconds
        # the scans a day's full read is spread over (inf: never after the first scan)
        self._full_read_seconds = full_read_seconds
        self._slices = (
            0
            if math.isinf(full_read_seconds)
            else max(1, round(full_read_seconds / config.scan_seconds))
        )
        self._next_slice = 0  # the slice the next scan reads in full, in turn
        self._slice_read_at: list[float] = []  # monotonic: when each was last read in full
        self._slices_read: frozenset[int] = frozenset()  # those this scan reads in full
        self._directory = directory
        self._scan_seconds = config.scan_seconds
        self._stale_ms = int(config.stale_after_hours * 3600 * 1000)
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._scanned_at: float | None = None  # when the last scan that ended had started
        self._touched: set[str] | None = None  # folders changed while a scan runs
        self._swapped = 0  # scans swapped in: a ticket from before one is stale
        self._refreshing: dict[str, asyncio.Task[None]] = {}
        self._dirty: set[str] = set()  # changed while their re-read was in flight
        self._scanner: asyncio.Task[None] | None = None
        # from the directory at the end of each scan: what the metrics count over
        self._live_folders: tuple[str, ...] = ()
        self._orphaned_bytes = 0
        self.scans: Counter[str] = Counter()
        self.folder_rereads = 0  # a folder's listing read into the index between scans
        self._started = clock()

    # ------------------------------------------------------------------ reading

    @property
    def ready(self) -> bool:
        return self._scanned_at is not None

    @property
    def scanned_at(self) -> datetime | None:
        if self._scanned_at is None:
            return None
        return datetime.fromtimestamp(self._scanned_at, UTC)

    def stats(self, organization_id: str, system_key: str) -> FolderStats | None:
        entry = self._entries.get(folder_key(organization_id, system_key))
        return None if entry is None else FolderStats(*_fields(entry)[:3])

    def state(self, stats: FolderStats | None, now_ms: int) -> str:
        """fresh: the newest backup is younger than `fleet.stale_after_hours`."""
        if stats is None:
            return "never"
        return "fresh" if now_ms - stats.newest_ms < self._stale_ms else "stale"

    def now_ms(self) -> int:
        return int(self._clock() * 1000)

    def folders(self) -> Iterator[tuple[SystemFolder, FolderStats]]:
        """Every folder holding a backup, as the index knows it now."""
        for key, entry in list(self._entries.items()):
            organization_id, _, system_key = key.partition("/")
            yield SystemFolder(organization_id, system_key), FolderStats(*_fields(entry)[:3])

    # ------------------------------------------------------------------ this process's changes

    def stored(self, folder: SystemFolder, backup_id: str, size: int) -> None:
        """A backup was committed (an upload's 201, or one that landed after its 504)."""
        key = folder_key(folder.organization_id, folder.system_key)
        ms = backup_unix_ms(backup_id)
        entry = self._entries.get(key)
        if entry is None:
            self._entries[key] = _entry(1, size, ms)
            self._changed(key, settle=False)
            return
        count, total, newest, _ = _fields(entry)
        if ms > newest:
            self._entries[key] = _entry(count + 1, total + size, ms)
            self._changed(key, settle=False)
        else:
            # not newer than what the index holds: a scan or a re-read may have counted it
            # already; storage says
            self._entries[key] = _entry(count, total, newest)
            self._changed(key, settle=True)

    def ticket(self) -> ChangeTicket:
        """Taken before a delete asks the store, and told with it (`removed`)."""
        return ChangeTicket(self._swapped)

    def removed(
        self, folder: SystemFolder, backup_id: str, size: int | None, ticket: ChangeTicket
    ) -> None:
        """A backup was deleted or pruned; `size` None when the caller did not know it."""
        key = folder_key(folder.organization_id, folder.system_key)
        entry = self._entries.get(key)
        if entry is None:
            return self._changed(key, settle=True)
        count, total, newest, _ = _fields(entry)
        if count <= 1:
            del self._entries[key]  # whether anything is left, storage says
            return self._changed(key, settle=True)
        self._entries[key] = _entry(count - 1, max(total - (size or 0), 0), newest)
        # a scan since the delete began (it may have seen the backup gone already), the
        # newest went (which one is newest now, storage says), or its size is unknown
        scanned_since = ticket != self._swapped
        newest_went = backup_unix_ms(backup_id) >= newest
        self._changed(key, settle=scanned_since or newest_went or size is None)

    def _changed(self, key: str, settle: bool) -> None:
        if self._touched is not None:
            self._touched.add(key)  # re-read once the scan is in
            return
        if settle or key in self._refreshing:
            self._reread_soon(key)

    def _reread_soon(self, key: str) -> None:
        if key in self._refreshing:
            self._dirty.add(key)
            return
        task = asyncio.ensure_future(self._reread(key))
        self._refreshing[key] = task
        task.add_done_callback(lambda _: self._refreshing.pop(key, None))

    async def _reread(self, key: str) -> None:
        organization_id, _, system_key = key.partition("/")
        folder = SystemFolder(organization_id, system_key)
        # once more if it changed while listed; a folder changing all the time is not
        # listed again and again (each listing would meet changes too): its mark is
        # dropped, and the next scan settles it
        for _ in range(2):
            await asyncio.sleep(self._reread_delay)  # changes meanwhile: this one listing
            self._dirty.discard(key)
            try:
                # summed by the store where it lists (local: the I/O process), not here
                summary = await self._store.summarize_folder(folder)
            except StorageError as exc:
                log.warning("fleet index: %s not re-read: %s", key, exc)
                return
            if key in self._dirty:
                continue
            if summary is not None:
                self._entries[key] = _entry(
                    summary.count, summary.total_bytes, backup_unix_ms(summary.newest_id)
                )
            else:
                self._entries.pop(key, None)
            self.folder_rereads += 1
            if self._touched is not None:
                self._touched.add(key)
            return

    # ------------------------------------------------------------------ scanning

    async def scan(self) -> bool:
        """One scan of storage, then the directory read for what the metrics count; False
        when storage could not be read (the index in service stays)."""
        if not self._store.capabilities.lists_folders:
            self._scanned_at = self._clock()  # nothing to scan: every system is `never`
            return True
        started, began = self._clock(), time.monotonic()
        full = not self.ready or self._slices == 1
        self._slices_read = frozenset() if full else self._slices_due(began)
        self._touched = set()
        scanned: dict[str, _Entry] = {}
        unchanged = 0
        entries = self._entries  # in service until the scan is in; rereads update it in place
        try:
            async for batch in self._store.folder_summaries(None if full else self._mark_of):
                for item in batch:
                    folder = item.folder
                    key = folder_key(folder.organization_id, folder.system_key)
                    if isinstance(item, FolderUnchanged):
                        entry = entries.get(key)
                        if entry is not None:  # else this process changed it: `touched`
                            scanned[key] = entry
                            unchanged += 1
                        continue
                    scanned[key] = _entry(
                        item.count, item.total_bytes, backup_unix_ms(item.newest_id), item.mark
                    )
        except StorageError as exc:
            self.scans["failed"] += 1
            log.warning("fleet scan failed, the index in service stays: %s", exc)
            return False
        finally:
            touched, self._touched = self._touched, None
        # what changed meanwhile: as the index in service has it, then read again
        for key in touched:
            entry = self._entries.get(key)
            if entry is None:
                scanned.pop(key, None)
            else:
                scanned[key] = entry
        self._entries = scanned
        self._scanned_at = started
        self._swapped += 1
        if full:
            self._slice_read_at = [began] * self._slices
        else:
            for piece in self._slices_read:
                self._slice_read_at[piece] = began
            self._next_slice = (self._next_slice + 1) % max(self._slices, 1)
        for key in touched:
            self._reread_soon(key)
        self.scans["done"] += 1
        log.info(
            "fleet scan done",
            extra={
                "fields": {
                    "folders": len(scanned),
                    "unchanged": unchanged,
                    "seconds": round(time.monotonic() - began, 3),
                }
            },
        )
        await self._read_directory()
        return True

    def _slices_due(self, now: float) -> frozenset[int]:
        """The slice whose turn it is, and any not read in full for `full_read_seconds`
        (scans that failed or ran late): each folder is read in full once a day even so."""
        if not self._slices:
            return frozenset()
        late = now - self._full_read_seconds
        overdue = (piece for piece, at in enumerate(self._slice_read_at) if at <= late)
        return frozenset([self._next_slice, *overdue])

    def _mark_of(self, organization_id: str, system_key: str) -> FolderMark | None:
        """The mark the index holds for a folder, None for a folder of a slice this scan
        reads in full: the store's walk asks, from its thread (a dict read, whole under
        the GIL; the dict is only replaced, at a scan's end)."""
        key = folder_key(organization_id, system_key)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._slices_read and zlib.crc32(key.encode()) % self._slices in self._slices_read:
            return None
        return _fields(entry)[3]

    async def _read_directory(self) -> None:
        """The registered systems' folders now: which are live (the metrics' reach, the
        Owner's) and how many bytes no system maps."""
        live: list[str] = []
        mapped: set[str] = set()
        try:
            async for batch in self._directory.registered_systems():
                for system in batch:
                    assert system.system_key is not None
                    key = folder_key(system.organization_id, system.system_key)
                    mapped.add(key)
                    if not system.deleted:
                        live.append(key)
        except DirectoryUnavailable as exc:
            log.warning("fleet: no answer from the directory, metrics keep the last: %s", exc)
            return
        self._live_folders = tuple(live)
        self._orphaned_bytes = sum(
            _BYTES.unpack_from(e)[0] for k, e in self._entries.items() if k not in mapped
        )

    async def _scan_forever(self) -> None:
        while True:
            try:
                await self.scan()
            except Exception:
                # whatever one scan meets, the next one runs
                self.scans["failed"] += 1
                log.exception("fleet scan failed unexpectedly")
            await asyncio.sleep(self._scan_seconds)

    def start(self) -> None:
        self._scanner = asyncio.ensure_future(self._scan_forever())

    async def close(self) -> None:
        tasks = [*self._refreshing.values(), *([self._scanner] if self._scanner else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # ------------------------------------------------------------------ metrics

    def states(self) -> dict[str, float]:
        """Every live registered system (the Owner's reach) by state."""
        counts = dict.fromkeys(STATES, 0.0)
        if not self.ready:
            return counts
        now, entries = self.now_ms(), self._entries
        for key in self._live_folders:
            entry = entries.get(key)
            if entry is None:
                counts["never"] += 1
            elif now - _NEWEST.unpack_from(entry)[0] < self._stale_ms:
                counts["fresh"] += 1
            else:
                counts["stale"] += 1
        return counts

    def scan_age(self) -> float:
        """Seconds since the last scan that ended began; since start-up before the first."""
        return self._clock() - (self._scanned_at or self._started)

    def export_metrics(self, metrics: Metrics) -> None:
        metrics.add_labeled_reading(
            "gauge",
            "gateway_fleet_systems",
            "Registered live systems by the age of their newest backup (fresh, stale, never)",
            "state",
            self.states,
        )
        metrics.add_reading(
            "gauge",
            "gateway_fleet_orphaned_bytes",
            "Bytes of backups in folders no registered system maps to, at the last scan",
            lambda: self._orphaned_bytes,
        )
        metrics.add_reading(
            "gauge",
            "gateway_fleet_scan_age_seconds",
            "Seconds since the last completed scan of storage began",
            self.scan_age,
        )
        metrics.add_labeled_reading(
            "counter",
            "gateway_fleet_scans",
            "Scans of storage by outcome: done, failed",
            "outcome",
            lambda: dict(self.scans),
        )
        metrics.add_reading(
            "counter",
            "gateway_fleet_folder_rereads",
            "Folders listed again between scans to settle a change the index could not apply",
            lambda: self.folder_rereads,
        )


FLEET = web.AppKey("fleet", FleetIndex)
