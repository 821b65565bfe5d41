"""The application factory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from aiohttp import web

from storage_backends import create_store

from . import routes
from .backups.appliance_login import FAILED_LOGINS
from .backups.download import OPEN_BACKUPS, OpenBackups
from .backups.limits.counts import Counts, HostCounts, RedisCounts, SharedCounts
from .backups.limits.host_file import HOST_FILE, HostFile
from .backups.limits.host_reservations import HostBook
from .backups.limits.redis_reservations import RedisBook
from .backups.limits.reservations import Book, Reservations
from .backups.links import LINKS, LinkSigner
from .backups.rates import FailedLogins, UploadRates
from .backups.restore import RESTORES, Restores
from .backups.retention import RETENTION, Retention
from .backups.storage import STORE
from .backups.system_lock import SYSTEM_LOCKS, SystemLocks
from .backups.upload import RESERVATIONS, UPLOAD_RATES
from .backups.usage import USAGE_COUNTER, UsageCounter
from .backups.verifier import BACKUP_VERIFIER, Verifier
from .config import CONFIG, Config
from .directory import DIRECTORY, Directory, create_directory
from .fleet import FLEET, FleetIndex
from .http.authentication import PROTECTED_ROUTES, authenticate
from .http.backpressure import STORAGE_GATE, StorageGate
from .http.client_address import forwarded_client, trusted_networks
from .http.deadlines import DEADLINES, RequestDeadlines
from .http.middlewares import deadline, error_envelope, request_context
from .identity.revocation import REVOCATION, RevocationChecker
from .identity.tokens import VERIFIER, TokenVerifier
from .operations.api_document import API_DOCUMENT, render
from .operations.health import READINESS
from .redis_clients import redis_client
from .telemetry.logs import redact_download_links
from .telemetry.metrics import METRICS, Metrics


def create_app(
    config: Config,
    directory: Directory | None = None,
    verifier: TokenVerifier | None = None,
) -> web.Application:
    """Build the app. Loads the directory file and keys now, so a broken one fails start-up;
    clients (storage, database pool, Redis) are made in cleanup_ctx and contact nothing at
    start-up: a server that is down makes the gateway unready, it does not stop it."""
    app = web.Application(
        middlewares=[
            forwarded_client(trusted_networks(config.server.trusted_proxies)),
            request_context,
            error_envelope,
            deadline,
            authenticate,
        ],
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
    redact_download_links()
    app[METRICS] = Metrics()
    app[DIRECTORY] = directory if directory is not None else create_directory(config.directory)
    app[DIRECTORY].export_metrics(app[METRICS])
    app[VERIFIER] = verifier if verifier is not None else TokenVerifier(config.auth)
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
    # Made here, started in cleanup_ctx: constructing a store contacts nothing.
    app[STORE] = create_store(config.storage)
    app[FLEET] = FleetIndex(config.fleet, app[STORE], app[DIRECTORY])
    app[FLEET].export_metrics(app[METRICS])
    # on_startup runs after cleanup_ctx has started the store and the directory, and
    # on_shutdown before they close
    app.on_startup.append(_start_fleet)
    app.on_shutdown.append(_stop_fleet)
    if app[STORE].capabilities.serves_bytes:  # links to this gateway: a presigning store needs none
        app[LINKS] = LinkSigner(
            config.storage.download.link_secret_file, config.storage.download.ttl_seconds
        )
        app[OPEN_BACKUPS] = OpenBackups(config.storage.download)
        app[OPEN_BACKUPS].export(app[METRICS])
    app[RESTORES] = Restores()
    app[RESTORES].export(app[METRICS])
    probes: dict[str, Callable[[], Awaitable[None]]] = {
        "directory": lambda: app[DIRECTORY].check_ready(),
        "storage": lambda: app[STORE].check_ready(),
    }
    app[READINESS] = probes
    if not config.redis.url:
        # the workers of this host share their limits through it; one that cannot be used
        # stops start-up, since each process counting for itself multiplies every limit
        app[HOST_FILE] = HostFile.at(config.server.state_dir)
    app.cleanup_ctx.extend([_directory, _storage, _redis])
    return app


async def _start_fleet(app: web.Application) -> None:
    app[FLEET].start()  # the first scan in the background: start-up never waits on storage


async def _stop_fleet(app: web.Application) -> None:
    await app[FLEET].close()


async def _directory(app: web.Application) -> AsyncIterator[None]:
    directory = app[DIRECTORY]
    await directory.start()
    yield
    await directory.close()


async def _storage(app: web.Application) -> AsyncIterator[None]:
    store = app[STORE]
    await store.start()
    yield
    await store.close()


async def _redis(app: web.Application) -> AsyncIterator[None]:
    """The platform's Redis, when configured: revocations, the usage counter, upload rates
    and retention locks."""
    config = app[CONFIG]
    url = config.redis.url
    revocation = config.auth.revocation
    if url and revocation.enabled:
        checker = RevocationChecker(revocation, redis_client(url, revocation.db))
        checker.export_metrics(app[METRICS])
        app[REVOCATION] = checker
        app[READINESS]["redis"] = checker.check_ready
    if url and config.storage.usage_counter.enabled:
        counter = UsageCounter(redis_client(url, config.storage.usage_counter.db))
        counter.export_metrics(app[METRICS])
        app[USAGE_COUNTER] = counter
    retention = config.storage.retention
    # the platform's rate keys and retention locks, shared across processes through Redis:
    # one client (and pool) for both
    uploads_db = redis_client(url, retention.redis_db) if url else None
    _shared_limits(app, uploads_db)
    app[SYSTEM_LOCKS] = locks = SystemLocks(app[STORE], uploads_db)
    usage = app.get(USAGE_COUNTER)
    app[RETENTION] = Retention(
        retention,
        app[STORE],
        locks,
        pruned=usage.changed if usage is not None else None,
        fleet=app[FLEET],
    )
    app[RETENTION].export_metrics(app[METRICS])
    app[RETENTION].start_sweeping()
    store = app[STORE]
    verifies = store.capabilities.keeps_state and store.capabilities.lists_folders
    if config.storage.verify.enabled and verifies:
        verify_locks = SystemLocks(store, uploads_db, purpose="verify")
        app[BACKUP_VERIFIER] = Verifier(config.storage.verify, store, verify_locks)
        app[BACKUP_VERIFIER].export_metrics(app[METRICS])
        app[BACKUP_VERIFIER].start()
    yield
    if BACKUP_VERIFIER in app:
        await app[BACKUP_VERIFIER].close()
    await app[RETENTION].close()
    if uploads_db is not None:
        await uploads_db.aclose()
    if HOST_FILE in app:
        app[HOST_FILE].close()
    if REVOCATION in app:
        await app[REVOCATION].close()
    if USAGE_COUNTER in app:
        await app[USAGE_COUNTER].close()


def _shared_limits(app: web.Application, client: aioredis.Redis | None) -> None:
    """The upload rate, the brake on failed logins and the reservations of uploads in
    flight: in Redis when set, else in the host's file; in this process's memory while
    that cannot answer."""
    retention = app[CONFIG].storage.retention
    here = HostFile.in_memory()
    counts: Counts
    book: Book
    if client is not None:
        counts, book = RedisCounts(client), RedisBook(client)
    else:
        counts, book = HostCounts(app[HOST_FILE]), HostBook(app[HOST_FILE])
    app[UPLOAD_RATES] = UploadRates(
        retention.uploads_per_minute,
        retention.uploads_per_hour,
        SharedCounts(counts, here, "upload rate"),
    )
    app[FAILED_LOGINS] = FailedLogins(
        retention.failed_logins_per_minute, SharedCounts(counts, here, "failed logins")
    )
    app[RESERVATIONS] = Reservations(book, HostBook(here))
    app[RESERVATIONS].export_metrics(app[METRICS])
