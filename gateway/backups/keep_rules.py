"""Which backups retention keeps (DESIGN.md §11), decided from ids alone: a pure function.

The rules order backups by the time in their UUIDv7 id (the upload's own clock, never the
store's) and are those of restic's `forget`: the newest `last`; the newest backup of each
of the newest `daily` UTC days that have one, and likewise of ISO weeks and of months. A
protected backup is always kept; a corrupt one is never picked by a rule, so it never
takes a good backup's slot. With every rule at 0 nothing is pruned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from storage_backends.ids import backup_unix_ms

REASONS = ("last", "daily", "weekly", "monthly", "protected")


@dataclass(frozen=True, slots=True)
class KeepPolicy:
    last: int = 3
    daily: int = 7
    weekly: int = 4
    monthly: int = 6

    @property
    def prunes(self) -> bool:
        """False when every rule is off: then nothing is ever pruned."""
        return any((self.last, self.daily, self.weekly, self.monthly))


@dataclass(frozen=True, slots=True)
class Candidate:
    id: str
    protected: bool = False
    corrupt: bool = False


def backup_time(backup_id: str) -> datetime:
    return datetime.fromtimestamp(backup_unix_ms(backup_id) / 1000, UTC)


def _day(at: datetime) -> tuple[int, ...]:
    return (at.year, at.month, at.day)


def _iso_week(at: datetime) -> tuple[int, ...]:
    year, week, _ = at.isocalendar()
    return (year, week)


def _month(at: datetime) -> tuple[int, ...]:
    return (at.year, at.month)


_BUCKETS: tuple[tuple[str, Callable[[datetime], tuple[int, ...]]], ...] = (
    ("daily", _day),
    ("weekly", _iso_week),
    ("monthly", _month),
)


def kept_by(candidates: Iterable[Candidate], policy: KeepPolicy) -> dict[str, tuple[str, ...]]:
    """Every candidate's id with the reasons it is kept, in REASONS order; an empty tuple
    means the next prune removes it (never while `policy.prunes` is False)."""
    backups = list(candidates)
    reasons: dict[str, list[str]] = {b.id: [] for b in backups}
    # newest first; ids of one millisecond are ordered by the rest of the id, consistently
    good = sorted((b for b in backups if not b.corrupt), key=lambda b: (backup_unix_ms(b.id), b.id))
    good.reverse()
    for backup in good[: policy.last]:
        reasons[backup.id].append("last")
    limits = {"daily": policy.daily, "weekly": policy.weekly, "monthly": policy.monthly}
    for name, bucket_of in _BUCKETS:
        limit = limits[name]
        seen: set[tuple[int, ...]] = set()
        for backup in good:
            if len(seen) >= limit:
                break
            bucket = bucket_of(backup_time(backup.id))
            if bucket not in seen:
                seen.add(bucket)
                reasons[backup.id].append(name)
    for backup in backups:
        if backup.protected:
            reasons[backup.id].append("protected")
    return {backup_id: tuple(found) for backup_id, found in reasons.items()}


def to_prune(candidates: Iterable[Candidate], policy: KeepPolicy) -> list[str]:
    """The ids no rule keeps, oldest first; [] when the policy prunes nothing."""
    if not policy.prunes:
        return []
    decided = kept_by(candidates, policy)
    return sorted(
        (backup_id for backup_id, reasons in decided.items() if not reasons),
        key=lambda backup_id: (backup_unix_ms(backup_id), backup_id),
    )
