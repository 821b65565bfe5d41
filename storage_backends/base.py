"""The one storage interface the HTTP handlers use, what a backend can do, and the values
that name and describe a backup."""

from __future__ import annotations

import abc
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import ClassVar, Protocol


@dataclass(frozen=True, slots=True)
class BackupLocation:
    """Where a backup lives: `{organization_id}/{system_key}/{backup_id}`.

    Every part has already been validated as a safe path component (directory
    load for the first two, backup-id grammar for the last).
    """

    organization_id: str
    system_key: str
    backup_id: str

    @property
    def relative_key(self) -> str:
        return f"{self.organization_id}/{self.system_key}/{self.backup_id}"


@dataclass(frozen=True, slots=True)
class SystemFolder:
    """Where one system's backups live: `{organization_id}/{system_key}/`."""

    organization_id: str
    system_key: str

    def location(self, backup_id: str) -> BackupLocation:
        return BackupLocation(self.organization_id, self.system_key, backup_id)


@dataclass(frozen=True, slots=True)
class FolderMark:
    """What moves with every change in a folder (local: its inode and ctime): while a folder
    still carries the mark a scan read, what that scan counted in it still holds."""

    inode: int
    changed_ns: int


@dataclass(frozen=True, slots=True)
class FolderSummary:
    """What a scan of the store knows of one system folder (DESIGN.md §13): how many
    backups, their bytes (never sidecars or marks), and the largest id (UUIDv7: the newest)."""

    folder: SystemFolder
    count: int
    total_bytes: int
    newest_id: str
    # the folder's change mark as the scan read it, which a later scan compares to reuse
    # this summary; None when the store has none, or when the mark is too recent to prove
    # that nothing changed after the scan read the folder
    mark: FolderMark | None = None


@dataclass(frozen=True, slots=True)
class FolderUnchanged:
    """A scan's word that a folder still carries the mark its caller gave: the summary the
    caller holds from an earlier scan still describes it."""

    folder: SystemFolder


# the mark an earlier scan gave a folder (organization id, system key), None for none
KnownMarks = Callable[[str, str], FolderMark | None]


DEFAULT_MIMETYPE = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class BackupInfo:
    """What a listing says of one backup. Missing metadata reads as filename = id,
    sha256 = "" and mimetype application/octet-stream."""

    id: str
    size: int
    filename: str
    sha256: str
    mimetype: str
    uploaded_at: datetime  # aware, UTC
    # retention's mark (DESIGN.md §11): never pruned, never deleted while it holds
    protected: bool = False
    # the verifier's last word (DESIGN.md §12): ok | corrupt | unverified, and when
    integrity: str = "unverified"
    verified_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class BackupEntry:
    """What a listing knows of a backup without reading its metadata: its id and size."""

    id: str
    size: int


@dataclass(frozen=True, slots=True)
class BackupListing:
    """The newest backups of a system, described, and the count and bytes of all of them."""

    backups: list[BackupInfo]  # the largest ids (UUIDv7: the newest), in no particular order
    count: int
    total_bytes: int

    @property
    def truncated(self) -> bool:
        return self.count > len(self.backups)


@dataclass(slots=True)
class OpenedBackup:
    """An open backup to stream: the caller owns `fd` and must close it."""

    fd: int
    info: BackupInfo

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# the most a reader hands over at once: a restore's memory is a few of these, whatever its size
READ_CHUNK_BYTES = 1 << 20


class BackupReader(abc.ABC):
    """One backup opened for reading (a restore, a download link): what it is, then its
    bytes. `close` exactly once, whatever happened."""

    def __init__(self, info: BackupInfo) -> None:
        self.info = info

    @property
    def fd(self) -> int | None:
        """A descriptor of the bytes the caller may send with sendfile (local disk), owned
        by the reader; None when the bytes come only through `chunks`."""
        return None

    @abc.abstractmethod
    def chunks(self, offset: int, count: int) -> AsyncGenerator[bytes, None]:
        """Exactly `count` bytes from `offset`, in pieces of at most READ_CHUNK_BYTES, read
        as the caller asks for them (memory stays flat whatever the size). The first piece
        means the store answered: StorageUnavailable before it is a failure to read;
        StorageUnavailable after it means the read broke off, and the bytes so far are all
        there is. BackupNotFound when the backup went away since it was opened."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Let go of the descriptor or connection; never raises."""


@dataclass(frozen=True, slots=True)
class NewBackup:
    """An upload about to be stored: where, how long, and what the sidecar or metadata says."""

    location: BackupLocation
    size: int  # the announced Content-Length: exactly this many bytes are read
    filename: str
    mimetype: str
    uploader_ip: str
    uploaded_at: datetime  # aware, UTC
    # the hex sha256 the appliance said the body has (Content-Digest), known before the
    # body: a store may have its server check it (S3's x-amz-checksum-sha256)
    expected_sha256: str | None = None

    def info(self, sha256: str) -> BackupInfo:
        return BackupInfo(
            id=self.location.backup_id,
            size=self.size,
            filename=self.filename,
            sha256=sha256,
            mimetype=self.mimetype,
            uploaded_at=self.uploaded_at,
        )


class UploadBody(Protocol):
    """The request body as the store reads it."""

    async def read(self, limit: int) -> bytes:
        """1 to `limit` bytes. Raises UploadIncomplete when the body ends (or the client
        goes away) before the announced size; never answers b"" while bytes are due."""
        ...


class FolderLock(abc.ABC):
    """One exclusive holder, or any number of shared ones, across processes; acquire, then
    release exactly once."""

    @abc.abstractmethod
    async def acquire(self, wait_seconds: float, shared: bool = False) -> bool:
        """Take the lock, waiting at most `wait_seconds`; False when it stayed busy.
        Shared holders exclude only an exclusive one. StorageUnavailable when the lock
        cannot be made (the folder cannot be opened)."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Let it go; never raises."""


class StagedBackup(abc.ABC):
    """An upload written in full but not visible yet: `commit` makes it a backup at once,
    `discard` removes every trace of it. Exactly one of them must be awaited."""

    def __init__(self, info: BackupInfo) -> None:
        self.info = info  # sha256 included

    @abc.abstractmethod
    async def commit(self) -> None:
        """Make the backup visible, durably; StorageUnavailable / InsufficientStorage."""

    @abc.abstractmethod
    async def discard(self) -> None:
        """Remove what staging left; never raises (failures are logged)."""


@dataclass(frozen=True, slots=True)
class StoreCapabilities:
    """What a backend can do, declared once on its class. The gateway (and the tests) branch
    on these, never on a backend's name; an operation a backend does not declare is never
    called on it."""

    # stage_upload/commit keep an upload (False: the backend stores nothing, a 503)
    stores_uploads: bool
    # presigned_url hands out a URL the client fetches the bytes from, not from the gateway
    presigns: bool
    # the gateway serves download links itself, from open_reader (local disk)
    serves_bytes: bool
    # the gateway can stream a backup's bytes to an appliance restoring it (DESIGN.md §10)
    streams_restore: bool
    # set_protected keeps a backup's protection with it (DESIGN.md §11)
    keeps_state: bool = False
    # lock_folder gives a lock that every process on this host sharing the store sees
    locks_folders: bool = False
    # system_folders lists every system folder that holds anything (sweeps, the fleet)
    lists_folders: bool = False
    # descriptors an upload holds in this process from its staging to its commit or
    # discard (the gateway counts them beside its connections')
    upload_descriptors: int = 0
    # delete_unprotected_now: the protection check and the delete in one step (only with
    # keeps_state), under the folder lock where there is one
    deletes_unprotected_at_once: bool = False


class BackupStore(abc.ABC):
    """An async backup store. Implementations raise only `storage_backends.errors` types."""

    name: ClassVar[str]  # the registry's name, for logs and metrics: never to branch on
    capabilities: ClassVar[StoreCapabilities]

    async def start(self) -> None:
        """Acquire process-wide resources (clients, thread pools). Must not contact storage."""

    async def close(self) -> None:
        """Release what `start` acquired."""

    @abc.abstractmethod
    async def delete(self, location: BackupLocation) -> None:
        """Delete the backup for good.

        Raises BackupNotFound when it does not exist, StorageUnavailable when the
        store fails, StorageNotConfigured for the `none` backend.
        """

    @abc.abstractmethod
    async def list_backups(self, folder: SystemFolder) -> list[BackupInfo]:
        """Every backup of a system, in no particular order; [] when it has none.

        Only real backups: names that are backup ids (never sidecars, temporary files or
        other keys). A backup that disappears while listing is left out; any other failure
        raises StorageUnavailable — never a partial list."""

    async def list_newest(self, folder: SystemFolder, limit: int) -> BackupListing:
        """The `limit` backups with the largest ids (UUIDv7: the newest) described, and the
        count and bytes of every backup of the system. Only those returned are described
        (a sidecar read, a HEAD): a folder of a million backups costs a scan of its names
        and sizes, in memory that grows with `limit`, not with the folder. Errors as
        `list_backups`.

        This default describes everything; a backend overrides it to describe less."""
        every = await self.list_backups(folder)
        every.sort(key=lambda b: b.id, reverse=True)
        return BackupListing(every[:limit], len(every), sum(b.size for b in every))

    async def list_entries(self, folder: SystemFolder) -> list[BackupEntry]:
        """Every backup's id and size, no metadata read (what retention chooses from;
        `describe` then tells about the chosen ones). Errors as `list_backups`."""
        return [BackupEntry(b.id, b.size) for b in await self.list_backups(folder)]

    async def summarize_folder(self, folder: SystemFolder) -> FolderSummary | None:
        """The system's count, bytes and newest id as a scan gives them (no mark); None when
        it holds no backup. Errors as `list_backups`.

        This default sums `list_entries` (one listing, no metadata read); a backend that
        sums where it lists overrides it."""
        entries = await self.list_entries(folder)
        if not entries:
            return None
        newest = max(e.id for e in entries)
        return FolderSummary(folder, len(entries), sum(e.size for e in entries), newest)

    @abc.abstractmethod
    async def describe(self, location: BackupLocation) -> BackupInfo:
        """One backup's listing entry; BackupNotFound when absent."""

    async def presigned_url(
        self, location: BackupLocation, download_name: str, ttl_seconds: int
    ) -> str:
        """A URL the client fetches the bytes from, saved as `download_name`, valid at most
        `ttl_seconds`. Only when `capabilities.presigns`."""
        raise NotImplementedError(f"{self.name} does not presign")

    @abc.abstractmethod
    async def open_reader(self, location: BackupLocation) -> BackupReader:
        """Open a backup to read its bytes (DESIGN.md §10: a restore streams them through
        the gateway). BackupNotFound when absent, StorageNotConfigured for `none`."""

    async def set_protected(self, location: BackupLocation, protected: bool) -> None:
        """Mark the backup protected or not, durably; BackupNotFound when absent. Only when
        `capabilities.keeps_state`. The caller holds the system's lock."""
        raise NotImplementedError(f"{self.name} keeps no state")

    async def system_folders(self) -> list[SystemFolder]:
        """Every `{organization_id}/{system_key}/` folder in the store, whoever it belongs
        to. Only when `capabilities.lists_folders`."""
        raise NotImplementedError(f"{self.name} cannot list its folders")

    def folder_summaries(
        self, known: KnownMarks | None = None
    ) -> AsyncIterator[Sequence[FolderSummary | FolderUnchanged]]:
        """Every system folder holding at least one backup, summarized, in batches as the
        store is read (the fleet's scan): memory holds a batch, never the whole listing.
        Only when `capabilities.lists_folders`. StorageUnavailable ends it.

        `known` gives the mark an earlier scan's summary carried for a folder: a store that
        can tell (local) answers `FolderUnchanged` for a folder still carrying it, without
        reading the folder. This default ignores it: it lists the folders, then each
        folder's names and sizes; a backend overrides it with one walk (local) or one
        listing of the prefix (S3)."""
        return self._summaries_folder_by_folder()

    async def _summaries_folder_by_folder(
        self,
    ) -> AsyncIterator[Sequence[FolderSummary | FolderUnchanged]]:
        for folder in await self.system_folders():
            entries = await self.list_entries(folder)
            if entries:
                newest = max(e.id for e in entries)
                yield [FolderSummary(folder, len(entries), sum(e.size for e in entries), newest)]

    async def delete_unprotected_now(self, location: BackupLocation) -> int | None:
        """Delete the backup unless it is protected, in one step under the folder's shared
        lock (`lock_folder`'s, purpose retention) taken without waiting: the deleted
        backup's size; None, with nothing done, when an exclusive holder has the lock (the
        caller then takes the lock and looks first). BackupProtected when protected;
        otherwise as `delete`. Only when `capabilities.deletes_unprotected_at_once`."""
        raise NotImplementedError(f"{self.name} does not delete at once")

    async def remove_empty_folder(self, folder: SystemFolder) -> bool:
        """Remove the system's folder (and its organization's) once no backup is left in it,
        durably; a folder that still holds anything else stays (False). Stores without
        folders (S3) have nothing to remove (True: gone with its last backup)."""
        return True

    async def set_verified(self, location: BackupLocation, integrity: str, at: datetime) -> None:
        """Record a verification (`ok` or `corrupt`) and when, durably; BackupNotFound
        when absent. Only when `capabilities.keeps_state`."""
        raise NotImplementedError(f"{self.name} keeps no state")

    def lock_folder(self, folder: SystemFolder, purpose: str = "retention") -> FolderLock:
        """A lock on one system's folder, one per `purpose` (retention, verify), that other
        processes sharing this store on this host see. Only when
        `capabilities.locks_folders`."""
        raise NotImplementedError(f"{self.name} has no folder locks")

    @abc.abstractmethod
    async def stage_upload(self, backup: NewBackup, body: UploadBody) -> StagedBackup:
        """Stream exactly `backup.size` bytes from `body` into a hidden place, sha256 on the
        way, durable once this returns. Nothing is listed until `commit`.

        UploadIncomplete (from `body`): nothing is left. InsufficientStorage: the store is
        full, nothing is left. StorageUnavailable: any other failure, nothing is left."""

    @abc.abstractmethod
    async def organization_usage(self, organization_id: str) -> int:
        """Bytes held by every backup of every system of the organization (quota checks)."""

    @abc.abstractmethod
    async def check_ready(self) -> None:
        """A cheap probe of the store for /readyz; raises StorageUnavailable when not ready."""
