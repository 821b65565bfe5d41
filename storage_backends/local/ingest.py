"""Blocking steps of a local upload, and the start-up sweep of what dead uploads left.

An upload is written to a hidden temporary file in the system's own folder (`.upload-*`,
never a backup id, so never listed), opened by directory fd with O_EXCL|O_NOFOLLOW and
held under an exclusive flock for its whole life. Committing writes the sidecar beside
it, fsyncs both, renames the sidecar into place and then the data (so a visible backup
always has its sidecar), and fsyncs the folder: a 201 is durable, and a crash at any
point leaves either the whole backup or only hidden files.

The sweep removes hidden files whose writer is gone: it takes the flock without waiting,
which only succeeds once the process that held it has died — a live upload of another
worker or process sharing the root is never touched.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os
import secrets
import stat
from pathlib import Path

from ..base import BackupLocation, SystemFolder
from ..errors import InsufficientStorage, StorageUnavailable
from ..ids import normalize_backup_id
from .fs import SIDECAR_SUFFIX, SymlinkRefused, open_root

log = logging.getLogger(__name__)

TEMP_PREFIX = ".upload-"
_DATA_SUFFIX = ".partial"
_META_SUFFIX = ".partial.meta"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | os.O_NOFOLLOW
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_PROBE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _failure(what: str, exc: OSError) -> Exception:
    if exc.errno in _FULL:
        return InsufficientStorage(f"{what}: {exc.strerror}")
    return StorageUnavailable(f"{what}: {exc.strerror}")


def _child_folder(parent_fd: int, name: str, place: str) -> tuple[int, bool]:
    """Open (creating when absent) a folder under `parent_fd`, never through a symlink.

    Returns the fd and whether it was created (its parent then needs an fsync)."""
    created = False
    try:
        os.mkdir(name, 0o750, dir_fd=parent_fd)
        created = True
    except FileExistsError:
        pass
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd), created
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise SymlinkRefused(place) from None
        raise


def open_upload_folder(root: Path, folder: SystemFolder) -> int:
    """An fd of `{org}/{key}`, created (and its creation made durable) when needed."""
    place = f"{folder.organization_id}/{folder.system_key}/"
    root_fd = open_root(root)
    org_fd = -1
    try:
        org_fd, org_created = _child_folder(root_fd, folder.organization_id, place)
        key_fd, key_created = _child_folder(org_fd, folder.system_key, place)
        if key_created:
            os.fsync(org_fd)
        if org_created:
            os.fsync(root_fd)
        return key_fd
    except OSError as exc:
        raise _failure(place, exc) from None
    finally:
        if org_fd >= 0:
            os.close(org_fd)
        os.close(root_fd)


class LocalUpload:
    """One upload's hidden files in an open system folder. Not thread-safe: one step at a
    time (the store awaits each before the next)."""

    def __init__(self, key_fd: int, location: BackupLocation) -> None:
        self.location = location
        self._key_fd = key_fd
        self._name = f"{TEMP_PREFIX}{secrets.token_hex(12)}{_DATA_SUFFIX}"
        self._meta_name = self._name.removesuffix(_DATA_SUFFIX) + _META_SUFFIX
        self._hash = hashlib.sha256()
        self._fd = -1
        self.written = 0

    def create(self) -> None:
        try:
            self._fd = os.open(self._name, _NEW_FILE_FLAGS, 0o640, dir_fd=self._key_fd)
            # held until the fd closes: the sweep leaves a live upload alone
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            raise _failure(self.location.relative_key, exc) from None

    def write(self, data: bytearray) -> None:
        """Hash and write one chunk (hashlib and os.write both release the GIL)."""
        self._hash.update(data)
        view = memoryview(data)
        try:
            while view:
                done = os.write(self._fd, view)
                view = view[done:]
        except OSError as exc:
            raise _failure(self.location.relative_key, exc) from None
        self.written += len(data)

    def finish(self) -> str:
        """fsync the data; its sha256 hex."""
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise _failure(self.location.relative_key, exc) from None
        return self._hash.hexdigest()

    def commit(self, sidecar: bytes) -> None:
        """Sidecar, then data, into place; the folder fsynced. On a failure nothing of the
        backup stays visible (the hidden files go with `discard`)."""
        name = self.location.backup_id
        visible: list[str] = []
        meta_fd = -1
        try:
            meta_fd = os.open(self._meta_name, _NEW_FILE_FLAGS, 0o640, dir_fd=self._key_fd)
            os.write(meta_fd, sidecar)
            os.fsync(meta_fd)
            fd = self._key_fd
            os.rename(self._meta_name, name + SIDECAR_SUFFIX, src_dir_fd=fd, dst_dir_fd=fd)
            visible.append(name + SIDECAR_SUFFIX)
            os.rename(self._name, name, src_dir_fd=fd, dst_dir_fd=fd)
            visible.insert(0, name)
            os.fsync(fd)
        except OSError as exc:
            for shown in visible:  # not known durable: not a backup
                try:
                    os.unlink(shown, dir_fd=self._key_fd)
                except OSError:
                    log.warning("half-committed %s not removed", shown)
            raise _failure(self.location.relative_key, exc) from None
        finally:
            if meta_fd >= 0:
                os.close(meta_fd)

    def discard(self) -> None:
        """Unlink whatever hidden file is left; close every fd. Never raises."""
        for leftover in (self._name, self._meta_name):
            try:
                os.unlink(leftover, dir_fd=self._key_fd)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("upload leftover %s not removed: %s", leftover, exc.strerror)
        self.close()

    def close(self) -> None:
        for fd in (self._fd, self._key_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._key_fd = -1


# --------------------------------------------------------------------------- start-up sweep


def sweep_leftovers(root: Path) -> int:
    """Remove the hidden files of uploads whose process died; how many were removed.

    A crash between a commit's two renames leaves a sidecar without its data: never listed,
    never in the way of a new upload (ids are new), so it is left alone — removing sidecars
    at start-up would race with live deletes and touch files no upload of ours made."""
    removed = 0
    try:
        root_fd = open_root(root)
    except StorageUnavailable as exc:
        log.warning("upload leftovers not swept: %s", exc)
        return 0
    try:
        for org_fd in _subfolders(root_fd):
            try:
                for key_fd in _subfolders(org_fd):
                    try:
                        removed += _sweep_folder(key_fd)
                    finally:
                        os.close(key_fd)
            finally:
                os.close(org_fd)
    except OSError as exc:
        log.warning("upload leftover sweep stopped: %s", exc.strerror)
    finally:
        os.close(root_fd)
    return removed


def _subfolders(parent_fd: int) -> list[int]:
    fds = []
    with os.scandir(parent_fd) as entries:
        names = [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    for name in names:
        try:
            fds.append(os.open(name, _DIR_FLAGS, dir_fd=parent_fd))
        except OSError:
            continue  # gone, or swapped for a symlink: not ours to sweep
    return fds


def _sweep_folder(key_fd: int) -> int:
    with os.scandir(key_fd) as entries:
        names = {e.name for e in entries if e.name.startswith(TEMP_PREFIX)}
    removed = 0
    for name in names:
        if name.endswith(_DATA_SUFFIX):
            doomed = _writer_gone(key_fd, name)
        elif name.endswith(_META_SUFFIX):
            data = name.removesuffix(_META_SUFFIX) + _DATA_SUFFIX
            doomed = data not in names or _writer_gone(key_fd, data)
        else:
            doomed = False
        if doomed:
            try:
                os.unlink(name, dir_fd=key_fd)
                removed += 1
            except FileNotFoundError:
                pass
    return removed


def _writer_gone(key_fd: int, name: str) -> bool:
    try:
        fd = os.open(name, _PROBE_FLAGS, dir_fd=key_fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True  # nobody holds it: its writer is gone
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- quotas


def organization_usage(root: Path, organization_id: str) -> int:
    """Bytes of every backup (data files named by an id) under `{root}/{organization_id}/`."""
    total = 0
    root_fd = open_root(root)
    try:
        try:
            org_fd = os.open(organization_id, _DIR_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            return 0
        try:
            for key_fd in _subfolders(org_fd):
                try:
                    with os.scandir(key_fd) as entries:
                        for entry in entries:
                            if normalize_backup_id(entry.name) != entry.name:
                                continue
                            try:
                                st = entry.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue  # deleted while counting
                            if stat.S_ISREG(st.st_mode):
                                total += st.st_size
                finally:
                    os.close(key_fd)
        finally:
            os.close(org_fd)
    except OSError as exc:
        raise StorageUnavailable(f"{organization_id}/: {exc.strerror}") from None
    finally:
        os.close(root_fd)
    return total
