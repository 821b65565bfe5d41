"""`backup-gateway seed`: fill the configured storage with real backups and a matching directory,
so a load test has real objects to delete."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import yaml

from storage_backends import BackupLocation
from storage_backends.ids import new_uuid7
from storage_backends.local import SIDECAR_SUFFIX, mark_root

from ..config import Config


@dataclass(frozen=True)
class SeededSystem:
    system_id: str
    organization_id: str
    system_key: str


def seeded_systems(count: int) -> list[SeededSystem]:
    return [
        SeededSystem(f"sys_{i:06d}", f"org_cust_{i:06d}", f"SEED-{i:06d}") for i in range(count)
    ]


def seed_directory(systems: list[SeededSystem]) -> dict[str, list[dict[str, object]]]:
    organizations: list[dict[str, object]] = [
        {"id": "org_owner", "role": "owner"},
        {"id": "org_dist", "role": "distributor", "parent": "org_owner"},
        {"id": "org_res", "role": "reseller", "parent": "org_dist"},
    ]
    organizations += [
        {"id": s.organization_id, "role": "customer", "parent": "org_res"} for s in systems
    ]
    return {
        "organizations": organizations,
        "systems": [
            {"id": s.system_id, "system_key": s.system_key, "organization_id": s.organization_id}
            for s in systems
        ],
    }


def _sidecar(backup_id: str, data: bytes) -> bytes:
    return json.dumps(
        {
            "filename": backup_id,
            "sha256": hashlib.sha256(data).hexdigest(),
            "mimetype": "application/gzip",
            "uploaded_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
    ).encode()


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _seed_local_share(
    root: Path, share: list[tuple[SeededSystem, list[str]]], backups: int, data: bytes
) -> None:
    """Write a share of the systems' backups index by index, across all of them: a backup's
    age then follows its index whatever its system (see the ids file's order in `seed`)."""
    folders = []
    for system, _ in share:
        folder = os.path.join(root, system.organization_id, system.system_key)
        os.makedirs(folder, exist_ok=True)
        folders.append(folder)
    sidecar = _sidecar("x", data)
    for index in range(backups):
        for folder, (_, ids) in zip(folders, share, strict=True):
            path = os.path.join(folder, ids[index])
            _write(path, data)
            _write(path + SIDECAR_SUFFIX, sidecar)


SEED_PUTS_IN_FLIGHT = 32


async def _seed_s3(config: Config, plan: list[tuple[SeededSystem, list[str]]], data: bytes):
    from storage_backends import s3

    store = s3.create_store(config.storage.s3, config.storage.operation_timeout_seconds)
    await store.start()
    client = store._client  # the seeder shares the backend's configured client
    digest = hashlib.sha256(data).hexdigest()
    queue: asyncio.Queue[BackupLocation] = asyncio.Queue()
    for system, ids in plan:
        for backup_id in ids:
            queue.put_nowait(BackupLocation(system.organization_id, system.system_key, backup_id))

    async def worker() -> None:
        while not queue.empty():
            location = queue.get_nowait()
            await client.put_object(
                Bucket=config.storage.s3.bucket,
                Key=store.key_for(location),
                Body=data,
                Metadata={
                    "filename": location.backup_id,
                    "sha256": digest,
                    "mimetype": "application/gzip",
                },
            )

    # Not one worker per pooled connection (the bench's pool is 256): a test server such as
    # moto's listens with a backlog of 128, and the connects beyond it time out (seen: 2
    # seeds in 15 failed so). A few dozen puts in flight are all one server takes anyway.
    workers = min(config.storage.s3.max_pool_connections, SEED_PUTS_IN_FLIGHT)
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        await store.close()


def seed(
    config: Config, systems: int, backups: int, size: int = 1024, ids_out: Path | None = None
) -> tuple[int, float]:
    """Write the directory file and systems*backups backups. Returns (count, seconds)."""
    started = time.perf_counter()
    plan_systems = seeded_systems(systems)
    # One millisecond apart, ending now: the ids sort in the order they were made (as
    # retention reads them), and none is from the future.
    counter = int(time.time() * 1000) - systems * backups
    plan: list[tuple[SeededSystem, list[str]]] = []
    for system in plan_systems:
        ids = []
        for _ in range(backups):
            ids.append(new_uuid7(counter) + ".tar.gz")
            counter += 1
        plan.append((system, ids))
    data = os.urandom(size)

    config.directory.path.parent.mkdir(parents=True, exist_ok=True)
    config.directory.path.write_text(yaml.safe_dump(seed_directory(plan_systems), sort_keys=False))

    if config.storage.backend == "local":
        root = config.storage.local.root
        mark_root(root, only_if_in_use=False)
        threads = min(8, len(plan)) or 1
        shares = [plan[i::threads] for i in range(threads)]
        with ThreadPoolExecutor(max_workers=threads) as pool:
            list(pool.map(lambda share: _seed_local_share(root, share, backups, data), shares))
    elif config.storage.backend == "s3":
        asyncio.run(_seed_s3(config, plan, data))
    else:
        raise SystemExit("seed needs storage.backend local or s3")

    if ids_out is not None:
        # Interleaved across systems, so a load test spreads over every folder; newest
        # first, so it deletes the backups still in the page cache before those the kernel
        # writes back 30 s after they were written (a load test's figures would otherwise
        # depend on how long seeding took). To measure backups on disk, sync after seeding.
        with open(ids_out, "w", encoding="ascii") as out:
            for index in reversed(range(backups)):
                for system, ids in plan:
                    out.write(f"{system.system_id} {ids[index]}\n")
    return systems * backups, time.perf_counter() - started
