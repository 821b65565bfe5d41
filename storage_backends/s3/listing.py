"""What the S3 backend reads back: a ListObjectsV2 page's XML, and a listing entry from an
object's HeadObject headers (the metadata an upload wrote, x-amz-meta-*)."""

from __future__ import annotations

from datetime import UTC, datetime
from urllib.parse import unquote
from xml.etree import ElementTree

from ..base import DEFAULT_MIMETYPE, BackupInfo
from ..errors import StorageUnavailable

_SHA256_CHARS = frozenset("0123456789abcdef")
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


def info_from_headers(
    backup_id: str, size: int, modified: datetime, headers: dict[str, str]
) -> BackupInfo:
    """A listing entry from an object's HeadObject headers (x-amz-meta-*, Content-Type)."""
    lower = {k.lower(): v for k, v in headers.items()}
    filename = unquote(lower.get("x-amz-meta-filename", ""))
    sha256 = lower.get("x-amz-meta-sha256", "")
    uploaded = lower.get("x-amz-meta-uploaded-at", "")
    return BackupInfo(
        id=backup_id,
        size=size,
        filename=filename if 0 < len(filename) <= 1024 else backup_id,
        sha256=sha256 if len(sha256) == 64 and set(sha256) <= _SHA256_CHARS else "",
        mimetype=lower.get("content-type") or DEFAULT_MIMETYPE,
        uploaded_at=_uploaded_at(uploaded, modified),
    )


def _uploaded_at(value: str, modified: datetime) -> datetime:
    """The gateway's own upload time (milliseconds), else the object's Last-Modified."""
    try:
        parsed = datetime.fromisoformat(value) if value else None
    except ValueError:
        parsed = None
    return parsed.astimezone(UTC) if parsed is not None and parsed.tzinfo else modified


def list_page(body: bytes) -> tuple[list[tuple[str, int, datetime]], str | None]:
    """(key, size, last modified) of a ListObjectsV2 page, and the next page's token."""
    try:
        # The configured store's answer; expat >= 2.4 bounds entity amplification.
        root = ElementTree.fromstring(body)  # noqa: S314
        ns = _S3_NS if root.tag.startswith(_S3_NS) else ""
        entries = []
        for item in root.iter(f"{ns}Contents"):
            key = item.findtext(f"{ns}Key") or ""
            size = int(item.findtext(f"{ns}Size") or "0")
            modified = datetime.fromisoformat(item.findtext(f"{ns}LastModified") or "")
            entries.append((key, size, modified.astimezone(UTC)))
        truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
        token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    except (ElementTree.ParseError, ValueError) as exc:
        raise StorageUnavailable(f"unreadable ListObjectsV2 answer: {type(exc).__name__}") from None
    if truncated and not token:
        raise StorageUnavailable("truncated ListObjectsV2 answer without a continuation token")
    return entries, token
