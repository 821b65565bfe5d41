"""Room for an upload (DESIGN.md §11): never prune to make room, never pass two on one room.

Before the body: the backups that would be kept with the new one (the keep rules applied
to what is stored plus the new one at its announced size), with the bytes of the uploads
in flight for the system, must fit `max_bytes_per_system`; what the organization holds,
with its uploads in flight, must fit `max_bytes_per_organization`. An upload that passes
reserves its announced size until it ends, however it ends, so two cannot both pass on
the same room, in this process or another (`limits.reservations`).

After the body, under the system's lock, the rules are applied again to what is stored
then: an upload that lost a race with another process is discarded (413), never an older
kept backup.
"""

from __future__ import annotations

from storage_backends import BackupEntry, BackupStore, SystemFolder

from .keep_rules import KeepPolicy
from .kept import Decision, decide, protected_among

SYSTEM_FULL = "system backup quota exceeded"
ORGANIZATION_FULL = "organization backup quota exceeded"


async def kept_bytes(
    store: BackupStore, folder: SystemFolder, new_id: str, new_size: int, policy: KeepPolicy
) -> int:
    """The bytes the rules keep of what is stored plus the new backup (every byte, when the
    policy prunes nothing), protected backups included."""
    return (await room_with(store, folder, new_id, new_size, policy))[1]


async def room_with(
    store: BackupStore, folder: SystemFolder, new_id: str, new_size: int, policy: KeepPolicy
) -> tuple[Decision, int]:
    """The rules' decision over what is stored plus the new backup, and the bytes it keeps
    (`kept_bytes`)."""
    decision = await decide(store, folder, policy, BackupEntry(new_id, new_size))
    return decision, decision.kept_bytes() + await protected_among(store, folder, decision, new_id)
