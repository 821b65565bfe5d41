"""Blocking filesystem steps of the local backend: walk with dir fds, unlink, fsync.

Paths are walked one component at a time with directory file descriptors and
O_NOFOLLOW, so a symlink anywhere under the root is refused by the kernel rather
than by string checks. Used by the I/O process and by the in-process (inline) mode.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from pathlib import Path

from ..base import BackupLocation
from ..errors import BackupNotFound, StorageError, StorageUnavailable

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".meta.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CHILD_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW


class SymlinkRefused(BackupNotFound):
    """A path component under the root is a symlink: answered as not found, logged as a warning."""


def open_root(root: Path) -> int:
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be opened: {exc.strerror}") from None


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


def _unlink_in_folder(key_fd: int, location: BackupLocation) -> None:
    """Unlink data, then sidecar, in an open system folder. Raises typed errors."""
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


def unlink_backup(root_fd: int, location: BackupLocation) -> int:
    """Unlink a backup (data, then sidecar) and return an open fd of its folder, to fsync.

    Walks root -> organization -> system key with O_NOFOLLOW: a symlink anywhere below the
    root is refused by the kernel. The caller owns the returned fd.
    """
    key_fd = -1
    try:
        org_fd = _open_child_dir(root_fd, location.organization_id, location)
        try:
            key_fd = _open_child_dir(org_fd, location.system_key, location)
        finally:
            os.close(org_fd)
        _unlink_in_folder(key_fd, location)
        return key_fd
    except StorageError:
        if key_fd >= 0:
            os.close(key_fd)
        raise
    except OSError as exc:
        if key_fd >= 0:
            os.close(key_fd)
        raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None


def fsync_folder(fds: list[int]) -> str | None:
    """fsync a folder once (every fd names the same folder) and close every fd.

    Returns None when durable, else the error's text.
    """
    try:
        os.fsync(fds[0])
        return None
    except OSError as exc:
        return f"fsync failed: {exc.strerror}"
    finally:
        for fd in fds:
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
