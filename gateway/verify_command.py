"""`backup-gateway verify`: one verification pass in the foreground (DESIGN.md §12).

Every backup is re-read whatever `storage.verify.enabled` says, and the results are kept
as the background verifier keeps them. A progress bar (tqdm) counts bytes, backups, the
rate and the time left on a terminal; elsewhere a plain line every tenth of the way. One
line per corrupt backup, a summary, exit status 1 when any is corrupt.
"""

from __future__ import annotations

import math
import sys
from collections import Counter
from typing import TextIO

from tqdm import tqdm

from storage_backends import SystemFolder, create_store

from .backups.system_lock import SystemLocks
from .backups.verifier import Due, Verifier
from .config import Config
from .config_loader import ConfigError
from .directory import create_directory

EXIT_CORRUPT = 1


async def verify(
    config: Config,
    system_id: str | None,
    out: TextIO = sys.stdout,
    max_bytes_per_second: float | None = None,
) -> int:
    store = create_store(config.storage)
    if not (store.capabilities.keeps_state and store.capabilities.lists_folders):
        raise ConfigError("storage.backend", f"{store.name} keeps no backups to verify")
    await store.start()
    try:
        only = await _folder_of(config, system_id) if system_id is not None else None
        rate = max_bytes_per_second or math.inf
        locks = SystemLocks(store, None, purpose="verify")  # a host's folder locks, if any
        verifier = Verifier(config.storage.verify, store, locks, rate)
        count, total = await verifier.census(only)
        outcomes: Counter[str] = Counter()
        with _Progress(count, total, out) as progress:

            def seen(item: Due, outcome: str) -> None:
                outcomes[outcome] += 1
                if outcome == "corrupt":
                    progress.write(f"corrupt: {item.folder.location(item.info.id).relative_key}")
                progress.advance(item.info.size)

            await verifier.run_pass(only, seen, force=True)
    finally:
        await store.close()
    parts = ", ".join(f"{outcomes[o]} {o}" for o in ("ok", "corrupt", "unverifiable", "error"))
    print(f"verified {count} backups ({total} bytes): {parts}", file=out)
    return EXIT_CORRUPT if outcomes["corrupt"] else 0


async def _folder_of(config: Config, system_id: str) -> SystemFolder:
    directory = create_directory(config.directory)
    await directory.start()
    try:
        system = await directory.system(system_id)
    finally:
        await directory.close()
    if system is None or system.system_key is None:
        raise ConfigError("--system", f"{system_id} is not a registered system")
    return SystemFolder(system.organization_id, system.system_key)


class _Progress:
    """tqdm on a terminal; plain lines at each tenth of the bytes elsewhere."""

    def __init__(self, count: int, total: int, out: TextIO) -> None:
        self._out = out
        self._total = total
        self._done = 0
        self._tenths = 0
        self._bar: tqdm[None] | None = None
        if out.isatty():
            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, file=out, postfix={"backups": count}
            )

    def __enter__(self) -> _Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.close()

    def write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line, file=self._out)
        else:
            print(line, file=self._out, flush=True)

    def advance(self, size: int) -> None:
        self._done += size
        if self._bar is not None:
            self._bar.update(size)
            return
        tenths = 10 * self._done // self._total if self._total else 10
        if tenths > self._tenths:
            self._tenths = tenths
            print(f"{self._done} of {self._total} bytes read", file=self._out, flush=True)
