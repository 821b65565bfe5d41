"""`check-config`'s look at storage: the local root's marker (files only), and with
`--probe` whether an object store answers.

A new, empty or missing local root once passed `check-config` and was explained only in
the server's log, after start-up, as a 503. Each line is `(what, None)` when it is fine,
else `(what, why)`, for the command's report.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from storage_backends import StorageUnavailable, create_store
from storage_backends.local import ROOT_MARKER

from ..config import Config
from ..operations.health import PROBE_TIMEOUT, cause_of

Line = tuple[str, str | None]


def local_root(config: Config, config_path: Path) -> Line | None:
    """The local root as start-up will find it; None for a backend that has none."""
    if config.storage.backend != "local":
        return None
    root = config.storage.local.root
    name = f"storage (local root {root})"
    mark = f"create and mark it with `backup-gateway init-root --config {config_path}`"
    if not root.exists():
        return name, f"does not exist; {mark}"
    if not root.is_dir():
        return name, "is not a directory"
    if (root / ROOT_MARKER).exists():
        return name, None
    if any(not entry.name.startswith(".") for entry in root.iterdir()):
        return name, None  # a root in use from before the marker: start-up marks it
    # empty and unmarked: what an unmounted volume leaves behind (the gateway serves 503)
    return name, f"is not marked (is its volume mounted?); once it is the right one, {mark}"


async def probe_storage(config: Config) -> list[Line]:
    """Whether the object store answers (its bucket, its credentials), with the cause."""
    if config.storage.backend in ("local", "none"):
        return []  # the local root is `local_root`'s, from the files alone
    name = f"storage ({config.storage.backend})"
    store = create_store(config.storage)
    # the store's own warning would repeat the line below, in a server's words
    logging.disable(logging.WARNING)
    try:
        async with asyncio.timeout(PROBE_TIMEOUT * 2):
            await store.start()
            await store.check_ready()
    except StorageUnavailable as exc:
        return [(name, str(exc))]
    except Exception as exc:  # any failure is a line naming its cause, never a traceback
        return [(name, cause_of(exc))]
    finally:
        await store.close()
        logging.disable(logging.NOTSET)
    return [(name, None)]
