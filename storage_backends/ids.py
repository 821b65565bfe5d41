"""The backup-id grammar (DESIGN.md §2): a UUIDv7 with an optional known archive suffix.

It lives with storage because a listing keeps only the names that are backup ids; the
routes validate ids with it before anything reaches storage.
"""

from __future__ import annotations

import os
import re
import uuid

SUFFIXES = (".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst", ".gpg", ".bin")
_BACKUP_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    r"(?:" + "|".join(re.escape(s) for s in SUFFIXES) + r")?",
    re.ASCII | re.IGNORECASE,
)
# A stored backup's name exactly as `normalize_backup_id` returns it (lower case): what
# a listing keeps. One regex call a name, for the scans that meet a million of them.
_STORED_NAME = re.compile(_BACKUP_ID.pattern, re.ASCII)
# Whether a name is a backup id in its normal form (a match or None): the names a listing
# keeps, never a sidecar, a temporary file, an upper-case twin or an odd name. The bound
# method itself, not a wrapper: a scan calls it once a name.
match_stored_backup_name = _STORED_NAME.fullmatch
# the names the directory gives organizations and system keys: never hidden, no separators
_FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)
MAX_LENGTH = 36 + max(map(len, SUFFIXES))
ECHO_LIMIT = 256  # a rejected value is echoed in the 400, cut to this


def normalize_backup_id(value: str) -> str | None:
    """The lower-cased id when `value` is well formed, else None."""
    if len(value) > MAX_LENGTH or not _BACKUP_ID.fullmatch(value):
        return None
    return value.lower()


def is_folder_name(value: str) -> bool:
    """Whether `value` can be an organization's or a system key's folder in a store."""
    return _FOLDER_NAME.fullmatch(value) is not None


def new_uuid7(unix_ms: int) -> str:
    """A fresh UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits."""
    rand = int.from_bytes(os.urandom(10), "big")
    rand_a = rand >> 68  # 12 bits
    rand_b = rand & ((1 << 62) - 1)
    value = (unix_ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | rand_a << 64 | 0b10 << 62 | rand_b
    return str(uuid.UUID(int=value))


def upload_extension(filename: str) -> str:
    """A new backup id's suffix from the uploaded file's name (DESIGN.md §9)."""
    name = filename.lower()
    for suffix in SUFFIXES[:4]:  # the .tar.* ones
        if name.endswith(suffix):
            return suffix
    last = name[name.rfind(".") :] if "." in name else ""
    return last if last in (".gpg", ".bin") else ".bin"


def backup_unix_ms(backup_id: str) -> int:
    """The Unix milliseconds in a well-formed backup id's UUIDv7 (the upload's own clock)."""
    return int(backup_id[:8] + backup_id[9:13], 16)
