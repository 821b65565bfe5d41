"""The `s3` backend on aiobotocore: any S3-compatible store (AWS, Spaces, MinIO, Ceph RGW).

One client per process, made in `start` and closed in `close`, beside one aiohttp session
for the hot path (`signed`: HeadObject and DeleteObject signed by botocore's signer, a
fifth of aiobotocore's CPU). Deletes are final: on a versioned bucket every version and
delete marker of the exact key is removed, since a plain DeleteObject there only hides the
bytes — the current version last, so a delete cut off part-way never makes an older
write the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, unquote
from xml.etree import ElementTree

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..base import (
    DEFAULT_MIMETYPE,
    BackupInfo,
    BackupLocation,
    BackupStore,
    NewBackup,
    StagedBackup,
    StoreCapabilities,
    SystemFolder,
    UploadBody,
)
from ..errors import BackupNotFound, InsufficientStorage, StorageUnavailable, UploadIncomplete
from ..ids import normalize_backup_id
from .botocore_internals import credentials_expiry
from .settings import S3Config
from .signed import Answer, SignedRequests

log = logging.getLogger(__name__)

DELETE_OBJECTS_BATCH = 1000  # the S3 API's limit per DeleteObjects call
HEADS_AT_ONCE = 16  # a listing's HeadObject calls in flight at once
_SHA256_CHARS = frozenset("0123456789abcdef")
# Uploads are staged under this prefix (never a system's folder, so never listed or counted)
# and copied into place with their metadata: a lifecycle rule on it clears what a crash left.
STAGING_PREFIX = ".uploads/"
STREAM_CHUNK_BYTES = 1024 * 1024
# a store's answer to a PUT, a part or a CopyObject may take this long per byte it persists,
# beyond the read (or operation) timeout
PERSIST_SECONDS_PER_BYTE = 1 / (20 * 1024**2)


class _Progress:
    """The step an operation has reached, so a failure can say what it may have done."""

    __slots__ = ("step",)

    def __init__(self, step: str = "start") -> None:
        self.step = step


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def _http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


class S3BackupStore(BackupStore):
    name = "s3"
    # clients fetch the bytes from the store itself; a restore streamed through the gateway
    # comes with its route
    capabilities = StoreCapabilities(
        stores_uploads=True, presigns=True, serves_bytes=False, streams_restore=False
    )

    def __init__(self, config: S3Config, operation_timeout: float) -> None:
        self._config = config
        self._timeout = operation_timeout
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._signed: SignedRequests | None = None
        self._presigner: Any = None
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
            cfg.max_attempts,
            cfg.bucket,
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
            self._presigner = None

    def key_for(self, location: BackupLocation) -> str:
        # The prefix is joined exactly as written: "tenant-a/" carries its own slash.
        return self._config.prefix + location.relative_key

    async def delete(self, location: BackupLocation) -> None:
        key = self.key_for(location)
        progress = _Progress()
        await self._guarded(progress, self._delete(key, progress))

    def folder_prefix(self, folder: SystemFolder) -> str:
        return f"{self._config.prefix}{folder.organization_id}/{folder.system_key}/"

    async def list_backups(self, folder: SystemFolder) -> list[BackupInfo]:
        progress = _Progress("list_objects_v2")
        result: list[BackupInfo] = await self._guarded(progress, self._list(folder, progress))
        return result

    async def _list(self, folder: SystemFolder, progress: _Progress) -> list[BackupInfo]:
        prefix = self.folder_prefix(folder)
        listed: list[tuple[str, int, datetime]] = []
        continuation: str | None = None
        while True:
            page = await self._signed_requests().list_page(prefix, continuation)
            if page.status != 200:
                raise StorageUnavailable(f"HTTP {page.status}")
            entries, continuation = _list_page(page.body)
            for key, size, modified in entries:
                name = key[len(prefix) :] if key.startswith(prefix) else ""
                if normalize_backup_id(name) == name:  # directly under, and a backup id
                    listed.append((name, size, modified))
            if continuation is None:
                break
        # The metadata is the object's: one HeadObject each, a few at a time.
        progress.step = "head_object"
        gate = asyncio.Semaphore(HEADS_AT_ONCE)

        async def described(name: str, size: int, modified: datetime) -> BackupInfo | None:
            async with gate:
                head = await self._signed_requests().head(prefix + name)
            if head.status == 404:
                return None  # deleted while we listed
            if head.status != 200:
                raise StorageUnavailable(f"HTTP {head.status}")
            return _info(name, size, modified.astimezone(UTC), head.headers)

        found = await asyncio.gather(*(described(*entry) for entry in listed))
        return [info for info in found if info is not None]

    async def describe(self, location: BackupLocation) -> BackupInfo:
        progress = _Progress("head_object")
        result: BackupInfo = await self._guarded(progress, self._describe(location, progress))
        return result

    async def _head_existing(self, key: str, progress: _Progress) -> Answer:
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

    async def _describe(self, location: BackupLocation, progress: _Progress) -> BackupInfo:
        head = await self._head_existing(self.key_for(location), progress)
        try:
            modified = parsedate_to_datetime(head.headers["Last-Modified"]).astimezone(UTC)
            size = int(head.headers["Content-Length"])
        except (KeyError, TypeError, ValueError):
            raise StorageUnavailable("HeadObject answer without Last-Modified or size") from None
        return _info(location.backup_id, size, modified, head.headers)

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
        """Stream the body to a staging key (one PUT, or parts above the threshold)."""
        staging = f"{self._config.prefix}{STAGING_PREFIX}{secrets.token_hex(16)}"
        digest = hashlib.sha256()
        signed = self._signed_requests()
        cfg = self._config
        feed = _Feed(body, digest)
        upload_id: str | None = None
        step = "put_object"
        try:
            # Some stores (SeaweedFS) create a missing bucket on PutObject: the gateway never
            # creates buckets, and a missing one is a 502 here as on every other route.
            step = "head_bucket"
            await self._require_bucket()
            step = "put_object"
            if backup.size <= cfg.multipart_threshold_bytes:
                answer = await signed.put_stream(
                    staging,
                    backup.size,
                    feed.chunks(backup.size),
                    read_seconds=self._answer_seconds(backup.size),
                )
                _require_ok(answer, step)
            else:
                step = "create_multipart_upload"
                created = await self._client.create_multipart_upload(Bucket=cfg.bucket, Key=staging)
                upload_id = created["UploadId"]
                parts = []
                remaining = backup.size
                number = 0
                step = "upload_part"
                while remaining:
                    number += 1
                    size = min(cfg.multipart_part_bytes, remaining)
                    answer = await signed.put_stream(
                        staging,
                        size,
                        feed.chunks(size),
                        {"partNumber": str(number), "uploadId": upload_id},
                        read_seconds=self._answer_seconds(size),
                    )
                    _require_ok(answer, step)
                    etag = next((v for k, v in answer.headers.items() if k.lower() == "etag"), "")
                    parts.append({"PartNumber": number, "ETag": etag})
                    remaining -= size
                step = "complete_multipart_upload"
                await self._client.complete_multipart_upload(
                    Bucket=cfg.bucket,
                    Key=staging,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                )
                upload_id = None
        except BaseException as exc:
            # never awaited here: the caller may be cancelled (deadline, client gone)
            _background(self._remove_staging(staging, upload_id))
            if feed.error is not None:
                raise feed.error from None  # the client's body, not the store, failed
            if isinstance(exc, InsufficientStorage):
                raise
            if isinstance(exc, _STORE_FAILURES):
                log.warning("s3 %s of an upload failed: %s; nothing was stored", step, _reason(exc))
                raise StorageUnavailable(_reason(exc)) from None
            raise
        final = self.key_for(backup.location)
        return _StagedS3(self, staging, final, backup.info(digest.hexdigest()), backup.uploader_ip)

    def _answer_seconds(self, size: int) -> float:
        """How long a store may take to answer once it has `size` new bytes to persist."""
        return self._config.read_timeout_seconds + size * PERSIST_SECONDS_PER_BYTE

    async def _remove_staging(self, staging: str, upload_id: str | None) -> None:
        """Best effort: a staging key (or multipart upload) nobody will commit."""
        try:
            async with asyncio.timeout(self._timeout):
                if upload_id is not None:
                    await self._client.abort_multipart_upload(
                        Bucket=self._config.bucket, Key=staging, UploadId=upload_id
                    )
                with contextlib.suppress(BackupNotFound):  # never written: nothing to remove
                    await self._delete(staging, _Progress())
        except (TimeoutError, *_STORE_FAILURES) as exc:
            log.warning(
                "s3 staging key not removed (a lifecycle rule on %s clears it): %s",
                STAGING_PREFIX,
                _reason(exc),
            )

    async def _copy_into_place(self, staging: str, final: str, info: BackupInfo, ip: str) -> None:
        """CopyObject with the metadata: the backup appears whole, checksum and all."""
        headers = {
            "x-amz-metadata-directive": "REPLACE",
            "Content-Type": info.mimetype,
            # S3 metadata is ASCII: the filename goes percent-encoded, read back decoded
            "x-amz-meta-filename": quote(info.filename, safe=""),
            "x-amz-meta-sha256": info.sha256,
            "x-amz-meta-uploader-ip": ip,
            "x-amz-meta-uploaded-at": info.uploaded_at.isoformat(timespec="milliseconds"),
        }
        seconds = self._timeout + info.size * PERSIST_SECONDS_PER_BYTE
        answer = await self._signed_requests().copy(staging, final, headers, seconds)

        # a long copy may answer 200 and report its failure in the body
        if b"<Error>" in answer.body:
            answer = Answer(500 if answer.status == 200 else answer.status, {}, answer.body)
        _require_ok(answer, "copy_object")

    async def organization_usage(self, organization_id: str) -> int:
        prefix = f"{self._config.prefix}{organization_id}/"
        progress = _Progress("list_objects_v2")
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

    def _signed_requests(self) -> SignedRequests:
        assert self._signed is not None, "store not started"
        return self._signed

    async def check_ready(self) -> None:
        progress = _Progress("head_bucket")
        await self._guarded(progress, self._client.head_bucket(Bucket=self._config.bucket))

    async def _guarded(self, progress: _Progress, work: Any) -> Any:
        """Bound the whole operation in time and turn every failure into a typed error.

        The warning names the step that failed. When that step was a delete call, the
        store may have applied it before the answer was lost: the log says so, and a retry
        of the same request settles it (404 once the object is gone).
        """
        try:
            async with asyncio.timeout(self._timeout):
                return await work
        except BackupNotFound:
            raise
        except StorageUnavailable as exc:
            reason: str = str(exc)
        except TimeoutError:
            reason = f"timed out after {self._timeout:.1f}s"
        except ClientError as exc:
            reason = f"{_error_code(exc)} (HTTP {_http_status(exc)})"
            log.debug("s3 %s error detail: %s", progress.step, exc)
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            reason = type(exc).__name__
            log.debug("s3 %s error detail: %s", progress.step, exc)
        if progress.step in ("delete_object", "delete_objects"):
            log.warning(
                "s3 %s failed: %s; outcome unknown, the object may already be deleted",
                progress.step,
                reason,
            )
        else:
            log.warning("s3 %s failed: %s; nothing was deleted", progress.step, reason)
        raise StorageUnavailable(reason)

    async def _is_versioned(self) -> bool:
        if self._versioned is None:
            answer = await self._client.get_bucket_versioning(Bucket=self._config.bucket)
            # Suspended still keeps the versions written while it was enabled.
            self._versioned = answer.get("Status") in ("Enabled", "Suspended")
        return self._versioned

    async def _delete(self, key: str, progress: _Progress) -> None:
        progress.step = "get_bucket_versioning"
        if await self._is_versioned():
            await self._delete_every_version(key, progress)
        else:
            await self._delete_current(key, progress)

    async def _delete_current(self, key: str, progress: _Progress) -> None:
        await self._head_existing(key, progress)
        progress.step = "delete_object"
        deleted = await self._signed_requests().delete(key)
        if deleted.status not in (200, 204):
            raise StorageUnavailable(f"HTTP {deleted.status}")

    async def _require_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self._config.bucket)
        except ClientError as exc:
            raise StorageUnavailable(f"bucket check failed: {_error_code(exc)}") from None

    async def _delete_every_version(self, key: str, progress: _Progress) -> None:
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


def _info(backup_id: str, size: int, modified: datetime, headers: dict[str, str]) -> BackupInfo:
    """A listing entry from an object's HeadObject headers (x-amz-meta-*, Content-Type)."""
    lower = {k.lower(): v for k, v in headers.items()}
    filename = unquote(lower.get("x-amz-meta-filename", ""))
    sha256 = lower.get("x-amz-meta-sha256", "")
    uploaded = lower.get("x-amz-meta-uploaded-at", "")
    return BackupInfo(
        id=backup_id,
        size=size,
        filename=filename if 0 < len(filename) <= 1024 else backup_id,
        sha256=sha256 if len(sha256) == 64 and set(sha256) <= _SHA256_CHARS else "",
        mimetype=lower.get("content-type") or DEFAULT_MIMETYPE,
        uploaded_at=_uploaded_at(uploaded, modified),
    )


def _uploaded_at(value: str, modified: datetime) -> datetime:
    """The gateway's own upload time (milliseconds), else the object's Last-Modified."""
    try:
        parsed = datetime.fromisoformat(value) if value else None
    except ValueError:
        parsed = None
    return parsed.astimezone(UTC) if parsed is not None and parsed.tzinfo else modified


_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def _list_page(body: bytes) -> tuple[list[tuple[str, int, datetime]], str | None]:
    """(key, size, last modified) of a ListObjectsV2 page, and the next page's token."""
    try:
        # The configured store's answer; expat >= 2.4 bounds entity amplification.
        root = ElementTree.fromstring(body)  # noqa: S314
        ns = _S3_NS if root.tag.startswith(_S3_NS) else ""
        entries = []
        for item in root.iter(f"{ns}Contents"):
            key = item.findtext(f"{ns}Key") or ""
            size = int(item.findtext(f"{ns}Size") or "0")
            modified = datetime.fromisoformat(item.findtext(f"{ns}LastModified") or "")
            entries.append((key, size, modified.astimezone(UTC)))
        truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
        token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    except (ElementTree.ParseError, ValueError) as exc:
        raise StorageUnavailable(f"unreadable ListObjectsV2 answer: {type(exc).__name__}") from None
    if truncated and not token:
        raise StorageUnavailable("truncated ListObjectsV2 answer without a continuation token")
    return entries, token


# answers of a store that is out of space or over its quota (MinIO, Ceph RGW, SeaweedFS)
_FULL_CODES = (b"<Code>XMinioStorageFull", b"<Code>QuotaExceeded", b"<Code>EntityTooLarge")
_STORE_FAILURES = (
    StorageUnavailable,
    ClientError,
    BotoCoreError,
    aiohttp.ClientError,
    OSError,
)
_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(work: Any) -> None:
    task = asyncio.ensure_future(work)
    _BACKGROUND.add(task)  # a reference, so the task is not collected half-way
    task.add_done_callback(_BACKGROUND.discard)


class _Feed:
    """The request body as an S3 request body: hashed on the way. A failure of the body
    itself (cut short, client gone) is kept, since the HTTP client reports it as its own
    connection error."""

    def __init__(self, body: UploadBody, digest: Any) -> None:
        self._body = body
        self._digest = digest
        self.error: UploadIncomplete | None = None

    async def chunks(self, size: int) -> AsyncIterator[bytes]:
        remaining = size
        while remaining:
            try:
                data = await self._body.read(min(remaining, STREAM_CHUNK_BYTES))
            except UploadIncomplete as exc:
                self.error = exc
                raise
            self._digest.update(data)
            remaining -= len(data)
            yield data


class _StagedS3(StagedBackup):
    def __init__(
        self, store: S3BackupStore, staging: str, final: str, info: BackupInfo, ip: str
    ) -> None:
        super().__init__(info)
        self._store = store
        self._staging = staging
        self._final = final
        self._ip = ip

    async def commit(self) -> None:
        try:
            await self._store._copy_into_place(self._staging, self._final, self.info, self._ip)
        except (TimeoutError, *_STORE_FAILURES) as exc:
            # A copy whose answer was lost may have landed: the new id is nobody's yet, so
            # remove it rather than leave an upload the caller was told failed.
            log.warning("s3 copy_object of an upload failed: %s; removing it", _reason(exc))
            _background(self._store._remove_staging(self._final, None))
            _background(self._store._remove_staging(self._staging, None))
            raise StorageUnavailable(_reason(exc)) from None
        except BaseException:
            _background(self._store._remove_staging(self._staging, None))
            raise
        # before the answer, so a 201 leaves exactly the backup (a failure here is logged)
        await self._store._remove_staging(self._staging, None)

    async def discard(self) -> None:
        await self._store._remove_staging(self._staging, None)


def _require_ok(answer: Answer, step: str) -> None:
    if answer.status == 200:
        return
    if answer.status == 507 or any(code in answer.body for code in _FULL_CODES):
        raise InsufficientStorage(f"{step}: HTTP {answer.status}")
    raise StorageUnavailable(f"{step}: HTTP {answer.status}")


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return f"{_error_code(exc)} (HTTP {_http_status(exc)})"
    if isinstance(exc, StorageUnavailable):
        return str(exc)
    return type(exc).__name__
