"""The fleet's figures (DESIGN.md §13, issue #31):

    .venv/bin/python bench/fleet_scan.py [--folders 10000] [--backups 100000] [--root DIR]
        [--platform-systems 200000] [--requests 300]

1. scan: a local root of --folders system folders holding --backups backups (each with its
   sidecar, as the gateway writes them) walked by the store's `folder_summaries`, against
   `find ROOT -type f | wc -l` on the same, warm root (best of three each).
2. memory: the RSS growth of the index once the scan's folders are in it, per system.
3. GET /api/backups/fleet?limit=100 for a distributor over a platform-sized PostgreSQL
   (bench/platform_rows.py's other tenants, --platform-systems systems): the app on a
   loopback port, sequential requests, p50 and p99.
The root is kept (--root) between runs: building it is the slow part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from platform_rows import _OTHER_TENANTS

from gateway import create_app
from gateway.config import FleetConfig
from gateway.directory import InMemoryDirectory
from gateway.fleet import FleetIndex
from storage_backends import LocalBackupStore, LocalConfig
from storage_backends.ids import new_uuid7
from storage_backends.local import ROOT_MARKER
from tests.servers import PlatformDatabase, PostgresServer
from tests.support import DIRECTORY, bearer, make_config, token_for


def build_root(root: Path, folders: int, backups: int) -> None:
    done = root / ".built"
    if done.exists() and done.read_text() == f"{folders} {backups}":
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).write_text("bench\n")
    per = backups // folders
    now = int(time.time() * 1000)
    sidecar = b'{"filename":"b.tar.gz","sha256":"","mimetype":"application/gzip"}'
    for f in range(folders):
        folder = root / f"org_{f % 1000:04d}" / f"KEY-{f:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(per):
            name = new_uuid7(now - (f * per + b) * 1000) + ".tar.gz"
            (folder / name).write_bytes(b"x" * 64)
            (folder / (name + ".meta.json")).write_bytes(sidecar)
    done.write_text(f"{folders} {backups}")


def find_seconds(root: Path) -> tuple[float, int]:
    started = time.perf_counter()
    find = subprocess.Popen(["find", str(root), "-type", "f"], stdout=subprocess.PIPE)
    counted = subprocess.run(["wc", "-l"], stdin=find.stdout, capture_output=True, check=True)
    find.wait()
    return time.perf_counter() - started, int(counted.stdout)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def scans(root: Path, times: int) -> list[tuple[float, int, int, int]]:
    """Each scan's (seconds, folders, backups, RSS growth of the index in bytes), through
    one started store (its start-up sweep of leftovers done first: it walks the root too)."""
    store = LocalBackupStore(LocalConfig(root=root, io="inline"), 60.0)
    await store.start()
    await asyncio.sleep(5)  # the sweep runs in the store's writer threads, unawaitable
    results = []
    try:
        for _ in range(times):
            index = FleetIndex(FleetConfig(), store, InMemoryDirectory([], []))
            before = rss_bytes()
            started = time.perf_counter()
            assert await index.scan()
            seconds = time.perf_counter() - started
            grown = rss_bytes() - before
            folders = list(index.folders())
            results.append((seconds, len(folders), sum(s.backups for _, s in folders), grown))
            del index, folders
    finally:
        await store.close()
    return results


async def fleet_p99(postgres: PostgresServer, systems: int, requests: int) -> dict[str, float]:
    database = PlatformDatabase(postgres, await postgres.new_database())
    await database.load(DIRECTORY)
    for statement in _OTHER_TENANTS:
        await database.execute(statement, systems)
    await database.execute("ANALYZE")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
        pg = {"dsn": database.dsn, "owner_organization_id": "org_owner"}
        config = make_config(
            work,
            {"backend": "local", "local": {"root": str(work / "backups"), "io": "inline"}},
            directory={"kind": "postgres", "postgres": pg},
            logging={"level": "WARNING"},
        )
        (work / "backups").mkdir()
        (work / "backups" / ROOT_MARKER).write_text("bench\n")
        async with TestClient(TestServer(create_app(config))) as client:
            # a distributor of the other tenants: ten resellers, a hundred customers
            headers = bearer(token_for("pad_d3", "distributor"))
            while (await client.get("/api/backups/fleet", headers=headers)).status == 503:
                await asyncio.sleep(0.05)
            shown = 0
            times = []
            for _ in range(requests):
                started = time.perf_counter()
                resp = await client.get("/api/backups/fleet?limit=100", headers=headers)
                body = await resp.json()
                times.append(time.perf_counter() - started)
                assert resp.status == 200, body
                shown = sum(body["data"]["counts"].values())
    times.sort()
    return {
        "reach": shown,
        "p50_ms": 1000 * statistics.median(times),
        "p99_ms": 1000 * times[int(0.99 * (len(times) - 1))],
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--backups", type=int, default=100_000)
    parser.add_argument("--root", type=Path, default=Path("/tmp/fleet-bench-root"))
    parser.add_argument("--platform-systems", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    started = time.perf_counter()
    build_root(args.root, args.folders, args.backups)
    print(f"root built in {time.perf_counter() - started:.0f}s", file=sys.stderr)
    find_seconds(args.root)  # warm the caches both walk
    finds = [find_seconds(args.root) for _ in range(3)]
    scanned = asyncio.run(scans(args.root, 3))
    best_find, files = min(finds)
    best_scan = min(scanned)
    seconds, folders, backups, _ = best_scan
    grown = scanned[0][3]  # the first index of the process: its growth is the index's
    result: dict[str, Any] = {
        "folders": folders,
        "backups": backups,
        "files": files,
        "find_seconds": round(best_find, 3),
        "scan_seconds": round(seconds, 3),
        "scan_over_find": round(seconds / best_find, 2),
        "index_bytes_per_system": round(grown / max(folders, 1)),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    }
    print(json.dumps(result), flush=True)
    if args.platform_systems:
        postgres = PostgresServer()  # its own asyncio.run: before ours
        try:
            answer = asyncio.run(fleet_p99(postgres, args.platform_systems, args.requests))
        finally:
            postgres.stop()
        print(json.dumps(answer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
