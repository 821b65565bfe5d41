"""Blocking filesystem steps of the local backend: walk with dir fds, unlink, fsync.

Paths are walked one component at a time with directory file descriptors and
O_NOFOLLOW, so a symlink anywhere under the root is refused by the kernel rather
than by string checks. Used by the I/O process and by the in-process (inline) mode.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..base import DEFAULT_MIMETYPE, BackupInfo, BackupLocation, OpenedBackup, SystemFolder
from ..errors import BackupNotFound, StorageError, StorageUnavailable
from ..ids import normalize_backup_id

log = logging.getLogger(__name__)

SIDECAR_SUFFIX = ".meta.json"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_CHILD_DIR_FLAGS = _DIR_FLAGS | os.O_NOFOLLOW
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
_ENTRY_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
SIDECAR_MAX_BYTES = 64 * 1024  # a sidecar is a few hundred bytes; anything larger is ignored
_SHA256 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_MIMETYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", re.ASCII
)


class SymlinkRefused(BackupNotFound):
    """A path component under the root is a symlink: answered as not found, logged as a warning."""


# In the root of every backup root: an unmounted volume leaves its mount point behind,
# empty, where every backup would read as missing (404) and uploads would land on the
# wrong disk. Without the marker the root is unready and every operation a 502.
ROOT_MARKER = ".backup-gateway-root"
UNMARKED = "backup root is not marked (is its volume mounted? see `backup-gateway init-root`)"


def open_root(root: Path) -> int:
    """An fd of the backup root, which must carry the marker."""
    try:
        fd = os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise StorageUnavailable(f"backup root cannot be opened: {exc.strerror}") from None
    try:
        os.stat(ROOT_MARKER, dir_fd=fd, follow_symlinks=False)
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, FileNotFoundError):
            raise StorageUnavailable(UNMARKED) from None
        raise StorageUnavailable(f"backup root marker: {exc.strerror}") from None
    return fd


def mark_root(root: Path, only_if_in_use: bool) -> bool:
    """Write the marker; True when the root carries it afterwards.

    `only_if_in_use` (at start-up): mark only a root that already holds something — a
    deployment from before the marker. An empty, unmarked root may be an unmounted
    volume's mount point: it is left for the operator (`backup-gateway init-root`)."""
    try:
        if os.path.lexists(root / ROOT_MARKER):
            return True
        if only_if_in_use:
            with os.scandir(root) as entries:
                if not any(not e.name.startswith(".") for e in entries):
                    return False
        else:
            root.mkdir(parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(root / ROOT_MARKER, flags, 0o640)
        try:
            os.write(fd, b"backup-gateway backup root: keep this file (see README)\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        dir_fd = os.open(root, _DIR_FLAGS)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        return True
    except FileExistsError:
        return True  # another worker marked it first
    except OSError:
        return False


def _open_child_dir(parent_fd: int, name: str, location: BackupLocation | SystemFolder) -> int:
    what = _describe_place(location)
    try:
        return os.open(name, _CHILD_DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        raise BackupNotFound(what) from None
    except OSError as exc:
        # O_NOFOLLOW|O_DIRECTORY on a symlink fails with ELOOP (or ENOTDIR on some kernels).
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            if _is_symlink(parent_fd, name):
                raise SymlinkRefused(what) from None
            raise BackupNotFound(what) from None
        raise


def _describe_place(place: BackupLocation | SystemFolder) -> str:
    if isinstance(place, BackupLocation):
        return place.relative_key
    return f"{place.organization_id}/{place.system_key}/"


def open_system_folder(root_fd: int, folder: BackupLocation | SystemFolder) -> int:
    """An fd of `{org}/{key}` under the root, walked with O_NOFOLLOW. The caller closes it.

    BackupNotFound when absent, SymlinkRefused when a component is a symlink."""
    org_fd = _open_child_dir(root_fd, folder.organization_id, folder)
    try:
        return _open_child_dir(org_fd, folder.system_key, folder)
    finally:
        os.close(org_fd)


def _is_symlink(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _unlink_in_folder(key_fd: int, location: BackupLocation) -> None:
    """Unlink data, then sidecar, in an open system folder. Raises typed errors."""
    name = location.backup_id
    try:
        # O_PATH|O_NOFOLLOW: a handle on the entry itself (a symlink is not followed), so
        # that after the unlink we can tell whether the name still held this file.
        handle = os.open(name, _ENTRY_FLAGS, dir_fd=key_fd)
    except FileNotFoundError:
        raise BackupNotFound(location.relative_key) from None
    try:
        st = os.fstat(handle)
        if stat.S_ISLNK(st.st_mode):
            raise SymlinkRefused(location.relative_key)
        if not stat.S_ISREG(st.st_mode):
            raise BackupNotFound(location.relative_key)
        try:
            # unlink is the linearization point: of concurrent deletes exactly one gets here.
            os.unlink(name, dir_fd=key_fd)
        except FileNotFoundError:
            raise BackupNotFound(location.relative_key) from None
        if os.fstat(handle).st_nlink != st.st_nlink - 1:
            # The name was swapped (for a symlink, another file) between the check and the
            # unlink: what went was not this backup, which survives elsewhere. Not a 200,
            # and its sidecar stays.
            log.warning("backup at %s was swapped while being deleted", location.relative_key)
            raise SymlinkRefused(location.relative_key)
    finally:
        os.close(handle)
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
        key_fd = open_system_folder(root_fd, location)
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
    if not os.path.lexists(root / ROOT_MARKER):
        raise StorageUnavailable(UNMARKED)


# --------------------------------------------------------------------------- reading


def list_folder(root: Path, folder: SystemFolder) -> list[BackupInfo]:
    """Every backup in a system's folder: data files named with a canonical backup id.

    A folder that does not exist lists empty; one reached through a symlink raises
    SymlinkRefused (the caller lists it empty, with a warning). A backup that vanishes
    while listing is left out."""
    root_fd = open_root(root)
    try:
        try:
            key_fd = open_system_folder(root_fd, folder)
        except SymlinkRefused:
            raise  # a BackupNotFound too, but not an empty folder
        except BackupNotFound:
            return []
        try:
            found = []
            with os.scandir(key_fd) as entries:
                for entry in entries:
                    name = entry.name
                    if normalize_backup_id(name) != name:
                        continue  # sidecars, temporary files, anything else
                    try:
                        st = os.stat(name, dir_fd=key_fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # deleted while we listed
                    if stat.S_ISLNK(st.st_mode):
                        continue  # never followed, never listed
                    if stat.S_ISREG(st.st_mode):
                        found.append(_info(name, st, _read_sidecar(key_fd, name)))
            return found
        finally:
            os.close(key_fd)
    except OSError as exc:
        raise StorageUnavailable(f"{_describe_place(folder)}: {exc.strerror}") from None
    finally:
        os.close(root_fd)


def describe_backup(root: Path, location: BackupLocation) -> BackupInfo:
    opened = open_backup(root, location)
    try:
        return opened.info
    finally:
        opened.close()


def open_backup(root: Path, location: BackupLocation) -> OpenedBackup:
    """Open the data file read-only through the symlink-refusing walk; never by path."""
    root_fd = open_root(root)
    key_fd = -1
    try:
        key_fd = open_system_folder(root_fd, location)
        name = location.backup_id
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=key_fd)
        except FileNotFoundError:
            raise BackupNotFound(location.relative_key) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise SymlinkRefused(location.relative_key) from None
            raise
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise BackupNotFound(location.relative_key)
            return OpenedBackup(fd, _info(name, st, _read_sidecar(key_fd, name)))
        except BaseException:
            os.close(fd)
            raise
    except StorageError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None
    finally:
        if key_fd >= 0:
            os.close(key_fd)
        os.close(root_fd)


def _read_sidecar(key_fd: int, backup_id: str) -> dict[str, Any]:
    """The sidecar's fields, {} when it is missing, unreadable as JSON, or odd."""
    try:
        fd = os.open(backup_id + SIDECAR_SUFFIX, _FILE_FLAGS | os.O_NONBLOCK, dir_fd=key_fd)
    except OSError:
        return {}  # missing, or a symlink (ELOOP): no metadata
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > SIDECAR_MAX_BYTES:
            return {}
        raw = os.read(fd, SIDECAR_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        value = json.loads(raw)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _info(backup_id: str, st: os.stat_result, sidecar: dict[str, Any]) -> BackupInfo:
    filename = sidecar.get("filename")
    sha256 = sidecar.get("sha256")
    mimetype = sidecar.get("mimetype")
    return BackupInfo(
        id=backup_id,
        size=st.st_size,
        filename=filename if isinstance(filename, str) and 0 < len(filename) <= 1024 else backup_id,
        sha256=sha256 if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else "",
        mimetype=mimetype
        if isinstance(mimetype, str) and _MIMETYPE.fullmatch(mimetype)
        else DEFAULT_MIMETYPE,
        uploaded_at=_uploaded_at(sidecar.get("uploaded_at"), st.st_mtime),
    )


def _uploaded_at(value: Any, mtime: float) -> datetime:
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = None
        if parsed is not None and parsed.tzinfo is not None:
            return parsed.astimezone(UTC)
    return datetime.fromtimestamp(mtime, UTC)


def encode_listing(infos: list[BackupInfo]) -> bytes:
    """A listing as one line of JSON (no newline in it), for the I/O process's answer."""
    rows = [
        [i.id, i.size, i.filename, i.sha256, i.mimetype, i.uploaded_at.timestamp()] for i in infos
    ]
    return json.dumps(rows, separators=(",", ":")).encode("utf-8")


def decode_listing(line: bytes) -> list[BackupInfo]:
    return [
        BackupInfo(b, size, name, sha, mime, datetime.fromtimestamp(ts, UTC))
        for b, size, name, sha, mime, ts in json.loads(line)
    ]


def folds_case(root: Path) -> bool:
    """Whether names under `root` are matched case-insensitively (a casefolded ext4 or
    tmpfs folder, vfat, a macOS volume): there `acme` and `ACME` would be one folder, and
    one tenant's backups another's. False when the root is absent or not writable: that
    is readiness's to report."""
    probe = f".case-probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        fd = os.open(root / probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    os.close(fd)
    try:
        return os.path.lexists(root / probe.upper())
    finally:
        with contextlib.suppress(OSError):
            os.unlink(root / probe)
