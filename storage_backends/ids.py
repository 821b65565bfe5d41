"""The backup-id grammar (DESIGN.md §2): a UUIDv7 with an optional known archive suffix.

It lives with storage because a listing keeps only the names that are backup ids; the
routes validate ids with it before anything reaches storage.
"""

from __future__ import annotations

import re

SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst", ".gpg", ".bin")
_BACKUP_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    r"(?:" + "|".join(re.escape(s) for s in SUFFIXES) + r")?",
    re.ASCII | re.IGNORECASE,
)
MAX_LENGTH = 36 + max(map(len, SUFFIXES))
ECHO_LIMIT = 256  # a rejected value is echoed in the 400, cut to this


def normalize_backup_id(value: str) -> str | None:
    """The lower-cased id when `value` is well formed, else None."""
    if len(value) > MAX_LENGTH or not _BACKUP_ID.fullmatch(value):
        return None
    return value.lower()
