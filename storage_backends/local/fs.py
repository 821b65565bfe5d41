"""Blocking filesystem steps of the local backend: walk with dir fds, unlink, fsync.

Paths are walked one component at a time with directory file descriptors and
O_NOFOLLOW, so a symlink anywhere under the root is refused by the kernel rather
than by string checks. Used by the I/O process and by the in-process (inline) mode.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import json
import logging
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ..base import (
    DEFAULT_MIMETYPE,
    BackupEntry,
    BackupInfo,
    BackupListing,
    BackupLocation,
    OpenedBackup,
    SystemFolder,
)
from ..errors import BackupNotFound, StorageError, StorageUnavailable
from ..ids import match_stored_backup_name
from ..metadata import EARLIEST, LATEST, fit_filename, parse_time, warn_once

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


class RootUnmarked(StorageUnavailable):
    """The root has no marker. Unlike other causes, /readyz's body may say this one: it
    names no path, and the operator's fix is a command, not a search through the log."""

    readiness_hint = (
        "the local backup root (storage.local.root) is not marked: is its volume mounted? "
        "A new root is marked with `backup-gateway init-root --config CONFIG`"
    )


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
            raise RootUnmarked(UNMARKED) from None
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


def unlink_in_folder(key_fd: int, location: BackupLocation) -> None:
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
        unlink_in_folder(key_fd, location)
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
        raise RootUnmarked(UNMARKED)


# --------------------------------------------------------------------------- reading

# a listing looks at the clock this often (entries), to give up at its deadline
_CLOCK_EVERY = 4096


def _open_folder_or_none(root_fd: int, folder: SystemFolder) -> int | None:
    """The folder's fd; None when it does not exist (it lists empty). SymlinkRefused when it
    is reached through a symlink (the caller lists it empty, with a warning)."""
    try:
        return open_system_folder(root_fd, folder)
    except SymlinkRefused:
        raise  # a BackupNotFound too, but not an empty folder
    except BackupNotFound:
        return None


Chosen = list[tuple[str, os.stat_result]]


def stored_backups(
    key_fd: int, deadline: float | None = None
) -> Iterator[tuple[str, os.stat_result]]:
    """Each backup of a system folder with its stat: one pass of the folder's entries
    and one fstatat a backup (its size, and that it is a regular file), no sidecar read.
    The hot loop of listings and of the fleet's walk, which meet a million names, so it
    keeps to the few operations each needs: a sidecar is dropped by its suffix, any other
    name by one precompiled regex call, not `normalize_backup_id` (the fleet's walk of a
    million backups: 1.34-1.45x a `find` that stats each backup before, 1.23-1.41x so).

    The entries are read as they come (scandir), never as one list: a folder of a million
    backups holds two million names, which a listdir would hold at once, and a deadline
    could not interrupt. Only the entry's name is used: its cached type would miss nothing
    the fstatat does not tell, and the fstatat is needed for the size anyway."""
    is_backup = match_stored_backup_name
    lstat = os.lstat
    seen = 0
    with os.scandir(key_fd) as entries:
        for entry in entries:
            seen += 1
            if deadline is not None and seen % _CLOCK_EVERY == 0 and time.monotonic() > deadline:
                # never a partial list: the caller answers 502, and the thread stops here
                raise StorageUnavailable("listing did not finish within the operation timeout")
            name = entry.name
            # a sidecar (half the names) is known by its end, before any regex; then only
            # the normal form of an id: no temporary file, no upper-case twin, nothing else
            if name.endswith(SIDECAR_SUFFIX) or not is_backup(name):
                continue
            try:
                st = lstat(name, dir_fd=key_fd)  # fstatat(key_fd, name, AT_SYMLINK_NOFOLLOW)
            except FileNotFoundError:
                continue  # deleted while we listed
            # a symlink (never followed), a FIFO, a folder: not a backup
            if stat.S_ISREG(st.st_mode):
                yield name, st


def _scan(key_fd: int, keep: int | None, deadline: float | None) -> tuple[Chosen, int, int]:
    """One pass over the folder's names: (the `keep` backups with the largest ids, or all
    of them when None; how many backups there are; their bytes).

    Backup ids are UUIDv7, so the largest names are the newest backups. Only the kept
    ones are held (a heap), so memory does not grow with the folder.
    """
    kept: Chosen = []
    count = total = 0
    for name, st in stored_backups(key_fd, deadline):
        count += 1
        total += st.st_size
        if keep is None:
            kept.append((name, st))
        elif len(kept) < keep:
            heapq.heappush(kept, (name, st))
        elif name > kept[0][0]:
            heapq.heapreplace(kept, (name, st))
    return kept, count, total


def _scan_folder(
    root: Path, folder: SystemFolder, keep: int | None, deadline: float | None, describe: bool
) -> tuple[list[BackupInfo], list[BackupEntry], int, int]:
    root_fd = open_root(root)
    try:
        key_fd = _open_folder_or_none(root_fd, folder)
        if key_fd is None:
            return [], [], 0, 0
        try:
            kept, count, total = _scan(key_fd, keep, deadline)
            if not describe:
                return [], [BackupEntry(name, st.st_size) for name, st in kept], count, total
            place = _describe_place(folder)
            infos = [
                _info(name, st, _read_sidecar(key_fd, name), place + name) for name, st in kept
            ]
            return infos, [], count, total
        finally:
            os.close(key_fd)
    except OSError as exc:
        raise StorageUnavailable(f"{_describe_place(folder)}: {exc.strerror}") from None
    finally:
        os.close(root_fd)


def list_newest(
    root: Path, folder: SystemFolder, limit: int, deadline: float | None = None
) -> BackupListing:
    """The `limit` newest backups (largest ids) described, and the count and bytes of all.

    A folder that does not exist lists empty; one reached through a symlink raises
    SymlinkRefused. A backup that vanishes while listing is left out. Past `deadline`
    (time.monotonic()) StorageUnavailable, never a partial answer."""
    infos, _, count, total = _scan_folder(root, folder, max(0, limit), deadline, describe=True)
    return BackupListing(infos, count, total)


def list_entries(
    root: Path, folder: SystemFolder, deadline: float | None = None
) -> list[BackupEntry]:
    """Every backup's id and size, no sidecar read (as `list_newest` for the rest)."""
    return _scan_folder(root, folder, None, deadline, describe=False)[1]


def list_folder(
    root: Path, folder: SystemFolder, deadline: float | None = None
) -> list[BackupInfo]:
    """Every backup described (a sidecar read each); as `list_newest` for the rest."""
    return _scan_folder(root, folder, None, deadline, describe=True)[0]


def describe_backup(root: Path, location: BackupLocation) -> BackupInfo:
    opened = open_backup(root, location)
    try:
        return opened.info
    finally:
        opened.close()


def open_backup(root: Path, location: BackupLocation) -> OpenedBackup:
    """Open the data file read-only through the symlink-refusing walk; never by path.

    O_NONBLOCK: a FIFO named like a backup would otherwise block the open until a writer
    came, holding the reading thread for good. Only a regular file is a backup; for one,
    the flag changes nothing, and it is cleared before the descriptor is handed on."""
    root_fd = open_root(root)
    key_fd = -1
    try:
        key_fd = open_system_folder(root_fd, location)
        return open_in_folder(key_fd, location)
    except StorageError:
        raise
    except OSError as exc:
        raise StorageUnavailable(f"{location.relative_key}: {exc.strerror}") from None
    finally:
        if key_fd >= 0:
            os.close(key_fd)
        os.close(root_fd)


def open_in_folder(key_fd: int, location: BackupLocation) -> OpenedBackup:
    """`open_backup` in the backup's open system folder."""
    name = location.backup_id
    try:
        fd = os.open(name, _FILE_FLAGS | os.O_NONBLOCK, dir_fd=key_fd)
    except FileNotFoundError:
        raise BackupNotFound(location.relative_key) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise SymlinkRefused(location.relative_key) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):
            raise BackupNotFound(location.relative_key) from None  # a socket, a folder
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BackupNotFound(location.relative_key)
        os.set_blocking(fd, True)
        sidecar = _read_sidecar(key_fd, name)
        return OpenedBackup(fd, _info(name, st, sidecar, location.relative_key))
    except BaseException:
        os.close(fd)
        raise


Sidecar = tuple[dict[str, Any], str | None]  # (its fields, why it was not read, if it was not)


def _read_sidecar(key_fd: int, backup_id: str) -> Sidecar:
    """The sidecar's fields; ({}, None) when there is none, ({}, why) when it is unreadable
    as a JSON object: too large, not a regular file, not UTF-8, not JSON, nested too deep."""
    try:
        fd = os.open(backup_id + SIDECAR_SUFFIX, _FILE_FLAGS | os.O_NONBLOCK, dir_fd=key_fd)
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"cannot be opened ({exc.strerror})"  # a symlink (ELOOP), a socket
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return {}, "not a regular file"
        if st.st_size > SIDECAR_MAX_BYTES:
            return {}, f"over {SIDECAR_MAX_BYTES} bytes"
        raw = os.read(fd, SIDECAR_MAX_BYTES + 1)
    finally:
        os.close(fd)
    try:
        value = json.loads(raw)
    except RecursionError:
        return {}, "nested too deeply"
    except ValueError:  # UnicodeDecodeError is one
        return {}, "not JSON in UTF-8"
    if not isinstance(value, dict):
        return {}, "not a JSON object"
    return value, None


def _info(name: str, st: os.stat_result, sidecar: Sidecar, place: str) -> BackupInfo:
    """A backup's entry from its stat and sidecar: each sidecar field that is not what the
    gateway writes reads as its default, and the backup is named in a warning once."""
    fields, unread = sidecar
    problems = [f"sidecar {unread}"] if unread else []

    def field(key: str, fit: Callable[[Any], bool]) -> Any:
        value = fields.get(key)
        if value is None and key not in fields:
            return None  # absent: the default, nothing to report
        if fit(value):
            return value
        problems.append(key)
        return None

    filename = field("filename", fit_filename)
    sha256 = field("sha256", lambda v: isinstance(v, str) and _SHA256.fullmatch(v) is not None)
    mimetype = field(
        "mimetype", lambda v: isinstance(v, str) and _MIMETYPE.fullmatch(v) is not None
    )
    uploaded_at = parse_time(fields.get("uploaded_at"))
    if uploaded_at is None and "uploaded_at" in fields:
        problems.append("uploaded_at")
    if problems:
        warn_once(log, "sidecar", place, problems)
    integrity = fields.get("integrity")
    verified = isinstance(integrity, str) and integrity in ("ok", "corrupt")
    return BackupInfo(
        id=name,
        size=st.st_size,
        filename=filename or name,
        sha256=sha256 or "",
        mimetype=mimetype or DEFAULT_MIMETYPE,
        uploaded_at=uploaded_at or _mtime(st),
        protected=fields.get("protected") is True,
        integrity=str(integrity) if verified else "unverified",
        verified_at=parse_time(fields.get("verified_at")) if verified else None,
    )


def _mtime(st: os.stat_result) -> datetime:
    """The data file's mtime, held to the times a listing can show (anyone may set it to
    anything with utimensat)."""
    seconds = min(max(st.st_mtime, EARLIEST.timestamp()), LATEST.timestamp())
    return datetime.fromtimestamp(seconds, UTC)


def _encode_info(i: BackupInfo) -> list[Any]:
    # the time as ISO text: exact, where a float's round trip may land past year 9999
    verified = i.verified_at.isoformat() if i.verified_at else None
    return [
        *(i.id, i.size, i.filename, i.sha256, i.mimetype, i.uploaded_at.isoformat()),
        *(i.protected, i.integrity, verified),
    ]


def _decode_info(row: list[Any]) -> BackupInfo:
    backup_id, size, name, sha, mime, when, protected, integrity, verified = row
    return BackupInfo(
        *(backup_id, size, name, sha, mime, datetime.fromisoformat(when)),
        protected=protected,
        integrity=integrity,
        verified_at=datetime.fromisoformat(verified) if verified else None,
    )


def encode_listing(infos: list[BackupInfo]) -> bytes:
    """A listing as one line of JSON (no newline in it), for the I/O process's answer.
    ensure_ascii (the default): whatever a name holds travels as escapes."""
    return json.dumps([_encode_info(i) for i in infos], separators=(",", ":")).encode()


def decode_listing(line: bytes) -> list[BackupInfo]:
    return [_decode_info(row) for row in json.loads(line)]


def encode_newest(listing: BackupListing) -> bytes:
    rows = [_encode_info(i) for i in listing.backups]
    return json.dumps([listing.count, listing.total_bytes, rows], separators=(",", ":")).encode()


def decode_newest(line: bytes) -> BackupListing:
    count, total, rows = json.loads(line)
    return BackupListing([_decode_info(row) for row in rows], count, total)


def encode_entries(entries: list[BackupEntry]) -> bytes:
    return json.dumps([[e.id, e.size] for e in entries], separators=(",", ":")).encode()


def decode_entries(line: bytes) -> list[BackupEntry]:
    return [BackupEntry(backup_id, size) for backup_id, size in json.loads(line)]


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
