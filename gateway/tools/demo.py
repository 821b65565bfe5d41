"""Demo backups for the embedded default, so a new user has something real to delete."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from storage_backends import BackupLocation
from storage_backends.local import SIDECAR_SUFFIX, mark_root

from ..config import Config
from ..directory import load_file_directory

# Fixed ids so the README can show a curl line that works; the first is the seed page's example.
DEMO_SUFFIXES = ("b8.tar.gz", "b9.tar.xz", "ba.gpg")
DEMO_PREFIX = "01934fab-bc33-7890-a1b2-c3d4e5f6a7"


def demo_backup_ids(index: int) -> list[str]:
    """Three well-formed UUIDv7 ids for the system at `index` in the directory."""
    if index == 0:
        return [DEMO_PREFIX + s for s in DEMO_SUFFIXES]
    head = f"{0x01934FAB + index:08x}"
    return [f"{head}-bc33-7890-a1b2-c3d4e5f6a7{s}" for s in DEMO_SUFFIXES]


def write_local_backup(root: os.PathLike[str] | str, location: BackupLocation, data: bytes) -> None:
    folder = os.path.join(root, location.organization_id, location.system_key)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, location.backup_id)
    with open(path, "wb") as f:
        f.write(data)
    suffix = location.backup_id[36:]  # the id's own extension, if any
    meta = {
        "filename": f"config-backup{suffix or '.bin'}",
        "sha256": hashlib.sha256(data).hexdigest(),
        "mimetype": "application/gzip" if suffix.endswith(".gz") else "application/octet-stream",
        "uploaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    with open(path + SIDECAR_SUFFIX, "w", encoding="utf-8") as f:
        json.dump(meta, f)


def _in_use(root: Path) -> bool:
    """Marked, or holding anything: a root someone has used (its marker may be all that is
    left once every backup was deleted)."""
    try:
        with os.scandir(root) as entries:
            return any(True for _ in entries)
    except FileNotFoundError:
        return False


def seed_demo(config: Config) -> Iterator[str]:
    if config.storage.backend != "local":
        raise SystemExit("seed-demo writes to local storage; use `seed` for s3")
    root = config.storage.local.root
    if _in_use(root):
        # `make run` seeds on every start: a demo backup the user deleted must stay deleted,
        # and a root that holds anything is not the demo's to write into
        yield f"{root}: in use; no demo backups written (seed-demo fills only a new root)"
        return
    mark_root(root, only_if_in_use=False)  # the demo's root: created and marked as in use
    directory = load_file_directory(config.directory.path)
    registered = [s for s in directory.systems if s.system_key is not None]
    for index, system in enumerate(registered):
        assert system.system_key is not None
        for backup_id in demo_backup_ids(index):
            location = BackupLocation(system.organization_id, system.system_key, backup_id)
            if not os.path.exists(os.path.join(root, location.relative_key)):
                write_local_backup(root, location, f"demo backup {backup_id}\n".encode())
            yield f"{system.id}\t{backup_id}"
