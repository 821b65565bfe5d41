"""The fleet's scan of a bucket (DESIGN.md §13): ONE paginated ListObjectsV2 of the prefix,
no HeadObject, each system folder's count, bytes and largest id summed as its keys go by.

Keys come back in name order, so a folder's keys are contiguous (every key between two
keys starting `{org}/{key}/` starts with it too): a folder is complete once a key outside
it arrives, and only the folder being summed and one page are ever held. The listing
starts after `{prefix}/`: `.state/` and `.uploads/` (and any other name starting with a
character below `0`) sort before it and are never listed, while every folder name the
directory gives starts with a letter or digit, which sort after it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ..base import FolderSummary, SystemFolder
from ..ids import is_folder_name, normalize_backup_id

# one ListObjectsV2 page: what it asks for, and the answer botocore parsed
ListPage = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def summaries(list_page: ListPage, prefix: str) -> AsyncIterator[list[FolderSummary]]:
    """A batch of finished folders per page (possibly empty batches are not yielded)."""
    request: dict[str, Any] = {"Prefix": prefix, "StartAfter": prefix + "/"}
    current: tuple[str, str] | None = None
    count = total = 0
    newest = ""
    while True:
        page = await list_page(request)
        done: list[FolderSummary] = []
        for entry in page.get("Contents", []):
            parts = entry["Key"][len(prefix) :].split("/")
            if len(parts) != 3:
                continue  # deeper or shallower than {org}/{key}/{id}
            organization_id, system_key, name = parts
            if normalize_backup_id(name) != name:
                continue
            if not (is_folder_name(organization_id) and is_folder_name(system_key)):
                continue
            if (organization_id, system_key) != current:
                if current is not None and count:
                    done.append(FolderSummary(SystemFolder(*current), count, total, newest))
                current, count, total, newest = (organization_id, system_key), 0, 0, ""
            count += 1
            total += int(entry.get("Size", 0))
            newest = max(newest, name)
        if done:
            yield done
        token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        if not token:
            break
        request = {"Prefix": prefix, "ContinuationToken": token}
    if current is not None and count:
        yield [FolderSummary(SystemFolder(*current), count, total, newest)]
