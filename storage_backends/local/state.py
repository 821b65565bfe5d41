"""A backup's state beside its data (protection, DESIGN.md §11), and the system folder's lock.

State lives in the backup's sidecar, rewritten whole: a new file, fsynced, renamed over
the old one, and the folder fsynced — a crash leaves the old sidecar or the new one,
never half of either. The folder lock is an flock on a hidden file in the system's folder:
every process on this host that shares the root sees it, and the kernel lets it go when
its holder dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import stat
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from ..base import BackupLocation, FolderLock, SystemFolder
from ..errors import BackupNotFound, BackupProtected, StorageError, StorageUnavailable
from .fs import (
    SIDECAR_SUFFIX,
    SymlinkRefused,
    open_in_folder,
    open_root,
    open_system_folder,
    unlink_in_folder,
)
from .fs import _read_sidecar as read_sidecar
from .ingest import open_upload_folder

LOCK_NAME = ".retention.lock"  # the retention lock's file; other purposes: .<purpose>.lock
_STATE_PREFIX = ".state-"
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_DATA_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# the names the directory gives organizations and system keys (never hidden, no separators)
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
# how often a busy folder lock is tried again, at first and at most
_POLL_FIRST, _POLL_MOST = 0.005, 0.1


def set_protected(root: Path, location: BackupLocation, protected: bool) -> None:
    """Rewrite the backup's sidecar with `protected`; BackupNotFound when the backup is
    not a regular file in its folder."""
    update_sidecar(root, location, {"protected": protected})


def set_verified(root: Path, location: BackupLocation, integrity: str, at: datetime) -> None:
    update_sidecar(root, location, {"integrity": integrity, "verified_at": at.isoformat()})


def update_sidecar(root: Path, location: BackupLocation, changes: dict[str, Any]) -> None:
    """Rewrite the backup's sidecar with `changes`; the rest of it stays."""
    root_fd = open_root(root)
    key_fd = -1
    try:
        key_fd = open_system_folder(root_fd, location)
        _require_backup(key_fd, location)
        # an unreadable sidecar read as no metadata: rewriting it loses nothing more
        fields, _unreadable = read_sidecar(key_fd, location.backup_id)
        sidecar: dict[str, Any] = {**fields, **changes}
        _replace_sidecar(key_fd, location.backup_id, json.dumps(sidecar).encode())
    except StorageError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None
    finally:
        if key_fd >= 0:
            os.close(key_fd)
        os.close(root_fd)


def _require_backup(key_fd: int, location: BackupLocation) -> None:
    try:
        fd = os.open(location.backup_id, _DATA_FLAGS, dir_fd=key_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(location.relative_key) from None
        raise BackupNotFound(location.relative_key) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BackupNotFound(location.relative_key)
    finally:
        os.close(fd)


def _replace_sidecar(key_fd: int, backup_id: str, content: bytes) -> None:
    temporary = f"{_STATE_PREFIX}{secrets.token_hex(8)}.tmp"
    fd = os.open(temporary, _NEW_FILE_FLAGS, 0o640, dir_fd=key_fd)
    try:
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temporary, backup_id + SIDECAR_SUFFIX, src_dir_fd=key_fd, dst_dir_fd=key_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary, dir_fd=key_fd)
        raise
    os.fsync(key_fd)


def lock_name(purpose: str) -> str:
    return f".{purpose}.lock"


class FolderBusy(Exception):
    """An exclusive holder has the folder's lock: nothing was done."""


# the lock of the gateway's system changes (its SystemLocks' purpose)
_CHANGES_LOCK = lock_name("retention")


def unlink_unless_protected(root_fd: int, location: BackupLocation) -> tuple[int, int]:
    """Unlink the backup (data, then sidecar) unless it is protected, under the folder's
    shared lock taken without waiting, as a delete holding `LocalFolderLock(shared=True)`
    would: the folder's fd (to fsync; the caller closes it) and the backup's size.

    FolderBusy when an exclusive holder (a pruning run, a protection change, an upload's
    commit) has the lock; BackupProtected when protected; otherwise as `unlink_backup`.
    One step where a delete took three (the lock, a look, the unlink), each a hand-off."""
    key_fd = -1
    try:
        key_fd = open_system_folder(root_fd, location)
        lock_fd = os.open(_CHANGES_LOCK, _LOCK_FLAGS, 0o640, dir_fd=key_fd)
        try:
            try:
                fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise FolderBusy(location.relative_key) from None
            opened = open_in_folder(key_fd, location)
            opened.close()
            if opened.info.protected:
                raise BackupProtected(location.relative_key)
            unlink_in_folder(key_fd, location)
        finally:
            os.close(lock_fd)  # the only descriptor: the flock goes with it
        return key_fd, opened.info.size
    except BaseException as exc:
        if key_fd >= 0:
            os.close(key_fd)
        if isinstance(exc, OSError):
            raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None
        raise


def _open_lock_file(root: Path, folder: SystemFolder, create: bool, name: str) -> int:
    """The folder's lock file, -1 when the folder does not exist and `create` is False."""
    if create:
        key_fd = open_upload_folder(root, folder)
    else:
        root_fd = open_root(root)
        try:
            key_fd = open_system_folder(root_fd, folder)
        except BackupNotFound:
            return -1
        finally:
            os.close(root_fd)
    try:
        return os.open(name, _LOCK_FLAGS, 0o640, dir_fd=key_fd)
    except OSError as exc:
        raise StorageUnavailable(f"lock of {folder.system_key}: {exc.strerror}") from None
    finally:
        os.close(key_fd)


class LocalFolderLock(FolderLock):
    def __init__(
        self,
        root: Path,
        folder: SystemFolder,
        run: Callable[..., Awaitable[Any]],
        purpose: str = "retention",
    ) -> None:
        self._root = root
        self._folder = folder
        self._name = lock_name(purpose)
        self._run = run  # a blocking step in the store's threads, bounded in time
        self._fd = -1

    async def acquire(self, wait_seconds: float, shared: bool = False) -> bool:
        # A shared holder (a delete) never makes the folder: where there is none, there is
        # no backup to keep from it, and nothing to lock.
        fd = await self._run(_open_lock_file, self._root, self._folder, not shared, self._name)
        if fd < 0:
            return True
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        pause = _POLL_FIRST
        try:
            while True:
                try:
                    # never blocks: the event loop polls, so a waiter can be cancelled
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                    self._fd, fd = fd, -1
                    return True
                except BlockingIOError:
                    left = deadline - loop.time()
                    if left <= 0:
                        return False
                    await asyncio.sleep(min(pause, left))
                    pause = min(pause * 2, _POLL_MOST)
        finally:
            if fd >= 0:
                os.close(fd)

    async def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # closing the only descriptor lets the flock go
            self._fd = -1


def system_folders(root: Path) -> list[SystemFolder]:
    """Every `{org}/{key}` folder under the root whose names are safe path components,
    walked by directory descriptors; a symlink anywhere is not followed."""
    found: list[SystemFolder] = []
    root_fd = open_root(root)
    try:
        for organization_id in _folder_names(root_fd):
            try:
                org_fd = os.open(organization_id, _DIR_FLAGS, dir_fd=root_fd)
            except OSError:
                continue  # gone, or swapped for a symlink meanwhile
            try:
                found.extend(SystemFolder(organization_id, key) for key in _folder_names(org_fd))
            finally:
                os.close(org_fd)
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be listed: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    return found


def _folder_names(parent_fd: int) -> list[str]:
    with os.scandir(parent_fd) as entries:
        return sorted(
            e.name
            for e in entries
            if _SAFE_NAME.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
        )
