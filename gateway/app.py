"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from storage_backends import create_store

from . import routes
from .backups.storage import STORE
from .config import CONFIG, Config
from .directory import DIRECTORY, Directory, load_file_directory
from .http.authentication import PROTECTED_ROUTES, authenticate
from .http.backpressure import STORAGE_GATE, StorageGate
from .http.deadlines import DEADLINES, RequestDeadlines
from .http.middlewares import deadline, error_envelope, request_context
from .identity.tokens import VERIFIER, TokenVerifier
from .operations.api_document import API_DOCUMENT, render
from .telemetry.metrics import METRICS, Metrics


def load_directory(config: Config) -> Directory:
    return load_file_directory(config.directory.path)


def create_app(
    config: Config,
    directory: Directory | None = None,
    verifier: TokenVerifier | None = None,
) -> web.Application:
    """Build the app. Loads the directory and keys now, so a broken one fails start-up;
    the storage client is made in cleanup_ctx and never contacts storage at start-up."""
    app = web.Application(
        middlewares=[request_context, error_envelope, deadline, authenticate],
        handler_args={
            "max_line_size": config.server.max_line_size,
            "max_field_size": config.server.max_field_size,
            "keepalive_timeout": config.server.keepalive_timeout_seconds,
            # A body the handler did not read is never drained: the connection closes
            # after the answer (an early refusal, a refused chunked request).
            "lingering_time": 0,
        },
    )
    app[CONFIG] = config
    app[DIRECTORY] = directory if directory is not None else load_directory(config)
    app[VERIFIER] = verifier if verifier is not None else TokenVerifier(config.auth)
    app[METRICS] = Metrics()
    app[DEADLINES] = RequestDeadlines(config.server.request_timeout_seconds)
    app[STORAGE_GATE] = StorageGate(
        config.limits.max_concurrent_storage_operations,
        config.limits.storage_queue_timeout_seconds,
    )
    table = routes.routes(config.server.base_path)
    if not config.metrics.enabled:
        table = [r for r in table if r.name != "metrics"]
    app[PROTECTED_ROUTES] = routes.install(app, table)
    app[API_DOCUMENT] = render(config.server.base_path)
    app.cleanup_ctx.append(_storage)
    return app


async def _storage(app: web.Application) -> AsyncIterator[None]:
    store = create_store(app[CONFIG].storage)
    await store.start()
    app[STORE] = store
    yield
    await store.close()
