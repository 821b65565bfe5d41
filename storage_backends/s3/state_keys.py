"""A backup's state on S3 (DESIGN.md §11, §12) as key names, and back.

State is kept in the names of empty objects, never in their content, so that one system's
state is ONE paginated ListObjectsV2 of its state folder and no GET:

    {prefix}.state/{organization_id}/{system_key}/{backup_id}/protected

    {prefix}.state/{organization_id}/{system_key}/{backup_id}/verified/{ok|corrupt}/{time}

`protected` exists while the backup is protected. `verified/…` is the verifier's last word
(DESIGN.md §12), the time as UTC `YYYYmmddTHHMMSS.ffffffZ` (sorts as it reads); a newer
one replaces the older ones, and where two are left (a writer stopped in between) the
latest wins. A mark this module does not know is ignored when read, and a delete takes
every key under the backup's state prefix.

Why not under `{prefix}{organization_id}/{system_key}/`: the platform's own services list
and prune every key there (staging likewise lives under `{prefix}.uploads/`). A mark is
read only for a backup that is listed or described: a stale mark of an absent backup never
makes anything appear.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from ..base import BackupLocation, SystemFolder
from ..ids import normalize_backup_id

STATE_ROOT = ".state/"
PROTECTED = "protected"


VERIFIED = "verified/"
INTEGRITIES = ("ok", "corrupt")
_TIME = "%Y%m%dT%H%M%S.%fZ"


@dataclass(frozen=True, slots=True)
class BackupState:
    """What the marks of one backup say."""

    protected: bool = False
    integrity: str = "unverified"
    verified_at: datetime | None = None


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


def verified_key(prefix: str, location: BackupLocation, integrity: str, at: datetime) -> str:
    when = at.astimezone(UTC).strftime(_TIME)
    return f"{backup_state_prefix(prefix, location)}{VERIFIED}{integrity}/{when}"


def states_from_keys(state_prefix: str, keys: Iterable[str]) -> dict[str, BackupState]:
    """Each backup's state from the keys listed under a system's `state_prefix`; a backup
    without a mark is absent (NO_STATE), a key that is no mark of a backup id is ignored."""
    protected: set[str] = set()
    verified: dict[str, tuple[datetime, str]] = {}
    for key in keys:
        if not key.startswith(state_prefix):
            continue
        backup_id, _, mark = key[len(state_prefix) :].partition("/")
        if normalize_backup_id(backup_id) != backup_id:
            continue
        if mark == PROTECTED:
            protected.add(backup_id)
        elif mark.startswith(VERIFIED):
            found = _verification(mark[len(VERIFIED) :])
            if found is not None and (backup_id not in verified or found > verified[backup_id]):
                verified[backup_id] = found  # the latest wins
    return {
        backup_id: BackupState(
            protected=backup_id in protected,
            integrity=verified[backup_id][1] if backup_id in verified else "unverified",
            verified_at=verified[backup_id][0] if backup_id in verified else None,
        )
        for backup_id in protected | set(verified)
    }


def _verification(mark: str) -> tuple[datetime, str] | None:
    integrity, _, when = mark.partition("/")
    if integrity not in INTEGRITIES:
        return None
    try:
        return datetime.strptime(when, _TIME).replace(tzinfo=UTC), integrity
    except ValueError:
        return None
