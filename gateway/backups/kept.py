"""The keep rules applied to what a store holds now, reading as little metadata as it can.

The rules decide from ids alone, except that a corrupt backup never takes a good one's
slot (DESIGN.md §12) and a protected one is always kept (§11): both live in each backup's
state. A small folder is described whole in one listing; a large one is decided from its
names and sizes, then only the backups a rule would keep are described, and the rules run
again while one of them turns out corrupt. The backups no rule keeps are described by the
caller that acts on them (a prune checks protection right before it deletes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from storage_backends import BackupEntry, BackupInfo, BackupNotFound, BackupStore, SystemFolder

from .keep_rules import Candidate, KeepPolicy, kept_by

# up to this many backups, one listing that reads every sidecar costs less than describing
# the kept ones one by one
DESCRIBE_WHOLE_UP_TO = 64


@dataclass(frozen=True)
class Decision:
    sizes: dict[str, int]  # every backup's id and size (a new one's included)
    reasons: dict[str, tuple[str, ...]]  # why each is kept; () for the ones no rule keeps
    known: dict[str, BackupInfo]  # the backups described on the way

    def kept_bytes(self) -> int:
        return sum(self.sizes[b] for b, why in self.reasons.items() if why)

    def unkept(self) -> list[str]:
        return [b for b, why in self.reasons.items() if not why]


async def decide(
    store: BackupStore,
    folder: SystemFolder,
    policy: KeepPolicy,
    new: BackupEntry | None = None,
) -> Decision:
    """The rules over the system's backups (and `new`, not stored yet, as a good one)."""
    entries = await store.list_entries(folder)
    sizes = {e.id: e.size for e in entries}
    known: dict[str, BackupInfo] = {}
    if policy.prunes and 0 < len(entries) <= DESCRIBE_WHOLE_UP_TO:
        known = {b.id: b for b in await store.list_backups(folder)}
        sizes = {backup_id: sizes[backup_id] for backup_id in known if backup_id in sizes}
    if new is not None:
        sizes[new.id] = new.size
    if not policy.prunes:
        return Decision(sizes, {b: ("retention off",) for b in sizes}, known)
    while True:
        reasons = kept_by(_candidates(sizes, known), policy)
        unknown = [b for b, why in reasons.items() if why and b not in known and b in sizes]
        if new is not None and new.id in unknown:
            unknown.remove(new.id)
        if not unknown:
            return Decision(sizes, reasons, known)
        for backup_id in unknown:
            try:
                known[backup_id] = await store.describe(folder.location(backup_id))
            except BackupNotFound:
                sizes.pop(backup_id)  # deleted meanwhile: it holds nothing
        if not any(known[b].integrity == "corrupt" for b in unknown if b in known):
            # nobody's slot moved: only the `protected` reasons of those just described
            reasons = kept_by(_candidates(sizes, known), policy)
            return Decision(sizes, reasons, known)


def _candidates(sizes: dict[str, int], known: dict[str, BackupInfo]) -> Iterable[Candidate]:
    for backup_id in sizes:
        info = known.get(backup_id)
        if info is None:
            yield Candidate(backup_id)
        else:
            yield Candidate(
                backup_id, protected=info.protected, corrupt=info.integrity == "corrupt"
            )


async def protected_among(
    store: BackupStore, folder: SystemFolder, decision: Decision, exclude: str = ""
) -> int:
    """The bytes of the backups no rule keeps that are protected (they stay all the same)."""
    total = 0
    for backup_id in decision.unkept():
        if backup_id == exclude:
            continue
        info = decision.known.get(backup_id)
        if info is None:
            with contextlib.suppress(BackupNotFound):  # gone meanwhile: it holds nothing
                info = await store.describe(folder.location(backup_id))
        if info is not None and info.protected:
            total += decision.sizes[backup_id]
    return total
