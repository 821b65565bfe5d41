"""The one storage interface the HTTP handlers use, and the value that names a backup."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class BackupLocation:
    """Where a backup lives: `{organization_id}/{system_key}/{backup_id}`.

    Every part has already been validated as a safe path component (directory
    load for the first two, backup-id grammar for the last).
    """

    organization_id: str
    system_key: str
    backup_id: str

    @property
    def relative_key(self) -> str:
        return f"{self.organization_id}/{self.system_key}/{self.backup_id}"


class BackupStore(abc.ABC):
    """An async backup store. Implementations raise only `storage_backends.errors` types."""

    name: ClassVar[str]

    async def start(self) -> None:
        """Acquire process-wide resources (clients, thread pools). Must not contact storage."""

    async def close(self) -> None:
        """Release what `start` acquired."""

    @abc.abstractmethod
    async def delete(self, location: BackupLocation) -> None:
        """Delete the backup for good.

        Raises BackupNotFound when it does not exist, StorageUnavailable when the
        store fails, StorageNotConfigured for the `none` backend.
        """

    @abc.abstractmethod
    async def check_ready(self) -> None:
        """A cheap probe of the store for /readyz; raises StorageUnavailable when not ready."""
