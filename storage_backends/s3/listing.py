"""What the S3 backend reads back: a ListObjectsV2 page's XML (and every page of a
prefix), and a listing entry from an object's HeadObject headers (the metadata an upload
wrote, x-amz-meta-*)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import unquote
from xml.etree import ElementTree

from ..base import DEFAULT_MIMETYPE, BackupInfo
from ..errors import StorageUnavailable
from ..metadata import fit_filename, held_in_range, parse_time, warn_once

if TYPE_CHECKING:
    from .signed import SignedRequests

log = logging.getLogger(__name__)

_SHA256_CHARS = frozenset("0123456789abcdef")
_S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
T = TypeVar("T")


def info_from_headers(
    backup_id: str, size: int, modified: datetime, headers: dict[str, str], place: str = ""
) -> BackupInfo:
    """A listing entry from an object's HeadObject headers (x-amz-meta-*, Content-Type).

    Whoever can write to the bucket writes these: a value the gateway would not have
    written reads as its default (the uploaded-at as the object's Last-Modified), and the
    object (`place`) is named in a warning once."""
    lower = {k.lower(): v for k, v in headers.items()}
    problems = []
    filename = unquote(lower.get("x-amz-meta-filename", ""))
    if filename and not fit_filename(filename):
        problems.append("filename")
        filename = ""
    sha256 = lower.get("x-amz-meta-sha256", "")
    if sha256 and not (len(sha256) == 64 and set(sha256) <= _SHA256_CHARS):
        problems.append("sha256")
        sha256 = ""
    mimetype = lower.get("content-type", "")
    if mimetype and not fit_filename(mimetype):  # printable text, as a filename
        problems.append("content-type")
        mimetype = ""
    uploaded = lower.get("x-amz-meta-uploaded-at", "")
    uploaded_at = parse_time(uploaded) if uploaded else None
    if uploaded and uploaded_at is None:
        problems.append("uploaded-at")  # e.g. 9999-12-31T23:59:59-12:00: past year 9999 in UTC
    if problems:
        warn_once(log, "metadata", place or backup_id, problems)
    return BackupInfo(
        id=backup_id,
        size=size,
        filename=filename or backup_id,
        sha256=sha256,
        mimetype=mimetype or DEFAULT_MIMETYPE,
        uploaded_at=uploaded_at or held_in_range(modified),
    )


def list_page(body: bytes) -> tuple[list[tuple[str, int, datetime]], str | None]:
    """(key, size, last modified) of a ListObjectsV2 page, and the next page's token."""

    def entry(item: ElementTree.Element, ns: str) -> tuple[str, int, datetime]:
        key, size = _key_and_size(item, ns)
        modified = datetime.fromisoformat(item.findtext(f"{ns}LastModified") or "")
        return key, size, modified.astimezone(UTC)

    return _read_page(body, entry)


def keys_and_sizes(body: bytes) -> tuple[list[tuple[str, int]], str | None]:
    """(key, size) of a ListObjectsV2 page, and the next page's token: `list_page` without
    the times (the fleet's scan of a whole prefix reads nothing else). Keys as they came:
    a page asked for with encoding-type=url holds them URL-encoded."""
    return _read_page(body, _key_and_size)


def _key_and_size(item: ElementTree.Element, ns: str) -> tuple[str, int]:
    return item.findtext(f"{ns}Key") or "", int(item.findtext(f"{ns}Size") or "0")


def _read_page(
    body: bytes, entry: Callable[[ElementTree.Element, str], T]
) -> tuple[list[T], str | None]:
    try:
        # The configured store's answer; expat >= 2.4 bounds entity amplification.
        root = ElementTree.fromstring(body)  # noqa: S314
        ns = _S3_NS if root.tag.startswith(_S3_NS) else ""
        entries = [entry(item, ns) for item in root.iter(f"{ns}Contents")]
        truncated = (root.findtext(f"{ns}IsTruncated") or "").lower() == "true"
        token = root.findtext(f"{ns}NextContinuationToken") if truncated else None
    except (ElementTree.ParseError, ValueError) as exc:
        raise StorageUnavailable(f"unreadable ListObjectsV2 answer: {type(exc).__name__}") from None
    if truncated and not token:
        raise StorageUnavailable("truncated ListObjectsV2 answer without a continuation token")
    return entries, token


async def every_key(
    signed: SignedRequests, prefix: str, directly_under: bool = True
) -> list[tuple[str, int, datetime]]:
    """(key, size, last modified) of every key under `prefix` (or only directly under it),
    page after page; StorageUnavailable on any answer but 200 — never a partial list."""
    listed: list[tuple[str, int, datetime]] = []
    continuation: str | None = None
    while True:
        page = await signed.list_page(prefix, continuation, directly_under)
        if page.status != 200:
            raise StorageUnavailable(f"HTTP {page.status}")
        entries, continuation = list_page(page.body)
        listed.extend(entries)
        if continuation is None:
            return listed
