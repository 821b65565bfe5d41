"""The one use of botocore's internals, with its test in tests/test_library_internals.py
(it fails when botocore changes underneath it)."""

from __future__ import annotations

from datetime import datetime
from typing import Any


def credentials_expiry(credentials: Any) -> datetime | None:
    """When temporary credentials (a role, web identity, SSO) expire; None for static ones.
    botocore keeps the time in a private attribute and offers no public reader."""
    expiry = getattr(credentials, "_expiry_time", None)
    return expiry if isinstance(expiry, datetime) else None
