"""Path parameters of the backup routes, validated before anything else looks at them."""

from __future__ import annotations

from aiohttp import web

from storage_backends.ids import normalize_backup_id

from ..http.errors import validation_failed


def requested_backup_id(request: web.Request) -> str:
    """The lower-cased backup id of the path, or 400 validation failed (DESIGN.md §2)."""
    raw = request.match_info["backup_id"]
    backup_id = normalize_backup_id(raw)
    if backup_id is None:
        raise validation_failed("backup_id", raw)
    return backup_id
