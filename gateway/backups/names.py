"""The name a browser saves a download under (DESIGN.md §8).

The stored filename with every code point outside `[A-Za-z0-9._-]` replaced by `_`, split
at its first dot past the first character into base and extension (no such dot: the
extension is the id's own), and the upload time (UTC) put before the extension:
`base_YYYY-MM-DD_HH-MM-SS.ext`, or `base_HH-MM-SS.ext` when the base already holds a date.
What comes out is plain ASCII without quotes, so it is safe inside a quoted header value.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def sanitized(filename: str) -> str:
    return _UNSAFE.sub("_", filename)


def download_name(filename: str, backup_id: str, uploaded_at: datetime) -> str:
    name = sanitized(filename or backup_id)
    dot = name.find(".", 1)
    if dot > 0:
        base, extension = name[:dot], name[dot:]
    else:
        id_dot = backup_id.find(".")
        base, extension = name, (backup_id[id_dot:] if id_dot >= 0 else "")
    when = uploaded_at.astimezone(UTC)
    stamp = when.strftime("%H-%M-%S") if _DATE.search(base) else when.strftime("%Y-%m-%d_%H-%M-%S")
    return f"{base}_{stamp}{extension}"
