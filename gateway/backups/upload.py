"""POST /api/systems/backups: an appliance uploads a backup (DESIGN.md §9).

Order: the appliance's credentials (401) → no Content-Encoding (415) → a Content-Length
(411) → the per-upload and per-system byte caps (413) → the system's upload rate (429) →
the organization's quota (413) → `100 Continue`, when asked for → the body, streamed into
the store with its sha256 → 201 → retention. Every refusal closes the connection after
its answer: an unread body is never drained, and a client that waited for `100 Continue`
never sends it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from datetime import UTC, datetime

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from storage_backends import (
    DEFAULT_MIMETYPE,
    BackupInfo,
    NewBackup,
    StagedBackup,
    StorageNotConfigured,
    SystemFolder,
    UploadIncomplete,
)
from storage_backends.ids import new_uuid7, upload_extension

from ..config import CONFIG
from ..directory import DIRECTORY, System
from ..http.aiohttp_internals import requests_queued_behind, send_continue
from ..http.envelope import envelope
from ..http.errors import ApiError, storage_error
from ..identity.appliance import CHALLENGE, basic_credentials, secret_matches
from .audit import record_prune, record_upload
from .directory_answer import directory_or_503
from .listing import item
from .names import sanitized
from .rates import FailedLogins, UploadRates
from .retention import Retention
from .storage import STORE, run_storage
from .usage import USAGE_COUNTER

log = logging.getLogger(__name__)

UPLOAD_RATES = web.AppKey("upload_rates", UploadRates)
FAILED_LOGINS = web.AppKey("failed_logins", FailedLogins)
RETENTION = web.AppKey("retention", Retention)

MAX_FILENAME = 255
_MIMETYPE = re.compile(
    r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}", re.ASCII
)
_CONTENT_LENGTH = re.compile(r"[0-9]{1,19}", re.ASCII)
_PATH_SEPARATORS = re.compile(r"[/\\]")
_DISCARDING: set[asyncio.Task[None]] = set()


class _RequestBody:
    """The request's body as the store reads it (storage_backends.UploadBody)."""

    def __init__(self, request: web.Request, size: int) -> None:
        self._content = request.content
        self._left = size

    async def read(self, limit: int) -> bytes:
        try:
            data = await self._content.read(min(limit, self._left))
        except (HttpProcessingError, ConnectionError, OSError) as exc:
            raise UploadIncomplete(f"body cut short: {type(exc).__name__}") from None
        if not data:
            raise UploadIncomplete(f"body ended {self._left} bytes early")
        self._left -= len(data)
        return data


async def upload_backup(request: web.Request) -> web.StreamResponse:
    config = request.app[CONFIG]
    credentials = basic_credentials(request)
    system: System | None = None
    try:
        async with asyncio.timeout(config.server.request_timeout_seconds):
            system = await _appliance(request)
            size = _checked_size(request)
            await _admit(request, system, size)
        await _continue(request)
        stored = await _store(request, system, size)
    except TimeoutError:
        error = ApiError(504, "request timed out")
    except ApiError as exc:
        error = exc
    except asyncio.CancelledError:
        # the client went away (servers with handler cancellation) or shutdown cut it short
        if credentials is not None:
            record_upload(
                request, credentials.system_key, system.id if system else None, "cancelled"
            )
        raise
    else:
        await _apply_retention(request, system, stored.id)
        usage = request.app.get(USAGE_COUNTER)
        if usage is not None:
            usage.changed(system.organization_id)
        data = item(stored)
        record_upload(request, system.system_key or "", system.id, "backup stored", data)
        return envelope(201, "backup stored", data)
    if credentials is not None:
        record_upload(request, credentials.system_key, system.id if system else None, error.message)
    response = envelope(error.status, error.message, error.data, error.headers)
    response.force_close()  # whatever of the body is unread stays unread
    return response


async def _continue(request: web.Request) -> None:
    expect = request.headers.get("Expect")
    if expect is None:
        return
    if expect.strip().lower() != "100-continue":
        raise ApiError(417, "expectation failed")
    if request.version >= (1, 1):
        await send_continue(request)


async def _appliance(request: web.Request) -> System:
    """The live, registered, unsuspended system whose credentials these are (401 else)."""
    app = request.app
    credentials = basic_credentials(request)
    system = None
    if credentials is not None:
        with directory_or_503():
            system = await app[DIRECTORY].system_by_key(credentials.system_key)
    matches = secret_matches(
        system.secret_public if system else None,
        system.secret_sha256 if system else None,
        credentials.secret if credentials else "",
    )
    # A soft-deleted organization's appliances are refused too (asked only once the secret
    # matched: the answer costs an unknown key nothing it could time). The brake is asked
    # only after a failure: a correct credential is never refused, whoever else failed
    # from the same address (a NAT, the load balancer).
    live = matches and system is not None and not system.deleted and not system.suspended
    if live and system is not None and await _organization_live(app, system.organization_id):
        return system
    # Failures count per client address and key named: guessing one system's secret is
    # braked, while appliances behind one proxy address keep their own counts.
    attempt = f"{request.remote or ''} {credentials.system_key if credentials else ''}"
    wait = app[FAILED_LOGINS].failed(attempt)
    if wait is not None:
        raise ApiError(
            429, "too many failed authentication attempts", None, {"Retry-After": str(wait)}
        )
    raise ApiError(401, "invalid system credentials", None, CHALLENGE)


async def _organization_live(app: web.Application, organization_id: str) -> bool:
    with directory_or_503():
        organization = await app[DIRECTORY].organization(organization_id)
    return organization is not None and not organization.deleted


def _checked_size(request: web.Request) -> int:
    retention = request.app[CONFIG].storage.retention
    if request.headers.get("Content-Encoding", "identity").strip().lower() != "identity":
        raise ApiError(415, "Content-Encoding is not accepted")
    lengths = request.headers.getall("Content-Length", [])
    if len(lengths) != 1 or not _CONTENT_LENGTH.fullmatch(lengths[0].strip()):
        raise ApiError(411, "Content-Length required")
    size = int(lengths[0])
    for cap in (retention.max_upload_bytes, retention.max_bytes_per_system):
        if cap and size > cap:
            raise ApiError(413, "backup too large")
    return size


async def _admit(request: web.Request, system: System, size: int) -> None:
    app = request.app
    assert system.system_key is not None  # found by its key
    wait = await app[UPLOAD_RATES].admit(system.system_key)
    if wait is not None:
        raise ApiError(429, "too many uploads", None, {"Retry-After": str(wait)})
    store = app[STORE]
    if not store.capabilities.stores_uploads:
        raise storage_error(StorageNotConfigured(store.name), "store backup")
    limit = app[CONFIG].storage.retention.max_bytes_per_organization
    if limit:
        used = await run_storage(
            request, "usage", store.organization_usage, system.organization_id, "store backup"
        )
        if used + size > limit:
            raise ApiError(413, "organization backup quota exceeded")


def _new_backup(request: web.Request, system: System, size: int) -> NewBackup:
    assert system.system_key is not None
    now = datetime.now(UTC)
    last_part = _PATH_SEPARATORS.split(request.headers.get("X-Filename", ""))[-1]
    uuid = new_uuid7(int(now.timestamp() * 1000))
    backup_id = uuid + upload_extension(last_part)
    given = "Content-Type" in request.headers and _MIMETYPE.fullmatch(request.content_type)
    return NewBackup(
        location=SystemFolder(system.organization_id, system.system_key).location(backup_id),
        size=size,
        filename=sanitized(last_part)[:MAX_FILENAME] or f"backup-{uuid}",
        mimetype=request.content_type if given else DEFAULT_MIMETYPE,
        # the client: the peer, or what a trusted proxy forwarded (http.client_address)
        uploader_ip=request.remote or "",
        uploaded_at=now,
    )


async def _store(request: web.Request, system: System, size: int) -> BackupInfo:
    config = request.app[CONFIG]
    store = request.app[STORE]
    backup = _new_backup(request, system, size)
    seconds = (
        config.server.request_timeout_seconds
        + size / config.storage.retention.min_rate_bytes_per_second
    )
    staged: StagedBackup | None = None
    committed = False
    try:
        async with asyncio.timeout(seconds):
            stage = functools.partial(store.stage_upload, backup)
            body = _RequestBody(request, size)
            staged = await run_storage(request, "upload", stage, body, "store backup")
            # RFC 9112 §9.3.2: clients do not pipeline after a POST, so whatever follows an
            # upload on its connection is taken as the rest of a body longer than announced.
            if requests_queued_behind(request):
                raise storage_error(UploadIncomplete("more bytes than announced"), "store backup")
            await run_storage(request, "commit", _commit, staged, "store backup")
            committed = True
        return staged.info
    except TimeoutError:
        raise ApiError(408, "upload timed out") from None
    finally:
        if staged is not None and not committed:
            # never awaited here: the request may be cancelled (client gone)
            task = asyncio.ensure_future(staged.discard())
            _DISCARDING.add(task)
            task.add_done_callback(_DISCARDING.discard)


async def _commit(staged: StagedBackup) -> None:
    await staged.commit()


async def _apply_retention(request: web.Request, system: System, keep: str) -> None:
    app = request.app
    assert system.system_key is not None
    usage = app.get(USAGE_COUNTER)

    def pruned(info: BackupInfo, outcome: str) -> None:
        record_prune(request, system.id, info.id, info.size, outcome)
        if usage is not None and outcome == "backup pruned":
            usage.changed(system.organization_id)

    folder = SystemFolder(system.organization_id, system.system_key)
    await app[RETENTION].prune(app[STORE], folder, keep, pruned)
