"""The `s3` backend on aiobotocore: any S3-compatible store (AWS, Spaces, MinIO, Ceph RGW).

One client per process, made in `start` and closed in `close`. Deletes are
final: on a versioned bucket every version and delete marker of the exact key
is removed, since a plain DeleteObject there only hides the bytes.
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
        credentials: dict[str, str] = {}
        if cfg.access_key_id and cfg.secret_access_key:
            credentials = {
                "aws_access_key_id": cfg.access_key_id,
                "aws_secret_access_key": cfg.secret_access_key,
            }
            if cfg.session_token:
                credentials["aws_session_token"] = cfg.session_token
        self._stack = AsyncExitStack()
        self._client = await self._stack.enter_async_context(
            get_session().create_client(
                "s3",
                region_name=cfg.region,
                endpoint_url=cfg.endpoint_url or None,
                config=aio_config,
                **credentials,
            )
        )

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
            self._stack = None
            self._client = None

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
        bucket = self._config.bucket
        try:
            progress.step = "head_object"
            await self._client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if _http_status(exc) != 404:
                raise
            # HEAD answers a bodiless 404 for a missing bucket too; tell the two apart.
            progress.step = "head_bucket"
            await self._require_bucket()
            raise BackupNotFound(key) from None
        progress.step = "delete_object"
        await self._client.delete_object(Bucket=bucket, Key=key)

    async def _require_bucket(self) -> None:
        try:
            await self._client.head_bucket(Bucket=self._config.bucket)
        except ClientError as exc:
            raise StorageUnavailable(f"bucket check failed: {_error_code(exc)}") from None

    async def _delete_every_version(self, key: str, progress: _Progress) -> None:
        versions: list[dict[str, str]] = []
        has_current = False
        kwargs: dict[str, str] = {"Bucket": self._config.bucket, "Prefix": key}
        progress.step = "list_object_versions"
        while True:
            page = await self._client.list_object_versions(**kwargs)
            for entry in page.get("Versions", []):
                # Prefix listing also returns "key.meta.json", "key2", ...: keep the exact key only.
                if entry["Key"] == key:
                    versions.append({"Key": key, "VersionId": entry["VersionId"]})
                    has_current = has_current or bool(entry.get("IsLatest"))
            for entry in page.get("DeleteMarkers", []):
                if entry["Key"] == key:
                    versions.append({"Key": key, "VersionId": entry["VersionId"]})
            if not page.get("IsTruncated"):
                break
            kwargs["KeyMarker"] = page["NextKeyMarker"]
            kwargs["VersionIdMarker"] = page["NextVersionIdMarker"]
        if not has_current:
            # Absent, or already hidden behind a delete marker: the backup is not there to delete.
            raise BackupNotFound(key)
        progress.step = "delete_objects"
        for start in range(0, len(versions), DELETE_OBJECTS_BATCH):
            batch = versions[start : start + DELETE_OBJECTS_BATCH]
            answer = await self._client.delete_objects(
                Bucket=self._config.bucket, Delete={"Objects": batch, "Quiet": True}
            )
            errors = answer.get("Errors", [])
            if errors:
                raise StorageUnavailable(
                    f"{len(errors)} versions not deleted, first: {errors[0].get('Code')}"
                )
