"""`backup-gateway orphans`: the folders no system maps to (DESIGN.md §13), from one scan of
storage, one JSON object a line on stdout; with `--purge --older-than-days N`, those whose
newest backup is older than N days are deleted (durably, audited on stderr), each folder
and each backup re-checked against the directory itself right before it goes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from typing import TextIO

from storage_backends import create_store
from storage_backends.log_format import JsonFormatter, TextFormatter

from .backups.listing import rfc3339
from .config import Config
from .config_loader import ConfigError
from .directory import create_directory
from .fleet import FleetIndex, find_orphans, purge_orphans

EXIT_SCAN_FAILED = 1
DAY_MS = 86_400_000


async def orphans(
    config: Config, purge_older_than_days: float | None, out: TextIO = sys.stdout
) -> int:
    store = create_store(config.storage)
    if not store.capabilities.lists_folders:
        raise ConfigError("storage.backend", f"{store.name} keeps no folders to look at")
    _audit_to_stderr(config)
    # every answer from the database itself: a purge must never decide on a cached one
    directory_config = config.directory
    if directory_config.kind == "postgres":
        postgres = dataclasses.replace(directory_config.postgres, cache_seconds=0)
        directory_config = dataclasses.replace(directory_config, postgres=postgres)
    directory = create_directory(directory_config)
    await store.start()
    await directory.start()
    try:
        index = FleetIndex(config.fleet, store, directory)
        if not await index.scan():
            print("backup-gateway: storage could not be scanned", file=sys.stderr)
            return EXIT_SCAN_FAILED
        found = await find_orphans(index, directory)
        for orphan in found:
            line = {
                "organization_id": orphan.folder.organization_id,
                "system_key": orphan.folder.system_key,
                "backups": orphan.stats.backups,
                "bytes": orphan.stats.bytes,
                "newest_backup_at": rfc3339(orphan.stats.newest_at),
            }
            print(json.dumps(line), file=out, flush=True)
        if purge_older_than_days is None:
            return 0
        cut_off = int(time.time() * 1000 - purge_older_than_days * DAY_MS)
        done = await purge_orphans(store, directory, found, cut_off, lambda line: None)
        print(
            f"purged {done.folders} folders ({done.backups} backups, {done.bytes} bytes); "
            f"{len(done.left)} left",
            file=sys.stderr,
        )
        return 0 if not done.left else EXIT_SCAN_FAILED
    finally:
        await directory.close()
        await store.close()


def _audit_to_stderr(config: Config) -> None:
    """Audit lines (each purged backup) on stderr, in the configured format: stdout is the
    listing."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.logging.format == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
