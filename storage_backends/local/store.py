"""The `local` backend: `{root}/{organization_id}/{system_key}/{backup_id}` on a POSIX disk.

No symlink under the root is followed (see `fs`), and deletes are durable: the
parent directory is fsynced before `delete` returns, in group commits — concurrent
deletes in one folder share one fsync that started after all their unlinks.

Where the syscalls run (`io`):

- `process` (default): in the local I/O process (`io_process`), one per gateway process.
  The event loop never waits on the disk, a hung disk costs bounded 502s and a fresh
  process instead of a stalled gateway, and the disk work runs on another core.
- `inline`: the metadata syscalls (open, stat, unlink: tens of µs on a healthy local
  disk) on the event loop and the fsync rounds in a thread pool. No extra process, at
  the price of the loop waiting on the disk and of GIL hand-offs with the pool threads.

A listing goes to the I/O process (one request, the answer back as a line of JSON) or,
inline, to two lister threads: never onto the loop, where scanning a folder of a million
backups (seconds) would stall every other request. It scans names and sizes and describes
only the backups it returns. Describing and opening a backup run in
a small thread pool of the gateway process in both modes: an open file descriptor must end
up in this process to be streamed from. Each is bounded by
`storage.operation_timeout_seconds`; a read stuck on a hung disk costs its thread, and
the request a 502.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

from ..base import (
    BackupEntry,
    BackupInfo,
    BackupListing,
    BackupLocation,
    BackupReader,
    BackupStore,
    FolderLock,
    FolderSummary,
    FolderUnchanged,
    KnownMarks,
    NewBackup,
    OpenedBackup,
    StagedBackup,
    StoreCapabilities,
    SystemFolder,
    UploadBody,
)
from ..errors import (
    BackupNotFound,
    BackupProtected,
    DeleteOutcomeUnknown,
    StorageError,
    StorageUnavailable,
    UploadIncomplete,
)
from . import scan, state
from .fs import (
    UNMARKED,
    RootUnmarked,
    SymlinkRefused,
    check_root_sync,
    decode_entries,
    decode_listing,
    decode_newest,
    describe_backup,
    fsync_folder,
    list_entries,
    list_folder,
    list_newest,
    mark_root,
    open_backup,
    open_root,
    unlink_backup,
)
from .ingest import LocalUpload, open_upload_folder, organization_usage, sweep_leftovers
from .io_client import LocalIoProcess
from .reader import LocalReader

log = logging.getLogger(__name__)
T = TypeVar("T")
# an upload is written in chunks this large, one in a writer thread while the next arrives
UPLOAD_CHUNK_BYTES = 1024 * 1024
# the longest one batch of the fleet's walk of the root may take
SCAN_BATCH_SECONDS = 60.0
# A full walk of a root of more system folders than this is shared among processes, one a
# core up to this many: below it, starting them costs more than they save.
SHARED_WALK_FOLDERS = 2000
MAX_SCAN_PROCESSES = 4
# how long a killed scan process may take to end before the walk goes on without it
SCAN_PROCESS_END_SECONDS = 10.0
# a shared walk's process (scan_process.py, imported by nobody: run as a module's main)
SCAN_PROCESS = f"{__package__}.scan_process"
# where storage_backends was imported from: a scan process imports the same code
_CODE = str(Path(__file__).resolve().parents[2])


@dataclass(frozen=True)
class LocalConfig:
    root: Path = Path("data/backups")
    # fsync the parent directory before answering; turning it off trades durability for speed
    fsync: bool = True
    io: Literal["process", "inline"] = "process"
    # how many folders of one group commit are fsynced at once
    threads: int = 8


def fsync_round(folders: list[list[int]]) -> list[str | None]:
    """fsync each folder once (every fd in a group names the same folder), close every fd."""
    return [fsync_folder(fds) for fds in folders]


@dataclass
class _FolderWaiters:
    future: asyncio.Future[None]
    fds: list[int] = field(default_factory=list)


class GroupCommit:
    """Group commit of folder fsyncs, in rounds.

    A delete that unlinked in folder F waits for an fsync of F that started after its
    unlink — never one already running: deletes that arrive while a round runs join the
    next round. Under load one round covers many deletes in many folders; alone, a delete
    costs one fsync, as it would without this. A round's folders are fsynced from several
    pool threads at once, so the journal commits them together instead of one flush after
    another (measured: 6 ms rounds of 17 folders in one thread, about 1.4x the throughput
    spread over the pool).
    """

    def __init__(self, executor: ThreadPoolExecutor, ways: int) -> None:
        self._executor = executor
        self._ways = max(1, ways)
        self._next: dict[tuple[str, str], _FolderWaiters] = {}
        self._busy = False  # a round is running

    def sync(self, folder: tuple[str, str], fd: int) -> asyncio.Future[None]:
        """Take ownership of `fd` (closed after the fsync); the future resolves when durable."""
        waiters = self._next.get(folder)
        if waiters is None:
            future = asyncio.get_running_loop().create_future()
            waiters = self._next[folder] = _FolderWaiters(future)
        waiters.fds.append(fd)
        if not self._busy:
            self._launch()
        # shield: a caller that times out must not cancel the fsync others wait for
        return asyncio.shield(waiters.future)

    def _launch(self) -> None:
        self._busy = True
        loop = asyncio.get_running_loop()
        folders = list(self._next.values())
        self._next = {}
        ways = min(len(folders), self._ways)
        shares = [folders[i::ways] for i in range(ways)]
        jobs = [
            loop.run_in_executor(self._executor, fsync_round, [w.fds for w in share])
            for share in shares
        ]
        for share, job in zip(shares, jobs, strict=True):
            job.add_done_callback(functools.partial(self._resolve, share))
        asyncio.gather(*jobs, return_exceptions=True).add_done_callback(self._round_done)

    def _resolve(self, share: list[_FolderWaiters], done: asyncio.Future[list[str | None]]) -> None:
        error = done.exception()
        outcomes: list[str | None] = (
            done.result() if error is None else [f"fsync failed: {error!r}"] * len(share)
        )
        for waiters, outcome in zip(share, outcomes, strict=True):
            if outcome is None:
                waiters.future.set_result(None)
            else:
                # Unlinked, but not known to be durable: not a 200.
                waiters.future.set_exception(StorageUnavailable(outcome))

    def _round_done(self, _: asyncio.Future[Any]) -> None:
        self._busy = False
        if self._next:
            self._launch()


class LocalBackupStore(BackupStore):
    name = "local"
    # the gateway streams a descriptor for download links and for restores
    capabilities = StoreCapabilities(
        stores_uploads=True,
        presigns=False,
        serves_bytes=True,
        streams_restore=True,
        keeps_state=True,
        locks_folders=True,
        lists_folders=True,
        upload_descriptors=2,  # the system's folder and the hidden file
        deletes_unprotected_at_once=True,
    )

    def __init__(self, config: LocalConfig, operation_timeout: float) -> None:
        self._config = config
        self._root = config.root
        self._timeout = operation_timeout
        self._executor: ThreadPoolExecutor | None = None
        self._commits: GroupCommit | None = None
        self._io: LocalIoProcess | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._listers: ThreadPoolExecutor | None = None  # inline listings
        self._writers: ThreadPoolExecutor | None = None
        self._odd_names_told = 0  # how many odd names the last warning counted

    @property
    def io_process_pid(self) -> int | None:
        """The pid of this store's I/O process while one runs (io: process), else None."""
        return self._io.pid if self._io is not None else None

    async def start(self) -> None:
        self._readers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="local-read")
        self._writers = ThreadPoolExecutor(
            max_workers=self._config.threads, thread_name_prefix="local-write"
        )
        # In the background: start-up never waits on the disk (a missing root is /readyz's).
        self._writers.submit(self._sweep).add_done_callback(_log_failure)
        if self._config.io == "process":
            self._io = LocalIoProcess(
                self._root, self._config.fsync, self._config.threads, self._timeout
            )
            self._io.start()
            return
        self._executor = ThreadPoolExecutor(
            max_workers=self._config.threads, thread_name_prefix="local-store"
        )
        # their own threads: a big folder's scan never holds up a download's open
        self._listers = ThreadPoolExecutor(max_workers=2, thread_name_prefix="local-list")
        self._commits = GroupCommit(self._executor, self._config.threads)

    async def close(self) -> None:
        if self._writers is not None:
            # wait=True: a write or fsync already in a thread finishes, never cut in half
            self._writers.shutdown(wait=True, cancel_futures=True)
            self._writers = None
        if self._readers is not None:
            self._readers.shutdown(wait=False, cancel_futures=True)
            self._readers = None
        if self._listers is not None:
            self._listers.shutdown(wait=False, cancel_futures=True)
            self._listers = None
        if self._io is not None:
            await self._io.close()
            self._io = None
        if self._executor is not None:
            # wait=True: an fsync already in a thread finishes, never cut in half
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _bounded(self, work: Awaitable[T]) -> T:
        try:
            async with asyncio.timeout(self._timeout):
                return await work
        except TimeoutError:
            raise StorageUnavailable("local storage operation timed out") from None

    async def delete(self, location: BackupLocation) -> None:
        await self._deleting(location, unless_protected=False)

    async def delete_unprotected_now(self, location: BackupLocation) -> int | None:
        return await self._deleting(location, unless_protected=True)

    async def _deleting(self, location: BackupLocation, unless_protected: bool) -> int | None:
        """The backup's size (-1 when not looked at), None when the lock was busy."""
        try:
            if self._io is not None:
                return await self._delete_in_process(location, unless_protected)
            return await self._delete_inline(location, unless_protected)
        except SymlinkRefused:
            log.warning("refused a symlink under the backup root at %s", location.relative_key)
            raise
        except DeleteOutcomeUnknown as exc:
            log.warning(
                "local storage delete of %s not known durable: %s", location.relative_key, exc
            )
            raise
        except StorageUnavailable as exc:
            # The cause (permission denied, read-only filesystem, missing root) goes to the
            # log; the answer says only "failed to delete backup".
            log.warning("local storage delete of %s failed: %s", location.relative_key, exc)
            raise

    async def _delete_in_process(
        self, location: BackupLocation, unless_protected: bool
    ) -> int | None:
        assert self._io is not None
        message = b"%s %s %s %s" % (
            b"P" if unless_protected else b"D",
            location.organization_id.encode(),
            location.system_key.encode(),
            location.backup_id.encode(),
        )
        unlinked = False
        size = -1

        def applied(detail: bytes) -> None:
            nonlocal unlinked, size
            unlinked = True
            if detail.isdigit():
                size = int(detail)

        try:
            # it enforces the operation timeout until the unlink, the request's deadline after
            code, detail = await self._io.request(message, applied)
        except StorageUnavailable as exc:
            if unlinked:
                raise DeleteOutcomeUnknown(
                    f"{location.relative_key}: unlinked, then {exc}"
                ) from None
            raise
        if code == b"ok":
            return size
        if code == b"missing":
            raise BackupNotFound(location.relative_key)
        if code == b"symlink":
            raise SymlinkRefused(location.relative_key)
        if code == b"protected":
            raise BackupProtected(location.relative_key)
        if code == b"busy":
            return None
        why = f"{location.relative_key}: {detail.decode('ascii', 'replace')}"
        if unlinked:
            raise DeleteOutcomeUnknown(f"unlinked, then {why}")
        raise StorageUnavailable(why)

    async def _delete_inline(self, location: BackupLocation, unless_protected: bool) -> int | None:
        assert self._commits is not None, "store not started"
        root_fd = open_root(self._root)
        try:
            if not unless_protected:
                fd, size = unlink_backup(root_fd, location), -1
            else:
                try:
                    fd, size = state.unlink_unless_protected(root_fd, location)
                except state.FolderBusy:
                    return None
        finally:
            os.close(root_fd)
        if not self._config.fsync:
            os.close(fd)
            return size
        folder = (location.organization_id, location.system_key)
        try:
            # unlinked: from here only the request's deadline bounds the wait for durability
            await self._commits.sync(folder, fd)
        except StorageUnavailable as exc:
            raise DeleteOutcomeUnknown(f"{location.relative_key}: unlinked, then {exc}") from None
        return size

    async def _read(self, call: Any, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        try:
            return await self._bounded(loop.run_in_executor(self._readers, call, *args))
        except SymlinkRefused as exc:
            log.warning("refused a symlink under the backup root at %s", exc)
            raise
        except StorageUnavailable as exc:
            log.warning("local storage read failed: %s", exc)
            raise
        except StorageError:
            raise
        except Exception:
            # whatever a file or sidecar holds is a 502 for that request, never a 500
            log.exception("local storage read failed unexpectedly")
            raise StorageUnavailable("local storage read failed") from None

    async def _listing(
        self,
        folder: SystemFolder,
        op: bytes,
        inline: Callable[[Path, SystemFolder, float], T],
        decode: Callable[[bytes], T],
        suffix: bytes = b"",
    ) -> T:
        """One listing: in the I/O process (`op`), or inline in a lister thread — never on
        the loop, where a big folder's scan would stall every other request. Either gives
        up at the operation timeout; a symlinked folder raises SymlinkRefused."""
        place = f"{folder.organization_id}/{folder.system_key}/"
        try:
            if self._io is None:
                deadline = time.monotonic() + self._timeout
                loop = asyncio.get_running_loop()
                job = loop.run_in_executor(self._listers, inline, self._root, folder, deadline)
                return await self._bounded(job)
            message = b"%s %s %s%s" % (
                op,
                folder.organization_id.encode(),
                folder.system_key.encode(),
                suffix,
            )
            code, detail = await self._io.request(message)
            if code == b"ok":
                return decode(detail)
            if code == b"symlink":
                raise SymlinkRefused(place)
            raise StorageUnavailable(detail.decode("ascii", "replace"))
        except SymlinkRefused:
            log.warning("refused a symlink under the backup root at %s; listed empty", place)
            raise
        except StorageUnavailable as exc:
            log.warning("local storage read failed: %s", exc)
            raise

    async def list_backups(self, folder: SystemFolder) -> list[BackupInfo]:
        try:
            return await self._listing(folder, b"L", list_folder, decode_listing)
        except SymlinkRefused:
            return []

    async def list_newest(self, folder: SystemFolder, limit: int) -> BackupListing:
        try:
            return await self._listing(
                folder,
                b"N",
                functools.partial(_newest_inline, limit),
                decode_newest,
                suffix=b" %d" % limit,
            )
        except SymlinkRefused:
            return BackupListing([], 0, 0)

    async def list_entries(self, folder: SystemFolder) -> list[BackupEntry]:
        try:
            return await self._listing(folder, b"E", list_entries, decode_entries)
        except SymlinkRefused:
            return []

    async def summarize_folder(self, folder: SystemFolder) -> FolderSummary | None:
        # Summed where the folder is listed (the I/O process or a lister thread): the loop
        # decodes one row, not one a backup (a folder of a million would stall it for a
        # second), at the cost of one sidecar read.
        listing = await self.list_newest(folder, 1)
        if not listing.backups:
            # empty, or its newest went while it was described: listed again, in full
            return None if listing.count == 0 else await super().summarize_folder(folder)
        newest = listing.backups[0].id
        return FolderSummary(folder, listing.count, listing.total_bytes, newest)

    async def describe(self, location: BackupLocation) -> BackupInfo:
        info: BackupInfo = await self._read(describe_backup, self._root, location)
        return info

    async def open_reader(self, location: BackupLocation) -> BackupReader:
        # opened in this process in both io modes: the descriptor is sent from here
        opened: OpenedBackup = await self._read(open_backup, self._root, location)
        assert self._readers is not None, "store not started"
        return LocalReader(opened, self._readers, self._timeout)

    def _sweep(self) -> None:
        if not mark_root(self._root, only_if_in_use=True):
            log.warning("backup root %s: %s", self._root, UNMARKED)
            return
        removed = sweep_leftovers(self._root)
        if removed:
            log.info("removed %d files left by interrupted uploads", removed)

    async def _write_step(self, call: Any, *args: Any) -> Any:
        """One blocking upload step in a writer thread, bounded by the operation timeout.

        The thread's own future is awaited (wrapped): a step already running finishes
        before anything closes the fds it uses."""
        assert self._writers is not None, "store not started"
        job = self._writers.submit(call, *args)
        try:
            return await self._bounded(asyncio.wrap_future(job))
        except BaseException:
            job.cancel()
            raise

    async def stage_upload(self, backup: NewBackup, body: UploadBody) -> StagedBackup:
        folder = SystemFolder(backup.location.organization_id, backup.location.system_key)
        try:
            key_fd = await self._write_step(open_upload_folder, self._root, folder)
        except SymlinkRefused as exc:
            raise StorageUnavailable(f"refused a symlink under the backup root at {exc}") from None
        upload = LocalUpload(key_fd, backup.location)
        writing: Any = None  # the write in a thread while the next chunk arrives
        try:
            await self._write_step(upload.create)
            remaining = backup.size
            chunk = bytearray()
            while remaining:
                data = await body.read(min(remaining, UPLOAD_CHUNK_BYTES))
                remaining -= len(data)
                chunk += data
                if len(chunk) >= UPLOAD_CHUNK_BYTES or not remaining:
                    if writing is not None:
                        await writing
                    writing = asyncio.ensure_future(self._write_step(upload.write, chunk))
                    chunk = bytearray()
            if writing is not None:
                await writing
                writing = None
            sha256 = await self._write_step(upload.finish)
        except BaseException as exc:
            self._discard_later(upload, writing)
            if isinstance(exc, UploadIncomplete):  # the client's doing: not a storage problem
                log.info("local upload of %s stopped: %s", backup.location.relative_key, exc)
            elif isinstance(exc, StorageError):
                log.warning("local upload of %s failed: %s", backup.location.relative_key, exc)
            raise
        return _StagedLocal(self, upload, backup.info(sha256))

    def _discard_later(self, upload: LocalUpload, writing: Any) -> None:
        """Remove the hidden files once no step of theirs runs any more (never awaited:
        the caller may be cancelled)."""
        assert self._writers is not None
        if writing is not None and not writing.done():
            writing.cancel()  # the thread's own step still finishes first (see _write_step)
        self._writers.submit(upload.discard)

    async def set_protected(self, location: BackupLocation, protected: bool) -> None:
        try:
            await self._write_step(state.set_protected, self._root, location, protected)
        except SymlinkRefused as exc:
            log.warning("refused a symlink under the backup root at %s", exc)
            raise BackupNotFound(location.relative_key) from None

    async def set_verified(self, location: BackupLocation, integrity: str, at: datetime) -> None:
        try:
            await self._write_step(state.set_verified, self._root, location, integrity, at)
        except SymlinkRefused as exc:
            log.warning("refused a symlink under the backup root at %s", exc)
            raise BackupNotFound(location.relative_key) from None

    def lock_folder(self, folder: SystemFolder, purpose: str = "retention") -> FolderLock:
        return state.LocalFolderLock(self._root, folder, self._write_step, purpose)

    async def system_folders(self) -> list[SystemFolder]:
        return list(await self._read(state.system_folders, self._root))

    async def folder_summaries(
        self, known: KnownMarks | None = None
    ) -> AsyncIterator[Sequence[FolderSummary | FolderUnchanged]]:
        # A thread of its own, in both io modes: a walk of the whole root takes seconds,
        # and must hold up neither a download's open nor a listing. Each batch is bounded
        # (a folder of a million backups is one batch: seconds on a loaded host, so not the
        # operation timeout); a walk stuck on a hung disk ends the scan, which the fleet's
        # scan age shows. A full walk of a large root is shared among processes, one a
        # core (scan_process).
        walker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-scan")
        loop = asyncio.get_running_loop()
        processes = min(_cores(), MAX_SCAN_PROCESSES)
        try:
            if known is None and processes > 1:
                large = await loop.run_in_executor(
                    walker, scan.more_folders_than, self._root, SHARED_WALK_FOLDERS
                )
                children = await self._start_scan_processes(processes) if large else []
                if children:
                    try:
                        async for shared in self._walk_in_processes(children):
                            yield shared
                        return
                    except StorageUnavailable as exc:
                        # the thread's walk gives every folder again (a summary given twice
                        # replaces the first); a root that failed fails it too
                        log.warning("shared walk failed (%s): the root walked in one thread", exc)
            odd: list[str] = []
            batches = scan.walk(self._root, known, odd)
            try:
                while True:
                    try:
                        async with asyncio.timeout(max(self._timeout, SCAN_BATCH_SECONDS)):
                            batch = await loop.run_in_executor(walker, next, batches, None)
                    except TimeoutError:
                        raise StorageUnavailable("a batch of the root's scan timed out") from None
                    if batch is None:
                        self._tell_odd_names(odd)
                        return
                    yield batch
            finally:
                walker.submit(batches.close)  # in its thread: never while a batch is read
        finally:
            walker.shutdown(wait=False)

    async def _start_scan_processes(self, processes: int) -> list[asyncio.subprocess.Process]:
        """The processes of a shared walk (scan_process), each told its share; none when they
        cannot be started (the walk then runs in a thread, as a small root's does)."""
        children: list[asyncio.subprocess.Process] = []
        python_path = os.pathsep.join(filter(None, (_CODE, os.environ.get("PYTHONPATH"))))
        try:
            for share in range(processes):
                children.append(
                    await asyncio.create_subprocess_exec(
                        sys.executable,
                        "-P",  # not the working directory's modules first: the gateway's
                        "-m",
                        SCAN_PROCESS,
                        str(self._root),
                        str(share),
                        str(processes),
                        stdin=asyncio.subprocess.DEVNULL,
                        stdout=asyncio.subprocess.PIPE,
                        stderr=asyncio.subprocess.DEVNULL,  # its failures come as frames
                        env={**os.environ, "PYTHONPATH": python_path},
                    )
                )
        except OSError as exc:
            log.warning("scan processes not started, the walk runs in one thread: %s", exc)
            await _ended(children)
            return []
        except BaseException:  # cancelled while starting them: none is left running
            for child in children:
                child.kill()
            raise
        log.info("a full walk of the root shared among %d processes", processes)
        return children

    async def _walk_in_processes(
        self, children: list[asyncio.subprocess.Process]
    ) -> AsyncIterator[Sequence[FolderSummary | FolderUnchanged]]:
        """A full walk shared among `children`, each reading its share of the folders;
        batches as they come (not in name order)."""
        frames: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(maxsize=2 * len(children))
        readers = [asyncio.create_task(_frames_of(c, frames)) for c in children]
        try:
            done = 0
            odd: list[str] | None = None
            while done < len(children):
                try:
                    async with asyncio.timeout(max(self._timeout, SCAN_BATCH_SECONDS)):
                        kind, value = await frames.get()
                except TimeoutError:
                    raise StorageUnavailable("a batch of the root's scan timed out") from None
                if kind == "batch":
                    yield [scan.unpacked(row) for row in value]
                elif kind == "done":
                    done += 1
                    odd = value if odd is None else odd  # each process met the same names
                else:
                    raise StorageUnavailable(value)
            self._tell_odd_names(odd or [])
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            await _ended(children)

    def _tell_odd_names(self, odd: list[str]) -> None:
        """A warning when the walk met names no organization or system can have, each time
        their number changes (not every scan): an operator's copy, a restore by hand."""
        if len(odd) == self._odd_names_told:
            return
        self._odd_names_told = len(odd)
        if odd:
            shown = ", ".join(ascii(name) for name in sorted(odd)[:5])
            log.warning(
                "%d names under the root where folders belong are no organization or system "
                "a directory can give: never scanned, their bytes count nowhere (%s%s)",
                len(odd),
                shown,
                ", ..." if len(odd) > 5 else "",
            )

    async def remove_empty_folder(self, folder: SystemFolder) -> bool:
        removed: bool = await self._write_step(scan.remove_empty_folder, self._root, folder)
        return removed

    async def organization_usage(self, organization_id: str) -> int:
        total: int = await self._read(organization_usage, self._root, organization_id)
        return total

    async def check_ready(self) -> None:
        if self._io is not None:
            code, detail = await self._io.request(b"R")
            if code != b"ok":
                why = detail.decode("ascii", "replace")
                # the I/O process sends text only: its unmarked root is told by its words
                raise RootUnmarked(why) if why == UNMARKED else StorageUnavailable(why)
            return
        loop = asyncio.get_running_loop()
        await self._bounded(loop.run_in_executor(self._executor, check_root_sync, self._root))


class _StagedLocal(StagedBackup):
    def __init__(self, store: LocalBackupStore, upload: LocalUpload, info: BackupInfo) -> None:
        super().__init__(info)
        self._store = store
        self._upload = upload

    async def commit(self) -> None:
        sidecar = json.dumps(
            {
                "filename": self.info.filename,
                "sha256": self.info.sha256,
                "mimetype": self.info.mimetype,
                "uploaded_at": self.info.uploaded_at.isoformat(timespec="milliseconds"),
            },
            separators=(",", ":"),
        ).encode()
        try:
            await self._store._write_step(self._upload.commit, sidecar)
        except StorageError as exc:
            log.warning("local commit of %s failed: %s", self._upload.location.relative_key, exc)
            raise
        finally:
            await self._store._write_step(self._upload.discard)  # only hidden files remain

    async def discard(self) -> None:
        try:
            await self._store._write_step(self._upload.discard)
        except (StorageError, RuntimeError) as exc:
            log.warning("upload leftovers not removed now: %s", exc)


def _newest_inline(limit: int, root: Path, folder: SystemFolder, deadline: float) -> BackupListing:
    return list_newest(root, folder, limit, deadline)


def _log_failure(job: Any) -> None:
    if not job.cancelled() and job.exception() is not None:
        log.warning("upload leftover sweep failed: %r", job.exception())


async def _ended(children: list[asyncio.subprocess.Process]) -> None:
    """Each child killed (if still running) and reaped, its pipe read to its end first: on
    Python 3.11 `wait()` also waits for the pipe, which a full frame queue left paused and
    nothing would read again. Bounded: a child stuck in the kernel (a hung disk) is left
    to the child watcher, with a warning."""
    for child in children:
        if child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.kill()
    try:
        async with asyncio.timeout(SCAN_PROCESS_END_SECONDS):
            for child in children:
                await child.communicate()
    except TimeoutError:
        log.warning(
            "a scan process did not end within %.0f s of its kill", SCAN_PROCESS_END_SECONDS
        )


async def _frames_of(
    child: asyncio.subprocess.Process, frames: asyncio.Queue[tuple[str, Any]]
) -> None:
    """A scan process's frames (scan_process) into `frames`, until its last; a process that
    ends before its last frame is a failed walk."""
    stream = child.stdout
    assert stream is not None
    while True:
        try:
            (size,) = scan.FRAME.unpack(await stream.readexactly(scan.FRAME.size))
            kind, value = json.loads(await stream.readexactly(size))
        except asyncio.IncompleteReadError:
            status = await child.wait()
            await frames.put(("failed", f"a scan process ended before its walk (status {status})"))
            return
        await frames.put((kind, value))
        if kind != "batch":
            return


def _cores() -> int:
    """The cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
