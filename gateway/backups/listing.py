"""GET a system's backups (DESIGN.md §8): newest first, bounded, never a partial list."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from storage_backends import BackupInfo, BackupListing, SystemFolder

from ..config import CONFIG
from ..http.envelope import envelope
from .authorization import authorized_system
from .keep_rules import Candidate, KeepPolicy, kept_by
from .retention import RETENTION
from .storage import STORE, run_storage


def rfc3339(when: datetime) -> str:
    """UTC with a Z; milliseconds when the time has a fraction of a second."""
    when = when.astimezone(UTC)
    if when.microsecond:
        return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def item(info: BackupInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "filename": info.filename,
        "size": info.size,
        "sha256": info.sha256,
        "mimetype": info.mimetype,
        "uploaded_at": rfc3339(info.uploaded_at),
    }


def listed_items(backups: list[BackupInfo], policy: KeepPolicy) -> list[dict[str, Any]]:
    """A listing's items (DESIGN.md §8, §11): each with `protected` and `kept_by`, the
    reasons the keep rules keep it. The rules look only at newer backups, so the newest N
    that a listing returns are judged exactly from themselves."""
    reasons = kept_by(
        (Candidate(b.id, b.protected, corrupt=b.integrity == "corrupt") for b in backups), policy
    )
    return [
        {
            **item(b),
            "protected": b.protected,
            "kept_by": list(reasons[b.id]),
            "integrity": b.integrity,
            "verified_at": rfc3339(b.verified_at) if b.verified_at else None,
        }
        for b in backups
    ]


async def list_backups(request: web.Request) -> web.Response:
    system = await authorized_system(request, request.match_info["id"])
    store = request.app[STORE]
    limit = request.app[CONFIG].limits.max_list_items
    if system.system_key is None:
        # not registered: nothing uploaded, whatever the backend
        listing = BackupListing([], 0, 0)
    else:
        folder = SystemFolder(system.organization_id, system.system_key)

        async def newest(target: SystemFolder) -> BackupListing:
            # only the returned backups are described; the totals come from the scan
            return await store.list_newest(target, limit)

        listing = await run_storage(request, "list", newest, folder, "list backups")
    # The store chose the `limit` largest ids (UUIDv7: the newest); they are shown in the
    # contract's order, which looks at uploaded_at first.
    backups = sorted(listing.backups, key=lambda b: (b.uploaded_at, b.id), reverse=True)
    return envelope(
        200,
        "backups retrieved successfully",
        {
            "backups": listed_items(backups[:limit], request.app[RETENTION].policy),
            "quota_used_bytes": listing.total_bytes,
            "slots_used": listing.count,
            "truncated": listing.truncated,
        },
    )
