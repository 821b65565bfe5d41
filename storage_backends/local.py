"""The `local` backend: `{root}/{organization_id}/{system_key}/{backup_id}` on a POSIX disk.

Paths are walked one component at a time with directory file descriptors and
O_NOFOLLOW, so a symlink anywhere under the root is refused by the kernel
rather than by string checks. Deletes are durable: the parent directory is
fsynced before `delete` returns.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from .base import BackupLocation, BackupStore
from .errors import BackupNotFound, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

SIDECAR_SUFFIX = ".meta.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CHILD_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW


@dataclass(frozen=True)
class LocalConfig:
    root: Path = Path("data/backups")
    # fsync the parent directory before answering; turning it off trades durability for speed
    fsync: bool = True
    threads: int = 8


class SymlinkRefused(BackupNotFound):
    """A path component under the root is a symlink: answered as not found, logged as a warning."""


def _open_child_dir(parent_fd: int, name: str, location: BackupLocation) -> int:
    try:
        return os.open(name, _CHILD_DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise BackupNotFound(location.relative_key) from None
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ELOOP (or ENOTDIR on some kernels).
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            if _is_symlink(parent_fd, name):
                raise SymlinkRefused(location.relative_key) from None
            raise BackupNotFound(location.relative_key) from None
        raise


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def delete_backup_sync(root: Path, location: BackupLocation, fsync: bool) -> None:
    """Unlink data then sidecar, then fsync the directory. Blocking; run it in a thread."""
    try:
        root_fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be opened: {exc.strerror}") from None
    fds = [root_fd]
    try:
        org_fd = _open_child_dir(root_fd, location.organization_id, location)
        fds.append(org_fd)
        key_fd = _open_child_dir(org_fd, location.system_key, location)
        fds.append(key_fd)
        name = location.backup_id
        try:
            mode = os.stat(name, dir_fd=key_fd, follow_symlinks=False).st_mode
        except FileNotFoundError:
            raise BackupNotFound(location.relative_key) from None
        if stat.S_ISLNK(mode):
            raise SymlinkRefused(location.relative_key)
        if not stat.S_ISREG(mode):
            raise BackupNotFound(location.relative_key)
        try:
            # unlink is the linearization point: of concurrent deletes exactly one gets here.
            # It never follows a link, so a file swapped for a symlink after the stat only
            # loses the link itself.
            os.unlink(name, dir_fd=key_fd)
        except FileNotFoundError:
            raise BackupNotFound(location.relative_key) from None
        try:
            os.unlink(name + SIDECAR_SUFFIX, dir_fd=key_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            # The data is gone, which is what the caller asked for; an odd sidecar stays an orphan.
            log.warning("sidecar of %s not removed: %s", location.relative_key, exc.strerror)
        if fsync:
            os.fsync(key_fd)
    except (BackupNotFound, StorageUnavailable):
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None
    finally:
        for fd in reversed(fds):
            os.close(fd)


def check_root_sync(root: Path) -> None:
    try:
        st = os.stat(root)
    except OSError as exc:
        raise StorageUnavailable(f"backup root: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageUnavailable("backup root is not a directory")
    if not os.access(root, os.W_OK | os.X_OK):
        raise StorageUnavailable("backup root is not writable")


class LocalBackupStore(BackupStore):
    name = "local"

    def __init__(self, config: LocalConfig, operation_timeout: float) -> None:
        self._config = config
        self._root = config.root
        self._timeout = operation_timeout
        self._executor: ThreadPoolExecutor | None = None

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(
            max_workers=self._config.threads, thread_name_prefix="local-store"
        )

    async def close(self) -> None:
        if self._executor is not None:
            # wait=True: a delete already in a thread finishes rather than being cut in half
            self._executor.shutdown(wait=True)
            self._executor = None

    async def _run(self, func: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, func, *args)
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            raise StorageUnavailable("local storage operation timed out") from None

    async def delete(self, location: BackupLocation) -> None:
        try:
            await self._run(delete_backup_sync, self._root, location, self._config.fsync)
        except SymlinkRefused:
            log.warning("refused a symlink under the backup root at %s", location.relative_key)
            raise

    async def check_ready(self) -> None:
        await self._run(check_root_sync, self._root)
