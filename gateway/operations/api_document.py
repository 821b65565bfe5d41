"""Serve the OpenAPI document (openapi.yaml here; docs/ links to it) under the base path."""

from __future__ import annotations

from pathlib import Path

import yaml
from aiohttp import web

DOCUMENT = Path(__file__).with_name("openapi.yaml")
API_DOCUMENT = web.AppKey("api_document", bytes)


def render(base_path: str) -> bytes:
    """The document with its server URL set to this deployment's base path.

    Loading and dumping also expands the YAML anchors used to share the two delete paths.
    """
    document = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    document["servers"] = [{"url": base_path}]
    return yaml.safe_dump(document, sort_keys=False).encode()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=request.app[API_DOCUMENT], content_type="application/yaml")
