"""Backup storage: one interface (`BackupStore`), one module per backend, a registry by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from . import s3
from .base import (
    DEFAULT_MIMETYPE,
    BackupEntry,
    BackupInfo,
    BackupListing,
    BackupLocation,
    BackupReader,
    BackupStore,
    FolderLock,
    FolderMark,
    FolderSummary,
    FolderUnchanged,
    KnownMarks,
    NewBackup,
    OpenedBackup,
    StagedBackup,
    StoreCapabilities,
    SystemFolder,
    UploadBody,
)
from .errors import (
    BackupNotFound,
    BackupProtected,
    ChecksumRefused,
    DeleteOutcomeUnknown,
    InsufficientStorage,
    StorageError,
    StorageNotConfigured,
    StorageUnavailable,
    UploadIncomplete,
)
from .local import LocalBackupStore, LocalConfig, folds_case
from .none import NoStorage
from .s3 import S3Config

__all__ = [
    "BACKENDS",
    "DEFAULT_MIMETYPE",
    "BackupEntry",
    "BackupInfo",
    "BackupListing",
    "BackupLocation",
    "BackupNotFound",
    "BackupProtected",
    "BackupReader",
    "BackupStore",
    "ChecksumRefused",
    "DeleteOutcomeUnknown",
    "FolderLock",
    "FolderMark",
    "FolderSummary",
    "FolderUnchanged",
    "InsufficientStorage",
    "KnownMarks",
    "LocalConfig",
    "NewBackup",
    "OpenedBackup",
    "S3Config",
    "StagedBackup",
    "StorageConfig",
    "StorageError",
    "StorageNotConfigured",
    "StorageUnavailable",
    "StoreCapabilities",
    "SystemFolder",
    "UploadBody",
    "UploadIncomplete",
    "create_store",
    "refused_at_start",
]


@dataclass(frozen=True)
class StorageConfig:
    """Which backend serves, and its settings: what `create_store` needs, nothing more (the
    gateway's own storage settings extend this in `gateway.config`)."""

    backend: Literal["local", "s3", "none"] = "local"
    # No storage operation (retries included) takes longer than this; past it, a 502.
    operation_timeout_seconds: float = 10.0
    local: LocalConfig = field(default_factory=LocalConfig)
    s3: S3Config = field(default_factory=S3Config)


BACKENDS: dict[str, Callable[[StorageConfig], BackupStore]] = {
    "local": lambda c: LocalBackupStore(c.local, c.operation_timeout_seconds),
    "s3": lambda c: s3.create_store(c.s3, c.operation_timeout_seconds),
    "none": lambda c: NoStorage(),
}


def refused_at_start(config: StorageConfig) -> tuple[str, str] | None:
    """(config field, why) when the storage must not be served at all; None when it may.
    A store that is down is not refused here: that is readiness's (and a 502's)."""
    if config.backend == "local" and folds_case(config.local.root):
        return (
            "storage.local.root",
            f"{config.local.root} matches names case-insensitively: organizations and systems "
            "whose ids differ only in case would share folders; use a case-sensitive filesystem",
        )
    return None


def create_store(config: StorageConfig) -> BackupStore:
    return BACKENDS[config.backend](config)
