"""A local backup opened for reading: the descriptor of the symlink-refusing walk, which the
gateway sends with sendfile, or reads in pieces from a thread (`chunks`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncGenerator
from concurrent.futures import Executor

from ..base import READ_CHUNK_BYTES, BackupReader, OpenedBackup
from ..errors import StorageUnavailable


class LocalReader(BackupReader):
    def __init__(self, opened: OpenedBackup, executor: Executor, timeout: float) -> None:
        super().__init__(opened.info)
        self._opened = opened
        self._executor = executor
        self._timeout = timeout  # each piece's read, as any local operation

    @property
    def fd(self) -> int | None:
        return self._opened.fd

    async def chunks(self, offset: int, count: int) -> AsyncGenerator[bytes, None]:
        loop = asyncio.get_running_loop()
        end = offset + count
        while offset < end:
            size = min(READ_CHUNK_BYTES, end - offset)
            try:
                async with asyncio.timeout(self._timeout):
                    piece = await loop.run_in_executor(
                        self._executor, os.pread, self._opened.fd, size, offset
                    )
            except (OSError, TimeoutError) as exc:
                raise StorageUnavailable(f"local read failed: {type(exc).__name__}") from None
            if not piece:  # the file shrank under us: never a short answer that looks whole
                raise StorageUnavailable("local read ended early")
            offset += len(piece)
            yield piece

    async def close(self) -> None:
        self._opened.close()
