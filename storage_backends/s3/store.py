"""The `s3` backend's store on aiobotocore: any S3-compatible store (AWS, Spaces, MinIO,
Ceph RGW). Its neighbours: `listing` (reading XML and metadata back), `uploads` (staging and
copying into place), `errors` (failures as storage errors), `signed` (the hot path's requests).

One client per process, made in `start` and closed in `close`, beside one aiohttp session
for the hot path (`signed`: HeadObject and DeleteObject signed by botocore's signer, a
fifth of aiobotocore's CPU). Deletes are final: on a versioned bucket every version and
delete marker of the exact key is removed, since a plain DeleteObject there only hides the
bytes — the current version last, so a delete cut off part-way never makes an older
write the current one.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

from ..base import (
    BackupEntry,
    BackupInfo,
    BackupListing,
    BackupLocation,
    BackupReader,
    BackupStore,
    FolderSummary,
    KnownMarks,
    NewBackup,
    StagedBackup,
    StoreCapabilities,
    SystemFolder,
    UploadBody,
)
from ..errors import BackupNotFound, BackupProtected, StorageUnavailable
from ..ids import normalize_backup_id
from .botocore_internals import StandardRetries, credentials_expiry
from .errors import Progress, guarded
from .folders import folder_names, folders_of
from .listing import every_key, info_from_headers
from .reader import S3Reader
from .scan import summaries
from .settings import S3Config
from .signed import Answer, SignedRequests
from .state import BackupStates
from .state_keys import NO_STATE, BackupState
from .uploads import Uploads

_Listed = tuple[str, int, datetime]  # a backup's name, size and Last-Modified
A = TypeVar("A")
B = TypeVar("B")

log = logging.getLogger(__name__)

DELETE_OBJECTS_BATCH = 1000  # the S3 API's limit per DeleteObjects call
HEADS_AT_ONCE = 16  # a listing's HeadObject calls in flight at once


class S3BackupStore(BackupStore):
    name = "s3"
    # download URLs: clients fetch the bytes from the store itself; a restore: the gateway
    # streams them (appliances often reach only the gateway's host)
    capabilities = StoreCapabilities(
        stores_uploads=True,
        presigns=True,
        serves_bytes=False,
        streams_restore=True,  # reader: the gateway streams a GetObject itself
        keeps_state=True,  # marks under {prefix}.state/ (state_keys), a legal hold too
        deletes_unprotected_at_once=True,
        lists_folders=True,
    )

    def __init__(self, config: S3Config, operation_timeout: float) -> None:
        self._config = config
        self._timeout = operation_timeout
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._signed: SignedRequests | None = None
        self._presigner: Any = None
        self._uploads: Uploads | None = None
        self._states: BackupStates | None = None
        self._credentials: Any = None
        self._versioned: bool | None = {"on": True, "off": False}.get(config.versioning)

    async def start(self) -> None:
        cfg = self._config
        aio_config = AioConfig(
            connect_timeout=cfg.connect_timeout_seconds,
            read_timeout=cfg.read_timeout_seconds,
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            max_pool_connections=cfg.max_pool_connections,
            s3={"addressing_style": cfg.addressing_style},
            signature_version="s3v4",
        )
        session = get_session()
        if cfg.access_key_id and cfg.secret_access_key:
            session.set_credentials(cfg.access_key_id, cfg.secret_access_key, cfg.session_token)
        # else the standard chain: env, shared files, web identity, container, instance role
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3",
                region_name=cfg.region,
                endpoint_url=cfg.endpoint_url or None,
                config=aio_config,
            )
        )
        http = await self._stack.enter_async_context(
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=cfg.max_pool_connections),
                timeout=aiohttp.ClientTimeout(
                    sock_connect=cfg.connect_timeout_seconds,
                    sock_read=cfg.read_timeout_seconds,
                ),
                auto_decompress=False,
                skip_auto_headers=("User-Agent",),
            )
        )
        # botocore's own presigner says where a key lives (endpoint, addressing style,
        # region): no request is sent, so start-up still contacts nothing.
        probe = await self._client.generate_presigned_url(
            "head_object", Params={"Bucket": cfg.bucket, "Key": "k"}, ExpiresIn=60
        )
        base_url = probe.split("?", 1)[0].removesuffix("/k")
        self._credentials = await session.get_credentials()
        self._signed = SignedRequests(
            base_url,
            self._client.meta.region_name,
            self._credentials,
            http,
            # botocore's standard retry mode, a quota of its own beside the client's
            StandardRetries(cfg.max_attempts, self._client.meta.service_model),
            cfg.bucket,
        )
        self._uploads = Uploads(
            cfg,
            self._timeout,
            self._client,
            self._signed,
            self._require_bucket,
            lambda key: self._delete(key, Progress()),
        )
        self._states = BackupStates(
            cfg.prefix,
            cfg.bucket,
            self._client,
            self._signed,
            lambda key: self._delete(key, Progress()),
        )
        self._presigner = self._client
        if cfg.presign_endpoint_url:
            self._presigner = await self._stack.enter_async_context(
                session.create_client(
                    "s3",
                    region_name=cfg.region,
                    endpoint_url=cfg.presign_endpoint_url,
                    config=aio_config,
                )
            )

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None
            self._signed = None
            self._uploads = None
            self._states = None
            self._presigner = None

    def key_for(self, location: BackupLocation) -> str:
        # The prefix is joined exactly as written: "tenant-a/" carries its own slash.
        return self._config.prefix + location.relative_key

    async def delete(self, location: BackupLocation) -> None:
        progress = Progress()
        await self._guarded(progress, self._delete_backup(location, progress))

    async def _delete_backup(self, location: BackupLocation, progress: Progress) -> None:
        """The backup, then its marks: a delete cut off between the two leaves a stale mark,
        which makes nothing appear (a mark is read only for a listed backup), never a
        backup without its protection. A protected backup never gets here (the gateway
        refuses first); with Object Lock its legal hold makes the store refuse too.

        The marks are listed after the delete, not beside its HEAD: a store's requests
        come in one order (the fault tests number them)."""
        await self._delete(self.key_for(location), progress)
        states = self._backup_states()
        try:
            marks = await states.keys_of(location)
        except StorageUnavailable as exc:
            log.warning("s3 state of a deleted backup %s not listed: %s", location.backup_id, exc)
            return
        await states.drop(location, marks)

    async def delete_unprotected_now(self, location: BackupLocation) -> int | None:
        progress = Progress("head_object")
        size: int = await self._guarded(progress, self._delete_unprotected(location, progress))
        return size

    async def _delete_unprotected(self, location: BackupLocation, progress: Progress) -> int:
        """The HeadObject (404), the backup's marks (protected: refused, nothing done), the
        delete, then the same marks dropped: three requests where a look, then a delete,
        sent five (the HEAD and the marks' listing twice). No folder lock to take: S3
        deletes hold this process's lock only, and a legal hold guards a protected backup
        in the store itself."""
        key = self.key_for(location)
        head = await self._head_existing(key, progress)
        try:
            size = int(head.headers["Content-Length"])
        except (KeyError, TypeError, ValueError):
            raise StorageUnavailable("HeadObject answer without a size") from None
        progress.step = "list_objects_v2"
        states = self._backup_states()
        marks = await states.keys_of(location)
        if states.state_in(location, marks).protected:
            raise BackupProtected(location.relative_key)
        await self._delete(key, progress, looked=True)
        await states.drop(location, marks)
        return size

    def folder_prefix(self, folder: SystemFolder) -> str:
        return f"{self._config.prefix}{folder.organization_id}/{folder.system_key}/"

    async def list_backups(self, folder: SystemFolder) -> list[BackupInfo]:
        progress = Progress("list_objects_v2")
        result: list[BackupInfo] = await self._guarded(progress, self._list(folder, progress))
        return result

    async def list_newest(self, folder: SystemFolder, limit: int) -> BackupListing:
        progress = Progress("list_objects_v2")
        result: BackupListing = await self._guarded(progress, self._newest(folder, limit, progress))
        return result

    async def list_entries(self, folder: SystemFolder) -> list[BackupEntry]:
        progress = Progress("list_objects_v2")
        listed: list[_Listed] = await self._guarded(progress, self._keys(folder, progress))
        return [BackupEntry(name, size) for name, size, _ in listed]

    async def _newest(self, folder: SystemFolder, limit: int, progress: Progress) -> BackupListing:
        """Count and bytes from the listing itself; a HEAD only for the `limit` largest ids
        (UUIDv7: the newest), never one per object (10,000 HEADs took the whole timeout)."""
        listed, states = await _together(
            self._keys(folder, progress), self._backup_states().of_system(folder)
        )
        chosen = heapq.nlargest(limit, listed)
        described = await self._describe_listed(
            self.folder_prefix(folder), chosen, states, progress
        )
        # one deleted between the listing and its HEAD is left out, and out of the totals
        gone = {name for name, _, _ in chosen} - {info.id for info in described}
        kept = [entry for entry in listed if entry[0] not in gone]
        return BackupListing(described, len(kept), sum(size for _, size, _ in kept))

    async def _list(self, folder: SystemFolder, progress: Progress) -> list[BackupInfo]:
        listed, states = await _together(
            self._keys(folder, progress), self._backup_states().of_system(folder)
        )
        return await self._describe_listed(self.folder_prefix(folder), listed, states, progress)

    async def _keys(self, folder: SystemFolder, progress: Progress) -> list[_Listed]:
        """(name, size, last modified) of every backup id directly under the folder."""
        prefix = self.folder_prefix(folder)
        listed: list[_Listed] = []
        for key, size, modified in await every_key(self._signed_requests(), prefix):
            name = key[len(prefix) :] if key.startswith(prefix) else ""
            if normalize_backup_id(name) == name:  # directly under, and a backup id
                listed.append((name, size, modified))
        return listed

    async def _describe_listed(
        self,
        prefix: str,
        listed: list[_Listed],
        states: dict[str, BackupState],
        progress: Progress,
    ) -> list[BackupInfo]:
        """The metadata is the object's: one HeadObject each, a few at a time; the state is
        the system's listing of marks."""
        progress.step = "head_object"
        gate = asyncio.Semaphore(HEADS_AT_ONCE)

        async def described(name: str, size: int, modified: datetime) -> BackupInfo | None:
            async with gate:
                head = await self._signed_requests().head(prefix + name)
            if head.status == 404:
                return None  # deleted while we listed
            if head.status != 200:
                raise StorageUnavailable(f"HTTP {head.status}")
            info = info_from_headers(
                name, size, modified.astimezone(UTC), head.headers, prefix + name
            )
            return with_state(info, states.get(name, NO_STATE))

        found = await asyncio.gather(*(described(*entry) for entry in listed))
        return [info for info in found if info is not None]

    async def describe(self, location: BackupLocation) -> BackupInfo:
        progress = Progress("head_object")
        result: BackupInfo = await self._guarded(progress, self._describe(location, progress))
        return result

    async def _head_existing(self, key: str, progress: Progress) -> Answer:
        """HeadObject's answer for a key that exists; BackupNotFound when it does not."""
        progress.step = "head_object"
        head = await self._signed_requests().head(key)
        if head.status == 404:
            # HEAD answers a bodiless 404 for a missing bucket too; tell the two apart.
            progress.step = "head_bucket"
            await self._require_bucket()
            raise BackupNotFound(key)
        if head.status != 200:
            raise StorageUnavailable(f"HTTP {head.status}")
        return head

    async def _describe(self, location: BackupLocation, progress: Progress) -> BackupInfo:
        # one after the other, so a store's requests come in one order (the fault tests
        # number them): the HEAD says 404 before any state is read
        head = await self._head_existing(self.key_for(location), progress)
        progress.step = "list_objects_v2"
        state = await self._backup_states().of_backup(location)
        try:
            modified = parsedate_to_datetime(head.headers["Last-Modified"]).astimezone(UTC)
            size = int(head.headers["Content-Length"])
        except (KeyError, TypeError, ValueError):
            raise StorageUnavailable("HeadObject answer without Last-Modified or size") from None
        key = self.key_for(location)
        info = info_from_headers(location.backup_id, size, modified, head.headers, key)
        return with_state(info, state)

    async def open_reader(self, location: BackupLocation) -> BackupReader:
        """The HeadObject now (404, the size and the metadata the headers need); the bytes
        when the caller reads them (`reader`)."""
        info = await self.describe(location)
        key = self.key_for(location)
        return S3Reader(info, self._client, self._config.bucket, key, self._timeout)

    async def set_protected(self, location: BackupLocation, protected: bool) -> None:
        progress = Progress("head_object")
        await self._guarded(progress, self._set_protected(location, protected, progress))

    async def _set_protected(
        self, location: BackupLocation, protected: bool, progress: Progress
    ) -> None:
        """The legal hold first, the mark (what the gateway reads back) last: a change cut
        off part-way still reads as it was, so the caller's retry redoes both."""
        key = self.key_for(location)
        await self._head_existing(key, progress)
        states = self._backup_states()
        if self._config.object_lock:
            progress.step = "put_object_legal_hold"
            await states.hold(key, protected)
        progress.step = "put_object" if protected else "delete_state"
        await states.mark_protected(location, protected)

    async def set_verified(self, location: BackupLocation, integrity: str, at: datetime) -> None:
        progress = Progress("head_object")
        await self._guarded(progress, self._set_verified(location, integrity, at, progress))

    async def _set_verified(
        self, location: BackupLocation, integrity: str, at: datetime, progress: Progress
    ) -> None:
        await self._head_existing(self.key_for(location), progress)
        progress.step = "put_object"
        await self._backup_states().mark_verified(location, integrity, at)

    async def system_folders(self) -> list[SystemFolder]:
        """Every system folder (`folders`), each listing bounded in time on its own: a
        bucket of many organizations takes one listing each."""
        root = self._config.prefix
        found: list[SystemFolder] = []
        for organization_id in await self._folder_names(root):
            keys = await self._folder_names(f"{root}{organization_id}/")
            found.extend(folders_of(organization_id, keys))
        return found

    async def _folder_names(self, prefix: str) -> list[str]:
        progress = Progress("list_objects_v2")
        work = folder_names(self._client, self._config.bucket, prefix)
        names: list[str] = await self._guarded(progress, work)
        return names

    def folder_summaries(
        self, known: KnownMarks | None = None
    ) -> AsyncIterator[list[FolderSummary]]:
        """One paginated listing of the whole prefix (`scan`), each page a signed request
        bounded in time on its own. A prefix has no mark of its own that a change to its
        objects moves, so every scan reads every folder (`known` is not used)."""
        return summaries(self._scan_page, self._config.prefix)

    async def _scan_page(self, query: dict[str, str]) -> bytes:
        progress = Progress("list_objects_v2")
        page: bytes = await self._guarded(progress, self._list_bucket(query))
        return page

    async def _list_bucket(self, query: dict[str, str]) -> bytes:
        page = await self._signed_requests().send("GET", "", query)
        if page.status != 200:
            raise StorageUnavailable(f"HTTP {page.status}")
        return page.body

    async def presigned_url(
        self, location: BackupLocation, download_name: str, ttl_seconds: int
    ) -> str:
        ttl = ttl_seconds
        # Never valid beyond temporary credentials.
        expiry = credentials_expiry(self._credentials)
        if expiry is not None:
            ttl = max(1, min(ttl, int((expiry - datetime.now(UTC)).total_seconds())))
        url: str = await self._presigner.generate_presigned_url(
            "get_object",
            Params={
                "Bucket": self._config.bucket,
                "Key": self.key_for(location),
                "ResponseContentDisposition": f'attachment; filename="{download_name}"',
            },
            ExpiresIn=ttl,
        )
        return url

    async def stage_upload(self, backup: NewBackup, body: UploadBody) -> StagedBackup:
        """Stream the body to a staging key, copied into place by `commit` (`uploads`)."""
        assert self._uploads is not None, "store not started"
        return await self._uploads.stage(backup, body, self.key_for(backup.location))

    async def organization_usage(self, organization_id: str) -> int:
        prefix = f"{self._config.prefix}{organization_id}/"
        progress = Progress("list_objects_v2")
        total: int = await self._guarded(progress, self._usage(prefix))
        return total

    async def _usage(self, prefix: str) -> int:
        total = 0
        paginator = self._client.get_paginator("list_objects_v2")
        async for page in paginator.paginate(Bucket=self._config.bucket, Prefix=prefix):
            for entry in page.get("Contents", []):
                name = entry["Key"].rsplit("/", 1)[-1]
                depth = entry["Key"].count("/") - prefix.count("/")
                if depth == 1 and normalize_backup_id(name) == name:  # {org}/{key}/{id}
                    total += int(entry.get("Size", 0))
        return total

    def _backup_states(self) -> BackupStates:
        assert self._states is not None, "store not started"
        return self._states

    def _signed_requests(self) -> SignedRequests:
        assert self._signed is not None, "store not started"
        return self._signed

    async def check_ready(self) -> None:
        progress = Progress("head_bucket")
        await self._guarded(progress, self._client.head_bucket(Bucket=self._config.bucket))

    async def _guarded(self, progress: Progress, work: Any) -> Any:
        return await guarded(progress, work, self._timeout)

    async def _is_versioned(self) -> bool:
        if self._versioned is None:
            answer = await self._client.get_bucket_versioning(Bucket=self._config.bucket)
            # Suspended still keeps the versions written while it was enabled.
            self._versioned = answer.get("Status") in ("Enabled", "Suspended")
        return self._versioned

    async def _delete(self, key: str, progress: Progress, looked: bool = False) -> None:
        """`looked`: the caller's HeadObject found the key, none is sent again."""
        progress.step = "get_bucket_versioning"
        if await self._is_versioned():
            await self._delete_every_version(key, progress)
        else:
            await self._delete_current(key, progress, looked)

    async def _delete_current(self, key: str, progress: Progress, looked: bool) -> None:
        if not looked:
            await self._head_existing(key, progress)
        progress.step = "delete_object"
        deleted = await self._signed_requests().delete(key)
        if deleted.status not in (200, 204):
            raise StorageUnavailable(f"HTTP {deleted.status}")

    async def _require_bucket(self) -> None:
        """HeadBucket before every upload, as a signed request (aiobotocore's costs ~1.5 ms
        of CPU, a sixth of a small upload's): some stores (SeaweedFS) create a missing
        bucket on a write, and the gateway never creates buckets."""
        answer = await self._signed_requests().send("HEAD", "")
        if answer.status != 200:
            raise StorageUnavailable(f"bucket check failed: HTTP {answer.status}")

    async def _delete_every_version(self, key: str, progress: Progress) -> None:
        versions: list[dict[str, str]] = []
        current: str | None = None
        kwargs: dict[str, str] = {"Bucket": self._config.bucket, "Prefix": key}
        progress.step = "list_object_versions"
        while True:
            page = await self._client.list_object_versions(**kwargs)
            for entry in page.get("Versions", []):
                # Prefix listing also returns "key.meta.json", "key2", ...: keep the exact key only.
                if entry["Key"] == key:
                    versions.append({"Key": key, "VersionId": entry["VersionId"]})
                    if entry.get("IsLatest"):
                        current = entry["VersionId"]
            for entry in page.get("DeleteMarkers", []):
                if entry["Key"] == key:
                    versions.append({"Key": key, "VersionId": entry["VersionId"]})
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]
        if current is None:
            # Absent, or already hidden behind a delete marker: the backup is not there to delete.
            raise BackupNotFound(key)
        progress.step = "delete_objects"
        # The current version goes last, in a call of its own: one batch's deletions may be
        # applied in any order, and a delete cut off part-way must leave the key serving
        # what it served (or nothing), never an older write.
        older = [v for v in versions if v["VersionId"] != current]
        batches = [
            older[i : i + DELETE_OBJECTS_BATCH] for i in range(0, len(older), DELETE_OBJECTS_BATCH)
        ]
        for batch in [*batches, [{"Key": key, "VersionId": current}]]:
            answer = await self._client.delete_objects(
                Bucket=self._config.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            errors = answer.get("Errors", [])
            if errors:
                raise StorageUnavailable(
                    f"{len(errors)} versions not deleted, first: {errors[0].get('Code')}"
                )


def with_state(info: BackupInfo, state: BackupState) -> BackupInfo:
    if state == NO_STATE:
        return info
    return replace(
        info,
        protected=state.protected,
        integrity=state.integrity,
        verified_at=state.verified_at,
    )


async def _together(first: Awaitable[A], second: Awaitable[B]) -> tuple[A, B]:
    """Both at once, neither left running when the other fails; the first's failure wins."""
    one, two = await asyncio.gather(first, second, return_exceptions=True)
    for result in (one, two):
        if isinstance(result, BaseException):
            raise result
    return one, two  # type: ignore[return-value]
