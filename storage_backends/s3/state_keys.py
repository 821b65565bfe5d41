"""A backup's state on S3 (DESIGN.md §11, §12) as key names, and back.

State is kept in the names of empty objects, never in their content, so that one system's
state is ONE paginated ListObjectsV2 of its state folder and no GET:

    {prefix}.state/{organization_id}/{system_key}/{backup_id}/protected

`protected` exists while the backup is protected. Room is left beside it for more marks of
the same backup (the verifier's, e.g. `verified/{ok|corrupt}/{rfc3339 time}`): a mark this
module does not know is ignored when read, and a delete takes every key under the backup's
state prefix.

Why not under `{prefix}{organization_id}/{system_key}/`: the platform's own services list
and prune every key there (staging likewise lives under `{prefix}.uploads/`). A mark is
read only for a backup that is listed or described: a stale mark of an absent backup never
makes anything appear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..base import BackupLocation, SystemFolder
from ..ids import normalize_backup_id

STATE_ROOT = ".state/"
PROTECTED = "protected"


@dataclass(frozen=True, slots=True)
class BackupState:
    """What the marks of one backup say."""

    protected: bool = False


NO_STATE = BackupState()


def system_state_prefix(prefix: str, folder: SystemFolder) -> str:
    """Where every mark of a system's backups lives (the configured prefix as written)."""
    return f"{prefix}{STATE_ROOT}{folder.organization_id}/{folder.system_key}/"


def backup_state_prefix(prefix: str, location: BackupLocation) -> str:
    """Where every mark of one backup lives."""
    folder = SystemFolder(location.organization_id, location.system_key)
    return f"{system_state_prefix(prefix, folder)}{location.backup_id}/"


def protected_key(prefix: str, location: BackupLocation) -> str:
    return backup_state_prefix(prefix, location) + PROTECTED


def states_from_keys(state_prefix: str, keys: Iterable[str]) -> dict[str, BackupState]:
    """Each backup's state from the keys listed under a system's `state_prefix`; a backup
    without a mark is absent (NO_STATE), a key that is no mark of a backup id is ignored."""
    protected: set[str] = set()
    for key in keys:
        if not key.startswith(state_prefix):
            continue
        backup_id, _, mark = key[len(state_prefix) :].partition("/")
        if normalize_backup_id(backup_id) != backup_id:
            continue
        if mark == PROTECTED:
            protected.add(backup_id)
    return {backup_id: BackupState(protected=True) for backup_id in protected}
