"""Folders no system maps to (DESIGN.md §13), and their purge.

A folder maps to a system only through a registered system's organization and key, live or
soft-deleted (a soft-deleted system's backups stay for its restore). Everything else
holding a backup is an orphan: a destroyed organization's folders, a key nobody holds, the
old folder of a system moved to another organization.

The purge deletes only orphans whose newest backup is older than the cut-off, and asks the
directory itself (never a cache, never an old version of the file) right before each
folder and each backup whether a system maps it now: a system registered meanwhile is
never touched. Each backup goes as a delete does (data and sidecar, durably); every step is
audited; the emptied folder is removed last.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from storage_backends import BackupNotFound, BackupStore, StorageError, SystemFolder
from storage_backends.ids import backup_unix_ms

from ..directory import Directory
from ..telemetry.logs import audit_log, log_info
from .index import FleetIndex, FolderStats, folder_key

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Orphan:
    folder: SystemFolder
    stats: FolderStats


@dataclass(slots=True)
class PurgeOutcome:
    """What one purge did: folders purged, their backups and bytes, and the folders it left
    (mapped meanwhile, newer than the cut-off, or a storage failure)."""

    folders: int = 0
    backups: int = 0
    bytes: int = 0
    left: list[tuple[SystemFolder, str]] = field(default_factory=list)


async def find_orphans(index: FleetIndex, directory: Directory) -> list[Orphan]:
    """Every folder of the index that no registered system maps to, by organization and key.
    DirectoryUnavailable when the directory cannot say."""
    mapped: set[str] = set()
    async for batch in directory.registered_systems():
        for system in batch:
            assert system.system_key is not None
            mapped.add(folder_key(system.organization_id, system.system_key))
    found = [
        Orphan(folder, stats)
        for folder, stats in index.folders()
        if folder_key(folder.organization_id, folder.system_key) not in mapped
    ]
    return sorted(found, key=lambda o: (o.folder.organization_id, o.folder.system_key))


async def purge_orphans(
    store: BackupStore,
    directory: Directory,
    orphans: list[Orphan],
    older_than_ms: int,
    told: Callable[[str], None] = lambda line: None,
) -> PurgeOutcome:
    """Delete every backup of each orphan whose newest backup is older than `older_than_ms`
    (Unix milliseconds), then its emptied folder. `told` hears one line per folder."""
    outcome = PurgeOutcome()
    for orphan in orphans:
        folder = orphan.folder
        if orphan.stats.newest_ms >= older_than_ms:
            continue  # not old enough: not a candidate at all
        why = await _purge_folder(store, directory, folder, older_than_ms, outcome)
        place = folder_key(folder.organization_id, folder.system_key)
        if why is None:
            told(f"purged {place}")
        else:
            outcome.left.append((folder, why))
            told(f"left {place}: {why}")
    return outcome


async def _purge_folder(
    store: BackupStore,
    directory: Directory,
    folder: SystemFolder,
    older_than_ms: int,
    outcome: PurgeOutcome,
) -> str | None:
    """Purge one folder; None when it is gone, else why it was left (partly) in place."""
    if await directory.maps_folder_now(folder.organization_id, folder.system_key):
        _audit(folder, None, None, "left: a system maps it now")
        return "a system maps it now"
    try:
        entries = await store.list_entries(folder)
    except StorageError as exc:
        _audit(folder, None, None, "purge failed")
        return f"not listed: {exc}"
    if any(backup_unix_ms(e.id) >= older_than_ms for e in entries):
        _audit(folder, None, None, "left: a backup newer than the cut-off")
        return "a backup newer than the cut-off"
    for entry in sorted(entries, key=lambda e: e.id):
        # asked again before every backup: a purge of a big folder takes a while
        if await directory.maps_folder_now(folder.organization_id, folder.system_key):
            _audit(folder, None, None, "left: a system maps it now")
            return "a system maps it now"
        try:
            await store.delete(folder.location(entry.id))
        except BackupNotFound:
            continue  # gone meanwhile
        except StorageError as exc:
            _audit(folder, entry.id, entry.size, "purge failed")
            return f"a delete failed: {exc}"
        outcome.backups += 1
        outcome.bytes += entry.size
        _audit(folder, entry.id, entry.size, "backup purged")
    try:
        removed = await store.remove_empty_folder(folder)
    except StorageError as exc:
        log.warning("orphan folder %s emptied, not removed: %s", folder.system_key, exc)
        return f"its backups purged, the folder not removed: {exc}"
    if not removed:
        _audit(folder, None, None, "left: other files keep the folder")
        return "its backups purged, other files keep the folder"
    outcome.folders += 1
    return None


def _audit(folder: SystemFolder, backup_id: str | None, size: int | None, outcome: str) -> None:
    log_info(
        audit_log,
        "orphan purge",
        {
            "organization_id": folder.organization_id,
            "system_key": folder.system_key,
            "backup_id": backup_id,
            "size": size,
            "outcome": outcome,
        },
    )
