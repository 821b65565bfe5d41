"""The fleet's walk of a local root (DESIGN.md §13): every `{org}/{key}` folder summarized
— its backups' count, bytes and largest id — and the removal of a folder a purge emptied.

One pass of directory descriptors, never a path and never a symlink: the root's folders,
each organization's, then each system folder's names, one fstatat per backup (its size,
and that it is a regular file). No sidecar is read. The walk is a generator of batches:
the caller holds one batch at a time, never the listing of the whole root.

Where its time goes (bench/fleet_scan.py, issue #31): the kernel's reading of the folders
and the one fstatat a backup, which `find -type f` never makes (the folder's entry types
are enough for it) and which costs as much again as all of find's reading; then Python's
few steps a name. So the walk takes no step it can leave out: a system folder's names
go through the listing's own pass (`fs.stored_backups`: sidecars dropped by their
suffix before any regex), no stat of a folder of its own (opening it with O_DIRECTORY |
O_NOFOLLOW refuses anything else), no object kept per backup. That is still twice find's
time on one core, so a first walk of a large root is shared among processes by a hash of
the folders' names (`share_of`; scan_process), each sending its summaries `packed`.

A rescan reads only what changed: every summary carries its folder's inode and ctime as
the walk read them (one fstat of the open folder, before its names), and a folder that
still carries the mark its caller holds is answered `FolderUnchanged` after one fstatat,
its names unread. A folder's ctime moves with every name added, removed or renamed in it
(a backup, a sidecar, an upload's temporary file), and with anything done to the folder
itself; unlike its mtime it cannot be set back (`touch -d`, `rsync -t`), on file systems
that keep a change time of their own (ext4, XFS, btrfs, ZFS; not vfat or exFAT, which
rebuild it from other times). The inode tells a folder put in another's place, even one
whose times were copied (`cp -a`, `rsync -a`) or that moved with its organization's
folder. What a mark cannot show is a backup rewritten in place, which the store never
does: a fleet index reads every folder in full once a day (gateway/fleet/index.py) for
whatever did.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct
import time
import zlib
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import Any

from ..base import FolderMark, FolderSummary, FolderUnchanged, KnownMarks, SystemFolder
from ..errors import StorageUnavailable
from .fs import open_root, stored_backups

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LOCK_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# a batch ends after this many folders or this many names read, whichever comes first:
# each hand-over to the event loop stays short whatever the folders hold
BATCH_FOLDERS = 512
BATCH_NAMES = 65536  # backups
# the store's own hidden files a purge may remove with the last backup (folder locks)
_LOCK_FILE = re.compile(r"\.[a-z]+\.lock", re.ASCII)
# the names the directory gives organizations and system keys: never hidden, no separators
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
# a folder's ctime this close to the walk's clock cannot prove that nothing changed after
# the walk read the folder: the kernel stamps times from a coarse clock (a tick of up to
# 10 ms here, whole seconds on some file systems), so a change in the tick of the read
# would keep the mark (git's rule for "racily clean" index entries). Such a summary
# carries no mark, and the next scan reads the folder again. Over a network file system
# the server stamps the times: its clock must not run more than this behind the gateway's.
RACY_SECONDS = 2.0
_RACY_NS = int(RACY_SECONDS * 1e9)


def walk(
    root: Path,
    known: KnownMarks | None = None,
    odd: list[str] | None = None,
    share: int = 0,
    shares: int = 1,
) -> Generator[Sequence[FolderSummary | FolderUnchanged], None, None]:
    """Batches of summaries of every system folder holding a backup, in name order; a
    folder still carrying the mark `known` gives it is `FolderUnchanged`, unread. `odd`
    gathers the names met where folders belong that no organization or system can have
    (hidden names aside): never scanned, so their bytes count nowhere. With `shares`
    above 1, only the folders of one share (by a hash of their names) are read: one
    process's part of a walk in several (scan_process)."""
    odd = [] if odd is None else odd
    root_fd = open_root(root)
    batch: list[FolderSummary | FolderUnchanged] = []
    names = 0
    try:
        for organization_id in _folders(root_fd, odd, ""):
            org_fd = _open_dir(root_fd, organization_id)
            if org_fd < 0:
                continue  # gone, or not a folder: a symlink, a file
            try:
                for system_key in _folders(org_fd, odd, organization_id + "/"):
                    if shares > 1 and share_of(organization_id, system_key, shares) != share:
                        continue
                    folder = SystemFolder(organization_id, system_key)
                    mark = None if known is None else known(organization_id, system_key)
                    if mark is not None and _still_marked(org_fd, system_key, mark):
                        batch.append(FolderUnchanged(folder))
                    else:
                        summary = _read_folder(org_fd, folder)
                        if summary is None:
                            continue
                        batch.append(summary)
                        names += summary.count
                    if len(batch) >= BATCH_FOLDERS or names >= BATCH_NAMES:
                        yield batch
                        batch, names = [], 0
            finally:
                os.close(org_fd)
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be scanned: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    if batch:
        yield batch


def share_of(organization_id: str, system_key: str, shares: int) -> int:
    return zlib.crc32(f"{organization_id}/{system_key}".encode()) % shares


def more_folders_than(root: Path, limit: int) -> bool:
    """Whether the root holds more than `limit` system folders (names that may be ones,
    counted until the limit is passed: a small root is listed once, a large one in part)."""
    root_fd = open_root(root)
    seen = 0
    try:
        for organization_id in _folders(root_fd, [], ""):
            org_fd = _open_dir(root_fd, organization_id)
            if org_fd < 0:
                continue
            try:
                seen += len(_folders(org_fd, [], ""))
            finally:
                os.close(org_fd)
            if seen > limit:
                return True
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be scanned: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    return False


# a shared walk's frames (scan_process): a length, then that many bytes of JSON
FRAME = struct.Struct("<I")
# (organization, key, count, bytes, newest id, inode, ctime ns); inode 0: no mark
Row = tuple[str, str, int, int, str, int, int]


def packed(summary: FolderSummary) -> Row:
    folder, mark = summary.folder, summary.mark
    inode, changed_ns = (mark.inode, mark.changed_ns) if mark is not None else (0, 0)
    return (
        folder.organization_id,
        folder.system_key,
        summary.count,
        summary.total_bytes,
        summary.newest_id,
        inode,
        changed_ns,
    )


def unpacked(row: Row | list[Any]) -> FolderSummary:
    organization_id, system_key, count, total, newest, inode, changed_ns = row
    mark = FolderMark(inode, changed_ns) if inode else None
    return FolderSummary(SystemFolder(organization_id, system_key), count, total, newest, mark)


def _folders(parent_fd: int, odd: list[str], under: str) -> list[str]:
    """The names that may be folders, sorted. Whether each is a folder and no symlink,
    opening it (O_DIRECTORY | O_NOFOLLOW) says: no stat of its own. Folders under other
    names go to `odd`, after `under` (hidden names are the store's own, and a root that is
    a file system's mount point holds its `lost+found`)."""
    is_folder = _FOLDER_NAME.fullmatch
    kept = []
    for name in os.listdir(parent_fd):
        if is_folder(name):
            kept.append(name)
        elif _odd_folder(parent_fd, name, at_root=not under):
            odd.append(under + name)
    return sorted(kept)


def _odd_folder(parent_fd: int, name: str, at_root: bool) -> bool:
    """A folder (no symlink) under a name no folder of ours has: a stat for these alone."""
    if name.startswith(".") or (at_root and name == "lost+found"):
        return False
    try:
        return stat.S_ISDIR(os.lstat(name, dir_fd=parent_fd).st_mode)
    except OSError:
        return False


def _still_marked(org_fd: int, system_key: str, mark: FolderMark) -> bool:
    """The folder is there, a folder (no symlink), and still the inode and ctime of `mark`."""
    try:
        st = os.lstat(system_key, dir_fd=org_fd)  # fstatat(AT_SYMLINK_NOFOLLOW)
    except OSError:
        return False  # gone: reading it says so
    return (
        stat.S_ISDIR(st.st_mode) and st.st_ctime_ns == mark.changed_ns and st.st_ino == mark.inode
    )


def _read_folder(org_fd: int, folder: SystemFolder) -> FolderSummary | None:
    """The folder's summary with its mark, None when it is no folder or holds no backup."""
    key_fd = _open_dir(org_fd, folder.system_key)
    if key_fd < 0:
        return None
    try:
        # the clock before the mark: a mark older than RACY_SECONDS before this moment was
        # there before the names were read, and any later change moves it
        now = time.time_ns()
        st = os.fstat(key_fd)
        count, total, newest = _summarize(key_fd)
    finally:
        os.close(key_fd)
    if not count:
        return None
    old = st.st_ctime_ns < now - _RACY_NS
    mark = FolderMark(st.st_ino, st.st_ctime_ns) if old else None
    return FolderSummary(folder, count, total, newest, mark)


def _summarize(key_fd: int) -> tuple[int, int, str]:
    """(backups, their bytes, the largest id) of one system folder, by the listing's own
    pass over it (`stored_backups`): the walk counts exactly what a listing would."""
    count = total = 0
    newest = ""
    for name, st in stored_backups(key_fd):
        count += 1
        total += st.st_size
        if name > newest:
            newest = name
    return count, total, newest


def _open_dir(parent_fd: int, name: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError:
        return -1


def remove_empty_folder(root: Path, folder: SystemFolder) -> bool:
    """Remove `{org}/{key}` when nothing but free folder locks is left in it, then the
    organization's folder when it is empty too; each removal made durable. A lock someone
    holds, or any other file, keeps the folder: False then (True: the folder is gone)."""
    root_fd = open_root(root)
    try:
        org_fd = _open_dir(root_fd, folder.organization_id)
        if org_fd < 0:
            return True
        try:
            key_fd = _open_dir(org_fd, folder.system_key)
            if key_fd >= 0:
                try:
                    if not _drop_free_locks(key_fd):
                        return False
                finally:
                    os.close(key_fd)
                if not _rmdir(org_fd, folder.system_key):
                    return _open_dir_gone(org_fd, folder.system_key)
                os.fsync(org_fd)
            if _rmdir(root_fd, folder.organization_id):
                os.fsync(root_fd)
            return True
        finally:
            os.close(org_fd)
    except OSError as exc:
        raise StorageUnavailable(f"folder not removed: {exc.strerror}") from None
    finally:
        os.close(root_fd)


def _drop_free_locks(key_fd: int) -> bool:
    """Unlink the folder's lock files nobody holds; False when anything else is left."""
    with os.scandir(key_fd) as entries:
        names = [e.name for e in entries]
    for name in names:
        if not _LOCK_FILE.fullmatch(name):
            return False  # a backup, a sidecar, an upload in flight: the folder stays
    for name in names:
        try:
            fd = os.open(name, _LOCK_FLAGS, dir_fd=key_fd)
        except OSError:
            return False  # a symlink, or gone: leave the folder to a later purge
        try:
            # held by nobody (else the folder is in use): unlinked while we hold it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(name, dir_fd=key_fd)
        except OSError:
            return False
        finally:
            os.close(fd)
    return True


def _open_dir_gone(parent_fd: int, name: str) -> bool:
    """Whether the folder is gone (removed meanwhile by another purge)."""
    fd = _open_dir(parent_fd, name)
    if fd < 0:
        return True
    os.close(fd)
    return False


def _rmdir(parent_fd: int, name: str) -> bool:
    try:
        os.rmdir(name, dir_fd=parent_fd)
        return True
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT, errno.EBUSY):
            return False
        raise
