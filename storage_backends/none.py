"""The `none` backend: the gateway runs, but every storage operation is a 503."""

from __future__ import annotations

from .base import BackupLocation, BackupStore
from .errors import StorageNotConfigured


class NoStorage(BackupStore):
    name = "none"

    async def delete(self, location: BackupLocation) -> None:
        raise StorageNotConfigured("backup storage not configured")

    async def check_ready(self) -> None:
        # Nothing to reach: the gateway is as ready as it will ever be.
        return None
