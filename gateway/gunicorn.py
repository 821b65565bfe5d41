"""An app factory for gunicorn's aiohttp worker, for operators who already run gunicorn.

    GATEWAY_CONFIG=config.yaml gunicorn 'gateway.gunicorn:app' \
        --worker-class aiohttp.GunicornWebWorker --workers 2 --bind 127.0.0.1:8080

gunicorn then owns the socket, the workers and the signals; server.host, port
and workers in the config are not used.
"""

from __future__ import annotations

import os
import sys

from aiohttp import web

from .app import create_app
from .config import load_config
from .config_loader import ConfigError
from .directory import DirectoryError
from .telemetry.logs import configure_logging


async def app() -> web.Application:
    path = os.environ.get("GATEWAY_CONFIG", "config.yaml")
    try:
        config = load_config(path)
        configure_logging(config.logging)
        return create_app(config)
    except (ConfigError, DirectoryError) as exc:
        print(f"backup-gateway: config error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
