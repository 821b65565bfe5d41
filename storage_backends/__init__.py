"""Backup storage: one interface (`BackupStore`), one module per backend, a registry by name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import s3
from .base import (
    DEFAULT_MIMETYPE,
    BackupInfo,
    BackupLocation,
    BackupStore,
    NewBackup,
    OpenedBackup,
    StagedBackup,
    SystemFolder,
    UploadBody,
)
from .errors import (
    BackupNotFound,
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
    "BackupInfo",
    "BackupLocation",
    "BackupNotFound",
    "BackupStore",
    "DeleteOutcomeUnknown",
    "DownloadConfig",
    "InsufficientStorage",
    "LocalConfig",
    "NewBackup",
    "OpenedBackup",
    "RetentionConfig",
    "S3Config",
    "StagedBackup",
    "StorageConfig",
    "StorageError",
    "StorageNotConfigured",
    "StorageUnavailable",
    "SystemFolder",
    "UploadBody",
    "UploadIncomplete",
    "UsageCounterConfig",
    "create_store",
    "refused_at_start",
]


@dataclass(frozen=True)
class UsageCounterConfig:
    """Drop the platform's per-organization usage counter in Redis after a change (§7)."""

    enabled: bool = False
    db: int = 1


@dataclass(frozen=True)
class DownloadConfig:
    # download URLs (S3) and links (local disk) are valid this long; at most 900
    ttl_seconds: int = 300
    # the local links' HMAC key (not the token secret), created 0600 on first run
    link_secret_file: Path = Path("data/link.secret")
    # a local download gets request_timeout_seconds plus its size at this rate, then is cut
    min_rate_bytes_per_second: int = 65536


@dataclass(frozen=True)
class RetentionConfig:
    """Uploads (DESIGN.md §9): limits refused before the body, and what retention keeps.
    0 = no limit."""

    max_upload_bytes: int = 2 * 1024**3
    max_backups_per_system: int = 10
    max_bytes_per_system: int = 500 * 1024**2
    max_bytes_per_organization: int = 100 * 1024**3
    uploads_per_minute: int = 6
    uploads_per_hour: int = 60
    # the Redis DB of the platform's rate keys and retention locks (redis.url set)
    redis_db: int = 1
    # a body must arrive within request_timeout_seconds plus its size at this rate
    min_rate_bytes_per_second: int = 65536
    # failed appliance logins per client address and system key, a minute, before a 429
    failed_logins_per_minute: int = 20


@dataclass(frozen=True)
class StorageConfig:
    backend: Literal["local", "s3", "none"] = "local"
    # No storage operation (retries included) takes longer than this; past it, a 502.
    operation_timeout_seconds: float = 10.0
    local: LocalConfig = field(default_factory=LocalConfig)
    s3: S3Config = field(default_factory=S3Config)
    usage_counter: UsageCounterConfig = field(default_factory=UsageCounterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)


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
