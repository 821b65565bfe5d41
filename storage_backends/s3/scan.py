"""The fleet's scan of a bucket (DESIGN.md §13): ONE paginated ListObjectsV2 of the prefix,
no HeadObject, each system folder's count, bytes and largest id summed as its keys go by.

Keys come back in name order, so a folder's keys are contiguous (every key between two
keys starting `{org}/{key}/` starts with it too): a folder is complete once a key outside
it arrives, and only the folder being summed and one page are ever held. The listing
starts after `{prefix}/`: `.state/` and `.uploads/` (and any other name starting with a
character below `0`) sort before it and are never listed, while every folder name the
directory gives starts with a letter or digit, which sort after it.

Each page is a signed request (`signed`) read by the standard library's XML parser for its
keys and sizes alone: botocore's parse of every field of every key was half the scan's
time, all of it on the event loop. The keys come URL-encoded (encoding-type=url, as
botocore asks for them): a key XML cannot carry anywhere under the prefix must not stop
every scan.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import unquote_plus

from ..base import FolderSummary, SystemFolder
from ..ids import is_folder_name, normalize_backup_id
from .listing import keys_and_sizes

# one ListObjectsV2 page: the query it sends, the answer's XML
ListPage = Callable[[dict[str, str]], Awaitable[bytes]]


async def summaries(list_page: ListPage, prefix: str) -> AsyncIterator[list[FolderSummary]]:
    """A batch of finished folders per page (possibly empty batches are not yielded)."""
    query = {"list-type": "2", "prefix": prefix, "encoding-type": "url"}
    request = {**query, "start-after": prefix + "/"}
    start = len(prefix)
    current: tuple[str, str] | None = None
    place: str | None = None  # the current folder's `{org}/{key}/`
    count = total = 0
    newest = ""
    while True:
        entries, token = keys_and_sizes(await list_page(request))
        done: list[FolderSummary] = []
        for key, size in entries:
            if "%" in key or "+" in key:
                key = unquote_plus(key)  # as botocore decodes them
            folder_end = key.rfind("/") + 1
            name = key[folder_end:]
            if normalize_backup_id(name) != name:
                continue  # not a backup id, or not as a listing keeps it
            if key[start:folder_end] != place:
                parts = key[start:folder_end].split("/")
                if not (len(parts) == 3 and is_folder_name(parts[0]) and is_folder_name(parts[1])):
                    # deeper or shallower than `{org}/{key}/`, or names the directory never
                    # gives: no system's, and the folder being summed goes on after it
                    continue
                if current is not None and count:
                    done.append(FolderSummary(SystemFolder(*current), count, total, newest))
                place, current = key[start:folder_end], (parts[0], parts[1])
                count, total, newest = 0, 0, ""
            count += 1
            total += size
            if name > newest:
                newest = name
        if done:
            yield done
        if token is None:
            break
        request = {**query, "continuation-token": token}
    if current is not None and count:
        yield [FolderSummary(SystemFolder(*current), count, total, newest)]
