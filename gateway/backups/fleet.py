"""GET /api/backups/fleet (DESIGN.md §13): every system the caller may act on, with how
many backups it has, their bytes, its newest backup's time and whether that is fresh.

The reach comes from the directory (§3's rules: `Directory.reachable_systems`), the
numbers from this process's fleet index. The whole reach is walked on every request, in
batches (the counts by state are over all of it); only one page is kept. Pages follow
system ids in code-point order; the cursor is the last id of the previous page, so every
system shows exactly once across pages whatever is uploaded meanwhile.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..directory import DIRECTORY, System
from ..fleet import FLEET, STATES, FleetIndex
from ..http.envelope import envelope
from ..http.errors import ApiError, validation_failed
from ..identity.principal import PRINCIPAL
from .directory_answer import directory_or_503
from .listing import rfc3339

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_CURSOR_TAG = "fleet:"


@dataclass(frozen=True, slots=True)
class FleetQuery:
    state: str | None
    limit: int
    after: str | None  # the last system id of the previous page


def fleet_query(request: web.Request) -> FleetQuery:
    """The query's `state`, `limit` and `cursor`, or 400 validation failed naming the key."""
    query = request.query
    state = query.get("state")
    if state is not None and state not in STATES:
        raise validation_failed("state", state)
    raw_limit = query.get("limit")
    limit = DEFAULT_LIMIT
    if raw_limit is not None:
        digits = raw_limit.lstrip("0")
        if not (raw_limit.isascii() and raw_limit.isdigit()) or not digits:
            raise validation_failed("limit", raw_limit)
        # above the most is the most (and a long run of digits is never parsed)
        limit = MAX_LIMIT if len(digits) > len(str(MAX_LIMIT)) else min(int(digits), MAX_LIMIT)
    raw_cursor = query.get("cursor")
    after = None if raw_cursor is None else _decoded_cursor(raw_cursor)
    return FleetQuery(state, limit, after)


def encoded_cursor(system_id: str) -> str:
    return base64.urlsafe_b64encode((_CURSOR_TAG + system_id).encode()).decode().rstrip("=")


def _decoded_cursor(raw: str) -> str:
    """The id a cursor carries: any text the directory may give as a system id (the
    platform's ids are not held to the safe names the folders are, nor to a length: the
    request line's bound is the cursor's), never looked up — it only says where the next
    page starts."""
    try:
        text = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)).decode("utf-8")
    except (binascii.Error, ValueError):
        raise validation_failed("cursor", raw) from None
    system_id = text.removeprefix(_CURSOR_TAG)
    if not text.startswith(_CURSOR_TAG) or not system_id:
        raise validation_failed("cursor", raw)
    return system_id


async def fleet_systems(request: web.Request) -> web.Response:
    asked = fleet_query(request)
    index = request.app[FLEET]
    if not index.ready:
        raise ApiError(503, "fleet index not ready", headers={"Retry-After": "5"})
    caller = request[PRINCIPAL]
    directory = request.app[DIRECTORY]
    counts = dict.fromkeys(STATES, 0)
    page: list[dict[str, Any]] = []
    more = False
    now = index.now_ms()
    with directory_or_503():
        acting = await directory.organization(caller.organization_id)
        # the token's role claim must agree with the directory: else the reach is empty
        if acting is not None and not acting.deleted and acting.role == caller.org_role:
            async for batch in directory.reachable_systems(acting):
                for system in batch:
                    item = _item(index, system, now)
                    counts[item["state"]] += 1
                    if asked.after is not None and system.id <= asked.after:
                        continue
                    if asked.state is not None and item["state"] != asked.state:
                        continue
                    if len(page) < asked.limit:
                        page.append(item)
                    else:
                        more = True
    scanned_at = index.scanned_at
    return envelope(
        200,
        "fleet retrieved successfully",
        {
            "systems": page,
            "counts": counts,
            "scanned_at": rfc3339(scanned_at) if scanned_at else None,
            "next_cursor": encoded_cursor(page[-1]["system_id"]) if more else None,
        },
    )


def _item(index: FleetIndex, system: System, now_ms: int) -> dict[str, Any]:
    assert system.system_key is not None  # the reach holds registered systems only
    stats = index.stats(system.organization_id, system.system_key)
    return {
        "system_id": system.id,
        "organization_id": system.organization_id,
        "backups": stats.backups if stats else 0,
        "bytes": stats.bytes if stats else 0,
        "newest_backup_at": rfc3339(stats.newest_at) if stats else None,
        "state": index.state(stats, now_ms),
    }
