"""The fleet's figures (DESIGN.md §13, issue #31):

    .venv/bin/python bench/fleet_scan.py [--folders 10000] [--backups 100000] [--root DIR]
        [--rounds 5] [--s3-keys 200000] [--platform-systems 200000] [--requests 300]
        [--only local,s3,fleet]

1. local: a root of --folders system folders holding --backups backups (each with its
   sidecar, as the gateway writes them) scanned by the store's `folder_summaries` through a
   new FleetIndex, against `find ROOT -type f | wc -l` on the same warm root; the two, and
   `find ROOT -type f ! -name '*.meta.json' -printf '%s\\n' | wc -l` (the same walk stat'ing
   each backup, as a scan must for its bytes: the floor in C, for reference), alternate
   --rounds times. Wall and CPU seconds, the scan's ratio to find per round, the load.
   The first scan of a root this large is shared among processes, one a core (their CPU
   counted with the scan's). Each round's index then scans again (a rescan: nothing
   changed, every folder's mark older than the walk's racy window, so it reads only the
   slice of folders whose turn it is to be read in full: 1 of 144 at the default
   `fleet.scan_seconds`), timed the same way.
   Then the RSS growth of the first index once its folders are in, per system.
2. s3: --s3-keys backups (ten a folder) under a prefix of a SeaweedFS bucket (the tests'
   server), listed by a raw aiobotocore `list_objects_v2` paginator over the prefix and by
   the store's `folder_summaries`, alternating --rounds times: keys a second each.
3. fleet: GET /api/backups/fleet?limit=100 for a distributor over a platform-sized
   PostgreSQL (bench/platform_rows.py's other tenants, --platform-systems systems), and a
   cached delete (a seeded backup of a system whose lookup the directory's cache holds)
   beside it: one of each in turn, sequential, on one gateway: p50 and p99 of each.
The root is kept (--root) between runs: building it is the slow part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml
from aiohttp.test_utils import TestClient, TestServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from platform_rows import _OTHER_TENANTS
from raw_s3 import raw_client

from gateway import create_app
from gateway.config import FleetConfig
from gateway.directory import InMemoryDirectory
from gateway.fleet import FleetIndex
from storage_backends import LocalBackupStore, LocalConfig
from storage_backends.ids import new_uuid7
from storage_backends.local import ROOT_MARKER
from storage_backends.s3 import S3Config, create_store
from tests.servers import PlatformDatabase, PostgresServer, SeaweedServer
from tests.support import DIRECTORY, LocalHarness, bearer, location_for, make_config, token_for

SIDECAR = b'{"filename":"b.tar.gz","sha256":"","mimetype":"application/gzip"}'


def build_root(root: Path, folders: int, backups: int) -> None:
    done = root / ".built"
    if done.exists() and done.read_text() == f"{folders} {backups}":
        return
    root.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).write_text("bench\n")
    per = backups // folders
    now = int(time.time() * 1000)
    for f in range(folders):
        folder = root / f"org_{f % 1000:04d}" / f"KEY-{f:07d}"
        folder.mkdir(parents=True, exist_ok=True)
        for b in range(per):
            name = new_uuid7(now - (f * per + b) * 1000) + ".tar.gz"
            (folder / name).write_bytes(b"x" * 64)
            (folder / (name + ".meta.json")).write_bytes(SIDECAR)
    done.write_text(f"{folders} {backups}")


def children_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def own_cpu() -> float:
    used = resource.getrusage(resource.RUSAGE_SELF)
    return used.ru_utime + used.ru_stime


def counted(command: list[str]) -> tuple[float, float, int]:
    """`command | wc -l`: (wall seconds, CPU seconds of both, lines)."""
    cpu, started = children_cpu(), time.perf_counter()
    listing = subprocess.Popen(command, stdout=subprocess.PIPE)
    lines = subprocess.run(["wc", "-l"], stdin=listing.stdout, capture_output=True, check=True)
    listing.wait()
    return time.perf_counter() - started, children_cpu() - cpu, int(lines.stdout)


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def spread(values: list[float], digits: int = 2) -> str:
    """min-max (median) of a figure over the rounds."""
    low, high, mid = min(values), max(values), statistics.median(values)
    return f"{low:.{digits}f}-{high:.{digits}f} (median {mid:.{digits}f})"


class ScanDone(logging.Handler):
    """The fields of the index's last "fleet scan done" line (folders, unchanged)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.fields: dict[str, Any] = {}

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "fleet scan done":
            self.fields = dict(record.fields)  # type: ignore[attr-defined]


async def local_rounds(root: Path, rounds: int) -> dict[str, Any]:
    """find, the stat'ing find and the scan in turn, `rounds` times, through one started
    store (its start-up sweep of leftovers done first: it walks the root too)."""
    store = LocalBackupStore(LocalConfig(root=root, io="inline"), 60.0)
    await store.start()
    await asyncio.sleep(5)  # the sweep runs in the store's writer threads, unawaitable
    find = ["find", str(root), "-type", "f"]
    floor = [*find, "!", "-name", "*.meta.json", "-printf", "%s\\n"]
    counted(find)  # warm the caches the walks read
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            *("find", "find_cpu", "floor", "floor_cpu", "scan", "scan_cpu", "load"),
            *("rescan", "rescan_cpu", "read_in_full"),
        )
    }
    done = ScanDone()
    logging.getLogger("gateway.fleet.index").addHandler(done)
    logging.getLogger("gateway.fleet.index").setLevel(logging.INFO)
    grown = folders = backups = files = 0
    try:
        for turn in range(rounds):
            seconds, cpu, files = counted(find)
            rows["find"].append(seconds)
            rows["find_cpu"].append(cpu)
            seconds, cpu, _ = counted(floor)
            rows["floor"].append(seconds)
            rows["floor_cpu"].append(cpu)
            index = FleetIndex(FleetConfig(), store, InMemoryDirectory([], []))
            # a large root's first walk is shared among processes (storage_backends.local.
            # scan_process): their CPU counts with the scan's
            before, started = rss_bytes(), time.perf_counter()
            cpu = own_cpu() + children_cpu()
            assert await index.scan()
            rows["scan"].append(time.perf_counter() - started)
            rows["scan_cpu"].append(own_cpu() + children_cpu() - cpu)
            if turn == 0:  # the first index of the process: its growth is the index's
                grown = rss_bytes() - before
            cpu, started = own_cpu(), time.perf_counter()
            assert await index.scan()
            rows["rescan"].append(time.perf_counter() - started)
            rows["rescan_cpu"].append(own_cpu() - cpu)
            rows["read_in_full"].append(done.fields["folders"] - done.fields["unchanged"])
            summaries = list(index.folders())
            folders, backups = len(summaries), sum(s.backups for _, s in summaries)
            del index, summaries
            rows["load"].append(os.getloadavg()[0])
            print(
                f"  local round {turn + 1}: find {rows['find'][-1]:.2f} s, "
                f"find stat'ing backups {rows['floor'][-1]:.2f} s, scan {rows['scan'][-1]:.2f} s, "
                f"rescan {rows['rescan'][-1]:.2f} s, "
                f"load {rows['load'][-1]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    finally:
        await store.close()
    ratio = [s / f for s, f in zip(rows["scan"], rows["find"], strict=True)]
    cpu_ratio = [s / f for s, f in zip(rows["scan_cpu"], rows["find_cpu"], strict=True)]
    floor_ratio = [s / f for s, f in zip(rows["floor"], rows["find"], strict=True)]
    return {
        "folders": folders,
        "backups": backups,
        "files": files,
        "find_seconds": spread(rows["find"], 3),
        "scan_seconds": spread(rows["scan"], 3),
        "scan_over_find": spread(ratio),
        "scan_over_find_cpu": spread(cpu_ratio),
        "find_statting_backups_over_find": spread(floor_ratio),
        "scan_over_find_statting_backups": spread(
            [s / f for s, f in zip(rows["scan"], rows["floor"], strict=True)]
        ),
        "rescan_seconds": spread(rows["rescan"], 3),
        "rescan_folders_read_in_full": spread(rows["read_in_full"], 0),
        "rescan_over_find": spread(
            [s / f for s, f in zip(rows["rescan"], rows["find"], strict=True)]
        ),
        "rescan_over_find_cpu": spread(
            [s / f for s, f in zip(rows["rescan_cpu"], rows["find_cpu"], strict=True)]
        ),
        "index_bytes_per_system": round(grown / max(folders, 1)),
        "load_1min": spread(rows["load"], 1),
    }


async def put_keys(endpoint: str, bucket: str, prefix: str, keys: int) -> None:
    """`keys` backups of 64 bytes, ten a folder, a hundred folders an organization."""
    now = int(time.time() * 1000)
    async with raw_client(endpoint, 64) as client:
        await client.create_bucket(Bucket=bucket)
        gate = asyncio.Semaphore(64)

        async def put(n: int) -> None:
            folder = n // 10
            key = (
                f"{prefix}org_{folder // 100:05d}/KEY-{folder:07d}/"
                f"{new_uuid7(now - n * 1000)}.tar.gz"
            )
            async with gate:
                await client.put_object(Bucket=bucket, Key=key, Body=b"x" * 64)

        for start in range(0, keys, 10_000):
            await asyncio.gather(*(put(n) for n in range(start, min(keys, start + 10_000))))


async def s3_rounds(keys: int, rounds: int) -> dict[str, Any]:
    server = SeaweedServer()
    bucket, prefix = "fleet", "tenant/"
    try:
        started = time.perf_counter()
        await put_keys(server.endpoint, bucket, prefix, keys)
        print(f"  {keys} keys put in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        config = S3Config(
            bucket=bucket,
            endpoint_url=server.endpoint,
            access_key_id=server.ACCESS_KEY,
            secret_access_key=server.SECRET_KEY,
            addressing_style="path",
            prefix=prefix,
        )
        store = create_store(config, 60.0)
        await store.start()

        # the raw side's client made once, as the store's was at its start
        client = await raw_client(server.endpoint, 10).__aenter__()

        async def raw() -> int:
            seen = 0
            pages = client.get_paginator("list_objects_v2")
            async for page in pages.paginate(Bucket=bucket, Prefix=prefix):
                seen += len(page.get("Contents", []))
            return seen

        async def scan() -> int:
            seen = 0
            async for batch in store.folder_summaries():
                seen += sum(s.count for s in batch)
            return seen

        rates: dict[str, list[float]] = {"raw": [], "scan": []}
        loads = []
        try:
            for turn in range(rounds):
                order = [("raw", raw), ("scan", scan)]
                for name, listing in order if turn % 2 == 0 else order[::-1]:
                    started = time.perf_counter()
                    assert await listing() == keys, name
                    rates[name].append(keys / (time.perf_counter() - started))
                loads.append(os.getloadavg()[0])
                print(
                    f"  s3 round {turn + 1}: raw {rates['raw'][-1]:.0f} keys/s, "
                    f"scan {rates['scan'][-1]:.0f} keys/s, load {loads[-1]:.1f}",
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            await client.__aexit__(None, None, None)
            await store.close()
    finally:
        server.stop()
    ratio = [s / r for s, r in zip(rates["scan"], rates["raw"], strict=True)]
    return {
        "keys": keys,
        "raw_keys_per_second": spread(rates["raw"], 0),
        "scan_keys_per_second": spread(rates["scan"], 0),
        "scan_over_raw": spread(ratio),
        "load_1min": spread(loads, 1),
    }


async def fleet_p99(postgres: PostgresServer, systems: int, requests: int) -> dict[str, Any]:
    database = PlatformDatabase(postgres, await postgres.new_database())
    await database.load(DIRECTORY)
    for statement in _OTHER_TENANTS:
        await database.execute(statement, systems)
    await database.execute("ANALYZE")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
        pg = {"dsn": database.dsn, "owner_organization_id": "org_owner"}  # cache_seconds 5
        harness = LocalHarness(work / "backups", io="inline")
        doomed = [new_uuid7(int(time.time() * 1000) - n) + ".tar.gz" for n in range(requests)]
        for backup_id in doomed:
            harness.put(location_for("org_c1", backup_id))
        config = make_config(
            work,
            harness.storage(),
            directory={"kind": "postgres", "postgres": pg},
            logging={"level": "WARNING"},
        )
        async with TestClient(TestServer(create_app(config))) as client:
            # a distributor of the other tenants: ten resellers, a hundred customers
            fleet = bearer(token_for("pad_d3", "distributor"))
            deleter = bearer(token_for("org_c1"))
            while (await client.get("/api/backups/fleet", headers=fleet)).status == 503:
                await asyncio.sleep(0.05)
            # the delete's first lookup fills the directory's cache; the rest are cached
            first = f"/api/systems/sys_c1/backups/{doomed.pop()}"
            resp = await client.delete(first, headers=deleter)
            assert resp.status == 200, await resp.text()
            shown = 0
            times: dict[str, list[float]] = {"fleet": [], "delete": []}

            async def timed(name: str, request: Callable[[], Awaitable[Any]]) -> Any:
                started = time.perf_counter()
                resp = await request()
                body = await resp.read()
                times[name].append(time.perf_counter() - started)
                assert resp.status == 200, body
                return body

            for backup_id in doomed:
                body = await timed(
                    "fleet", lambda: client.get("/api/backups/fleet?limit=100", headers=fleet)
                )
                shown = sum(json.loads(body)["data"]["counts"].values())
                await timed(
                    "delete",
                    lambda b=backup_id: client.delete(  # type: ignore[misc]
                        f"/api/systems/sys_c1/backups/{b}", headers=deleter
                    ),
                )
    result: dict[str, Any] = {"reach": shown, "requests": len(times["fleet"])}
    for name, seen in times.items():
        seen.sort()
        result[f"{name}_p50_ms"] = round(1000 * statistics.median(seen), 2)
        result[f"{name}_p99_ms"] = round(1000 * seen[int(0.99 * (len(seen) - 1))], 2)
    result["load_1min"] = round(os.getloadavg()[0], 1)
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--backups", type=int, default=100_000)
    parser.add_argument("--root", type=Path, default=Path("/tmp/fleet-bench-root"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--s3-keys", type=int, default=200_000)
    parser.add_argument("--platform-systems", type=int, default=200_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--only", default="local,s3,fleet")
    args = parser.parse_args()
    only = set(args.only.split(","))
    print(f"# {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the start", flush=True)
    if "local" in only:
        started = time.perf_counter()
        build_root(args.root, args.folders, args.backups)
        print(f"  root built in {time.perf_counter() - started:.0f}s", file=sys.stderr)
        local = asyncio.run(local_rounds(args.root, args.rounds))
        print("local " + json.dumps(local), flush=True)
        print(f"  max RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MB")
    if "s3" in only:
        print("s3 " + json.dumps(asyncio.run(s3_rounds(args.s3_keys, args.rounds))), flush=True)
    if "fleet" in only:
        postgres = PostgresServer()  # its own asyncio.run: before ours
        try:
            answer = asyncio.run(fleet_p99(postgres, args.platform_systems, args.requests))
        finally:
            postgres.stop()
        print("fleet " + json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
