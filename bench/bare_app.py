"""(a) The framework's ceiling: a bare aiohttp DELETE that returns the gateway's JSON."""

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


def main() -> None:
    app = web.Application()
    app.router.add_delete("/api/systems/{id}/backups/{backup_id}", delete)
    web.run_app(
        app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, reuse_port=True
    )


if __name__ == "__main__":
    main()
