"""Downloads (DESIGN.md §8): issuing a URL for a backup, and serving local-disk links.

On S3 the URL is presigned by the store; on local disk it is a link to this gateway,
signed by `links`, served from a file descriptor opened by the symlink-refusing walk and
sent with sendfile (`sending`, shared with the appliance's restore) — never aiohttp's
FileResponse, which follows symlinks and serves a sibling `.gz`/`.br` to a client that
accepts one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator

from aiohttp import web

from storage_backends import BackupLocation

from ..config import CONFIG, DownloadConfig
from ..directory import DIRECTORY
from ..http.connections import DescriptorBudget
from ..http.envelope import envelope
from ..http.errors import ApiError
from ..telemetry.metrics import Metrics
from .audit import record_download_issued, record_download_served
from .authorization import authorized_system
from .directory_answer import directory_or_503
from .links import LINKS, InvalidLink
from .names import download_name
from .params import requested_backup_id
from .sending import READ_FAILURE, Delivery, send_backup
from .storage import STORE, run_storage

log = logging.getLogger(__name__)

CONTENT_PATH = "/backups/content/"
# a slot is usually free again within a slow download's budget; a client retries after this
RETRY_AFTER_SECONDS = 5


class OpenBackups:
    """How many local downloads hold an open backup: in all, and per organization.

    A download that never reads holds its connection's descriptor and its file's until its
    budget runs out; without a bound of their own, 800 of them exhausted 1,024 open files
    and every other request failed. Beyond either bound, or when the process's descriptor
    budget (shared with its connections) has no room, a download is refused (503) before
    anything is opened."""

    def __init__(self, config: DownloadConfig) -> None:
        self.limit = config.max_open_backups
        self.per_organization = config.max_open_backups_per_organization
        self.open = 0
        self.refused = 0
        self._by_org: dict[str, int] = {}
        # the serving process's descriptor budget, shared with its connections (serve.py);
        # None where nothing counts connections (an app under test)
        self.descriptors: DescriptorBudget | None = None

    def take(self, organization_id: str) -> bool:
        held = self._by_org.get(organization_id, 0)
        if self.open >= self.limit or held >= self.per_organization:
            self.refused += 1
            return False
        if self.descriptors is not None and not self.descriptors.take_descriptors(1):
            self.refused += 1
            return False
        self.open += 1
        self._by_org[organization_id] = held + 1
        return True

    def give_back(self, organization_id: str) -> None:
        if self.descriptors is not None:
            self.descriptors.give_descriptors(1)
        self.open -= 1
        held = self._by_org.pop(organization_id) - 1
        if held:
            self._by_org[organization_id] = held

    @contextlib.contextmanager
    def slot(self, organization_id: str) -> Iterator[None]:
        """Held while a backup is open: 503 with Retry-After, and the connection closed
        after the answer (a refused client keeps no connection slot either), when none is
        free."""
        if not self.take(organization_id):
            raise ApiError(
                503,
                "too many downloads in progress, retry later",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS), "Connection": "close"},
            )
        try:
            yield
        finally:
            self.give_back(organization_id)

    def export(self, metrics: Metrics) -> None:
        metrics.add_reading(
            "gauge",
            "gateway_open_backups",
            "Backups held open by local downloads",
            lambda: self.open,
        )
        metrics.add_reading(
            "counter",
            "gateway_open_backups_refused",
            "Local downloads refused (503): over storage.download.max_open_backups or its "
            "per-organization share",
            lambda: self.refused,
        )


OPEN_BACKUPS = web.AppKey("open_backups", OpenBackups)


async def download_url(request: web.Request) -> web.Response:
    backup_id = requested_backup_id(request)
    system = await authorized_system(request, request.match_info["id"])
    if system.system_key is None:
        raise ApiError(404, "backup not found")  # not registered, whatever the backend
    app = request.app
    config = app[CONFIG]
    store = app[STORE]
    location = BackupLocation(system.organization_id, system.system_key, backup_id)
    failure = "generate download URL"
    info = await run_storage(request, "describe", store.describe, location, failure)
    ttl = config.storage.download.ttl_seconds
    name = download_name(info.filename, info.id, info.uploaded_at)

    async def presign(target: BackupLocation) -> str:
        return await store.presigned_url(target, name, ttl)

    if store.capabilities.presigns:
        url = await run_storage(request, "presign", presign, location, failure)
        expires_at = int(time.time()) + ttl
        kind = "presigned_url"
    else:  # the gateway serves the bytes itself (serve_content), behind a signed link
        link, expires_at = app[LINKS].issue(system.id, location, ttl)
        base = "" if config.server.base_path == "/" else config.server.base_path
        url = f"{config.server.public_url}{base}{CONTENT_PATH}{link}"
        kind = "link"
    record_download_issued(request, system.id, backup_id, kind, expires_at)
    return envelope(200, "download URL issued", {"download_url": url, "expires_in_seconds": ttl})


def _refused() -> ApiError:
    return ApiError(403, "invalid or expired download link")


async def serve_content(request: web.Request) -> web.StreamResponse:
    """GET or HEAD a local-disk link. No bearer token: the signed link is the capability."""
    app = request.app
    signer = app.get(LINKS)  # only local disk has links
    try:
        if signer is None:
            raise InvalidLink("this gateway issues no links")
        link = signer.verify(request.match_info["link"])
    except InvalidLink as exc:
        log.debug("download link refused: %s", exc)
        raise _refused() from None
    with directory_or_503():
        system = await app[DIRECTORY].system(link.system_id)
    location = link.location
    if (
        system is None
        or system.deleted
        or system.organization_id != location.organization_id
        or system.system_key != location.system_key
    ):
        raise _refused()  # deleted or reassigned since the link was issued: its links die
    delivery = Delivery(outcome="internal server error")
    try:
        with app[OPEN_BACKUPS].slot(location.organization_id):
            reader = await run_storage(
                request, "open", app[STORE].open_reader, location, READ_FAILURE
            )
            try:
                return await send_backup(request, reader, delivery)
            finally:
                await reader.close()
    except ApiError as exc:
        delivery.outcome = exc.message
        raise
    except asyncio.CancelledError:
        delivery.outcome = "cut off"
        raise
    finally:
        outcome = delivery.outcome if delivery.outcome != "complete" else f"{delivery.status}"
        record_download_served(
            request, link.system_id, location.backup_id, link.expires_at, outcome
        )
