"""The reservations in the host's file (see `reservations`): one row per upload in flight,
and a release count per system and per organization. Each step is one transaction, so a
check and its reservation are atomic across the workers; expiries use the host's clock,
which its workers share. Expired rows are dropped, counting as releases, by whichever step
meets them first.
"""

from __future__ import annotations

import sqlite3
import time

from .host_file import HostFile
from .reservations import Claim, Refused, Reserved, Room, Seen, refusal


class HostBook:
    def __init__(self, host: HostFile) -> None:
        self._host = host

    async def look(self, system_key: str, organization_id: str) -> Seen:
        now = time.time()

        def look(db: sqlite3.Connection) -> Seen:
            _expire(db, now)
            system, organization = _held(db, system_key, organization_id)
            return Seen(
                system,
                organization,
                _releases(db, f"system:{system_key}"),
                _releases(db, f"org:{organization_id}"),
            )

        return await self._host.transaction(look)

    async def reserve(self, claim: Claim, room: Room, seen: Seen) -> Reserved | Refused:
        now = time.time()

        def check_and_reserve(db: sqlite3.Connection) -> Reserved | Refused:
            _expire(db, now)
            system, organization = _held(db, claim.system_key, claim.organization_id)
            refused = refusal(claim, room, system, organization)
            if refused is not None:
                return refused
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
                system,
                organization,
                system_stale=_releases(db, f"system:{claim.system_key}") != seen.system_releases,
                organization_stale=(
                    _releases(db, f"org:{claim.organization_id}") != seen.organization_releases
                ),
            )

        return await self._host.transaction(check_and_reserve)

    async def release(self, claim: Claim) -> None:
        def release(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM reservations WHERE id = ?", (claim.id,))
            _released(db, f"system:{claim.system_key}")
            _released(db, f"org:{claim.organization_id}")

        await self._host.transaction(release)


def _held(db: sqlite3.Connection, system_key: str, organization_id: str) -> tuple[int, int]:
    (system,) = db.execute(
        "SELECT COALESCE(SUM(size), 0) FROM reservations WHERE system_key = ?", (system_key,)
    ).fetchone()
    (organization,) = db.execute(
        "SELECT COALESCE(SUM(size), 0) FROM reservations WHERE organization_id = ?",
        (organization_id,),
    ).fetchone()
    return int(system), int(organization)


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


def _releases(db: sqlite3.Connection, scope: str) -> int:
    row = db.execute("SELECT generation FROM releases WHERE scope = ?", (scope,)).fetchone()
    return 0 if row is None else int(row[0])


def _released(db: sqlite3.Connection, scope: str) -> None:
    db.execute(
        "INSERT INTO releases (scope, generation) VALUES (?, 1)"
        " ON CONFLICT (scope) DO UPDATE SET generation = generation + 1",
        (scope,),
    )
