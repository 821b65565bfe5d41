"""(a) The framework's ceiling: a bare aiohttp DELETE that returns the gateway's JSON, and a
bare GET that returns a listing of ten backups in the gateway's shape (for the list rows), and
a bare POST that reads an upload's body and answers 201 (for the upload rows)."""

from __future__ import annotations

import json
import sys

from aiohttp import web


async def delete(request: web.Request) -> web.Response:
    body = json.dumps(
        {
            "code": 200,
            "message": "backup deleted",
            "data": {
                "system_id": request.match_info["id"],
                "backup_id": request.match_info["backup_id"],
            },
        },
        separators=(",", ":"),
    )
    return web.Response(text=body, content_type="application/json")


_ITEM = {
    "id": "01934fab-bc33-7890-a1b2-c3d4e5f6a7b8.tar.gz",
    "filename": "backup.tar.gz",
    "size": 1024,
    "sha256": "0" * 64,
    "mimetype": "application/gzip",
    "uploaded_at": "2026-11-28T09:00:23Z",
}


async def listing(request: web.Request) -> web.Response:
    body = json.dumps(
        {
            "code": 200,
            "message": "backups retrieved successfully",
            "data": {
                "backups": [_ITEM] * 10,
                "quota_used_bytes": 10240,
                "slots_used": 10,
                "truncated": False,
            },
        },
        separators=(",", ":"),
    )
    return web.Response(text=body, content_type="application/json")


async def upload(request: web.Request) -> web.Response:
    """Receive the body (discarded) and answer what the gateway answers: the upload rows'
    ceiling, without credentials, hashing or a disk."""
    size = 0
    async for chunk in request.content.iter_chunked(1024 * 1024):
        size += len(chunk)
    body = json.dumps(
        {"code": 201, "message": "backup stored", "data": {**_ITEM, "size": size}},
        separators=(",", ":"),
    )
    return web.Response(status=201, text=body, content_type="application/json")


def main() -> None:
    app = web.Application()
    app.router.add_delete("/api/systems/{id}/backups/{backup_id}", delete)
    app.router.add_get("/api/systems/{id}/backups", listing)
    app.router.add_post("/api/systems/backups", upload)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, reuse_port=True
    )


if __name__ == "__main__":
    main()
