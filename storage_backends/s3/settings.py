"""The `s3` backend's settings, apart from the backend so that reading a config (or starting
the local I/O process) never imports aiobotocore."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class S3Config:
    bucket: str = ""
    endpoint_url: str | None = None
    # the endpoint browsers reach, when it differs (download URLs are presigned against it)
    presign_endpoint_url: str | None = None
    region: str = "us-east-1"
    # Leave both unset to use the standard AWS chain (env, shared files, instance role).
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    addressing_style: Literal["path", "virtual", "auto"] = "auto"
    prefix: str = ""
    versioning: Literal["auto", "on", "off"] = "auto"
    connect_timeout_seconds: float = 3.0
    read_timeout_seconds: float = 5.0
    max_attempts: int = 3
    max_pool_connections: int = 64
    # uploads larger than this go up in parts (S3's single PUT takes at most 5 GiB)
    multipart_threshold_bytes: int = 512 * 1024**2
    multipart_part_bytes: int = 64 * 1024**2
    # a protected backup also carries an S3 legal hold (a bucket made with Object Lock):
    # not even the bucket's own credentials delete it while it holds (DESIGN.md §11)
    object_lock: bool = False
