"""The `none` backend: the gateway runs, but every storage operation is a 503."""

from __future__ import annotations

from .base import (
    BackupInfo,
    BackupLocation,
    BackupReader,
    BackupStore,
    NewBackup,
    StagedBackup,
    StoreCapabilities,
    SystemFolder,
    UploadBody,
)
from .errors import StorageNotConfigured


class NoStorage(BackupStore):
    name = "none"
    capabilities = StoreCapabilities(
        stores_uploads=False, presigns=False, serves_bytes=False, streams_restore=False
    )

    async def delete(self, location: BackupLocation) -> None:
        raise StorageNotConfigured("backup storage not configured")

    async def list_backups(self, folder: SystemFolder) -> list[BackupInfo]:
        raise StorageNotConfigured("backup storage not configured")

    async def describe(self, location: BackupLocation) -> BackupInfo:
        raise StorageNotConfigured("backup storage not configured")

    async def open_reader(self, location: BackupLocation) -> BackupReader:
        raise StorageNotConfigured("backup storage not configured")

    async def stage_upload(self, backup: NewBackup, body: UploadBody) -> StagedBackup:
        raise StorageNotConfigured("backup storage not configured")

    async def organization_usage(self, organization_id: str) -> int:
        raise StorageNotConfigured("backup storage not configured")

    async def check_ready(self) -> None:
        # Nothing to reach: the gateway is as ready as it will ever be.
        return None
