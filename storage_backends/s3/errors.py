"""How the S3 backend's failures become `storage_backends.errors` types, and what the log
says of each: the step an operation reached, and whether a delete may have happened."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from ..errors import BackupNotFound, InsufficientStorage, StorageUnavailable
from .signed import Answer

log = logging.getLogger(__name__)

# answers of a store that is out of space or over its quota (MinIO, Ceph RGW, SeaweedFS)
FULL_CODES = (b"<Code>XMinioStorageFull", b"<Code>QuotaExceeded", b"<Code>EntityTooLarge")
STORE_FAILURES = (
    StorageUnavailable,
    ClientError,
    BotoCoreError,
    aiohttp.ClientError,
    OSError,
)


class Progress:
    """The step an operation has reached, so a failure can say what it may have done."""

    __slots__ = ("step",)

    def __init__(self, step: str = "start") -> None:
        self.step = step


def error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", "unknown"))


def http_status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def reason(exc: BaseException) -> str:
    """What a log line and a StorageUnavailable say of a failure: never a key or a bucket."""
    if isinstance(exc, ClientError):
        return f"{error_code(exc)} (HTTP {http_status(exc)})"
    if isinstance(exc, StorageUnavailable):
        return str(exc)
    return type(exc).__name__


def require_ok(answer: Answer, step: str) -> None:
    """A write's answer: 200, else InsufficientStorage when the store is full, else
    StorageUnavailable."""
    if answer.status == 200:
        return
    if answer.status == 507 or any(code in answer.body for code in FULL_CODES):
        raise InsufficientStorage(f"{step}: HTTP {answer.status}")
    raise StorageUnavailable(f"{step}: HTTP {answer.status}")


async def guarded(progress: Progress, work: Awaitable[Any], seconds: float) -> Any:
    """Bound the whole operation in time and turn every failure into a typed error.

    The warning names the step that failed. When that step was a delete call, the
    store may have applied it before the answer was lost: the log says so, and a retry
    of the same request settles it (404 once the object is gone).
    """
    try:
        async with asyncio.timeout(seconds):
            return await work
    except BackupNotFound:
        raise
    except StorageUnavailable as exc:
        why: str = str(exc)
    except TimeoutError:
        why = f"timed out after {seconds:.1f}s"
    except ClientError as exc:
        why = f"{error_code(exc)} (HTTP {http_status(exc)})"
        log.debug("s3 %s error detail: %s", progress.step, exc)
    except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
        # the text names the endpoint and what went wrong there ("Could not connect to the
        # endpoint URL: ..."): the type alone left a wrong endpoint_url to guess at
        why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if progress.step in ("delete_object", "delete_objects"):
        log.warning(
            "s3 %s failed: %s; outcome unknown, the object may already be deleted",
            progress.step,
            why,
        )
    else:
        log.warning("s3 %s failed: %s; nothing was deleted", progress.step, why)
    raise StorageUnavailable(why)
