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
import logging
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from ..base import BackupLocation, BackupStore
from ..errors import BackupNotFound, StorageUnavailable
from .settings import S3Config
from .signed import SignedRequests

log = logging.getLogger(__name__)

DELETE_OBJECTS_BATCH = 1000  # the S3 API's limit per DeleteObjects call


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

    def __init__(self, config: S3Config, operation_timeout: float) -> None:
        self._config = config
        self._timeout = operation_timeout
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._signed: SignedRequests | None = None
        self._versioned: bool | None = {"on": True, "off": False}.get(config.versioning)

    async def start(self) -> None:
        cfg = self._config
        aio_config = AioConfig(
            connect_timeout=cfg.connect_timeout_seconds,
            read_timeout=cfg.read_timeout_seconds,
            retries={"mode": "standard", "total_max_attempts": cfg.max_attempts},
            max_pool_connections=cfg.max_pool_connections,
            s3={"addressing_style": cfg.addressing_style},
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
        self._signed = SignedRequests(
            base_url,
            self._client.meta.region_name,
            await session.get_credentials(),
            http,
            cfg.max_attempts,
        )

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None
            self._signed = None

    def key_for(self, location: BackupLocation) -> str:
        # The prefix is joined exactly as written: "tenant-a/" carries its own slash.
        return self._config.prefix + location.relative_key

    async def delete(self, location: BackupLocation) -> None:
        key = self.key_for(location)
        progress = _Progress()
        await self._guarded(progress, self._delete(key, progress))

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
        assert self._signed is not None, "store not started"
        progress.step = "head_object"
        head = await self._signed.head(key)
        if head.status == 404:
            # HEAD answers a bodiless 404 for a missing bucket too; tell the two apart.
            progress.step = "head_bucket"
            await self._require_bucket()
            raise BackupNotFound(key)
        if head.status != 200:
            raise StorageUnavailable(f"HTTP {head.status}")
        progress.step = "delete_object"
        deleted = await self._signed.delete(key)
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
