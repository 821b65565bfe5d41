"""The `s3` backend: any S3-compatible store, through aiobotocore.

Its modules are private to it: `settings` (the config section, importable without
aiobotocore), `store`, and the store's parts by concern: `listing`, `uploads`, `errors`,
`signed`, `botocore_internals`. From outside, import this package only; `create_store` imports
aiobotocore on first use, so a gateway that reads a config or runs local storage never
loads it. Its modules may import `storage_backends.base` and `storage_backends.errors`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .settings import S3Config

if TYPE_CHECKING:
    from .store import S3BackupStore

__all__ = ["S3Config", "create_store"]


def create_store(config: S3Config, operation_timeout: float) -> S3BackupStore:
    from .store import S3BackupStore  # aiobotocore is imported only by a gateway that uses it

    return S3BackupStore(config, operation_timeout)
