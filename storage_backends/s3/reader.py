"""An S3 backup opened for reading: its HeadObject said what it is; its bytes come from one
GetObject of the range asked for, read in bounded pieces as the caller takes them.

Through aiobotocore (one call per restore, so its CPU per call does not matter): its
signing, endpoint and `standard` retries until the store answers. Once the body flows,
a failure is not retried: the caller has sent bytes already, and says the read broke off.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from ..base import READ_CHUNK_BYTES, BackupInfo, BackupReader
from ..errors import BackupNotFound, StorageUnavailable
from .errors import Progress, error_code, guarded

_MISSING = ("NoSuchKey", "404")
_BROKEN = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)


class S3Reader(BackupReader):
    def __init__(
        self, info: BackupInfo, client: Any, bucket: str, key: str, timeout: float
    ) -> None:
        super().__init__(info)
        self._client = client
        self._bucket = bucket
        self._key = key
        self._timeout = timeout  # until the store answers, retries included

    async def chunks(self, offset: int, count: int) -> AsyncGenerator[bytes, None]:
        if count <= 0:
            return
        answer = await guarded(Progress("get_object"), self._get(offset, count), self._timeout)
        body = answer["Body"]
        try:
            if int(answer.get("ContentLength", -1)) != count:
                raise StorageUnavailable("GetObject answered another length than asked")
            left = count
            while left:
                try:
                    # the client's read timeout bounds each wait for bytes
                    piece = await body.read(min(READ_CHUNK_BYTES, left))
                except _BROKEN as exc:
                    raise StorageUnavailable(f"read broke off: {type(exc).__name__}") from None
                if not piece:
                    raise StorageUnavailable(f"read ended {left} bytes early")
                left -= len(piece)
                yield piece
        finally:
            body.close()  # a body left unread is dropped with its connection, never drained

    async def _get(self, offset: int, count: int) -> Any:
        try:
            return await self._client.get_object(
                Bucket=self._bucket, Key=self._key, Range=f"bytes={offset}-{offset + count - 1}"
            )
        except ClientError as exc:
            if error_code(exc) in _MISSING:
                raise BackupNotFound(self._key) from None  # deleted since it was opened
            raise

    async def close(self) -> None:
        return None  # each read holds its connection only while it runs
