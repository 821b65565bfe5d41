"""The reservations in the host's file (see `reservations`): one row per upload in flight,
and a release count per system and per organization. Each step is one transaction, so a
check and its reservation are atomic across the workers; expiries use the host's clock,
which its workers share. Expired rows are dropped, counting as releases, by whichever step
meets them first.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time

from .host_file import HostFile
from .reservations import Claim, Refused, Releases, Reserved, Room, Seen, refusal


class HostBook:
    def __init__(self, host: HostFile) -> None:
        self._host = host

    async def look(self, system_key: str, organization_id: str) -> Seen:
        now = time.time()

        def look(db: sqlite3.Connection) -> Seen:
            _expire(db, now)
            held = _held(db, system_key, organization_id)
            return Seen(
                held.system,
                held.organization,
                _releases(db, f"system:{system_key}"),
                _releases(db, f"org:{organization_id}"),
                system_landing=held.system_landing,
                organization_landing=held.organization_landing,
            )

        return await self._host.transaction(look)

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused:
        now = time.time()

        def check_and_reserve(db: sqlite3.Connection) -> Reserved | Refused:
            _expire(db, now)
            held = _held(db, claim.system_key, claim.organization_id)
            releases = Releases(
                _releases(db, f"system:{claim.system_key}"),
                _releases(db, f"org:{claim.organization_id}"),
            )
            refused = refusal(
                claim,
                room,
                held.system,
                held.organization,
                held.system_landing,
                held.organization_landing,
            )
            if refused is not None:
                return dataclasses.replace(refused, releases=releases)
            db.execute(
                "INSERT INTO reservations (id, system_key, organization_id, size, expires_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (
                    claim.id,
                    claim.system_key,
                    claim.organization_id,
                    claim.size,
                    now + claim.seconds,
                ),
            )
            return Reserved(
                held.system,
                held.organization,
                system_stale=releases.system != seen.system_releases,
                organization_stale=releases.organization != seen.organization_releases,
                releases=releases,
            )

        return await self._host.transaction(check_and_reserve)

    async def landing(self, claim: Claim) -> None:
        def landing(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR IGNORE INTO landing (id) SELECT id FROM reservations WHERE id = ?",
                (claim.id,),
            )

        await self._host.transaction(landing)

    async def release(self, claim: Claim) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM reservations WHERE id = ?", (claim.id,))
            db.execute("DELETE FROM landing WHERE id = ?", (claim.id,))
            _released(db, f"system:{claim.system_key}")
            _released(db, f"org:{claim.organization_id}")

        await self._host.transaction(release)


@dataclasses.dataclass(frozen=True)
class _Held:
    system: int
    organization: int
    system_landing: int
    organization_landing: int


def _held(db: sqlite3.Connection, system_key: str, organization_id: str) -> _Held:
    """The bytes reserved for the system and the organization, and the landing part."""
    system, system_landing = _sums(db, "system_key", system_key)
    organization, organization_landing = _sums(db, "organization_id", organization_id)
    return _Held(system, organization, system_landing, organization_landing)


_LANDING_TOO = (
    "SELECT COALESCE(SUM(size), 0),"
    " COALESCE(SUM(CASE WHEN id IN (SELECT id FROM landing) THEN size END), 0)"
    " FROM reservations WHERE "
)
_SUMS = {
    "system_key": _LANDING_TOO + "system_key = ?",
    "organization_id": _LANDING_TOO + "organization_id = ?",
}


def _sums(db: sqlite3.Connection, column: str, value: str) -> tuple[int, int]:
    total, landing = db.execute(_SUMS[column], (value,)).fetchone()
    return int(total), int(landing)


def _expire(db: sqlite3.Connection, now: float) -> None:
    """Drop the reservations whose upload's deadline passed (its process died holding
    them), each counted as a release of its system and organization."""
    expired = db.execute(
        "DELETE FROM reservations WHERE expires_at <= ? RETURNING system_key, organization_id",
        (now,),
    ).fetchall()
    for system_key, organization_id in expired:
        _released(db, f"system:{system_key}")
        _released(db, f"org:{organization_id}")
    if expired:
        db.execute("DELETE FROM landing WHERE id NOT IN (SELECT id FROM reservations)")


def _releases(db: sqlite3.Connection, scope: str) -> int:
    row = db.execute("SELECT generation FROM releases WHERE scope = ?", (scope,)).fetchone()
    return 0 if row is None else int(row[0])


def _released(db: sqlite3.Connection, scope: str) -> None:
    db.execute(
        "INSERT INTO releases (scope, generation) VALUES (?, 1)"
        " ON CONFLICT (scope) DO UPDATE SET generation = generation + 1",
        (scope,),
    )
