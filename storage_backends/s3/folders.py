"""Which system folders a bucket holds: `{prefix}{organization_id}/{system_key}/`, found by
ListObjectsV2 with a delimiter (the prefix's, then each organization's), so no object is
read and a folder of a million backups costs one page. `.state/`, `.uploads/` and any name
the directory never gives are not folders."""

from __future__ import annotations

from typing import Any

from ..base import SystemFolder
from ..ids import is_folder_name


async def folder_names(client: Any, bucket: str, prefix: str) -> list[str]:
    """The names of the "folders" directly under `prefix` that a directory could give."""
    names = []
    paginator = client.get_paginator("list_objects_v2")
    async for page in paginator.paginate(Bucket=bucket, Prefix=prefix, Delimiter="/"):
        for entry in page.get("CommonPrefixes", []):
            name = entry["Prefix"][len(prefix) :].removesuffix("/")
            if is_folder_name(name):
                names.append(name)
    return sorted(names)


def folders_of(organization_id: str, system_keys: list[str]) -> list[SystemFolder]:
    return [SystemFolder(organization_id, key) for key in system_keys]
