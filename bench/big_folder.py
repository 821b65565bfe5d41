"""A folder of a million backups, listed through the local store as the gateway does (issue
#26, 5): the newest `max_list_items` described, count and bytes of all, within the operation
timeout, in bounded memory, while another folder's deletes go on.

    .venv/bin/python bench/big_folder.py --root /work/scratch/big --make 1000000
    .venv/bin/python bench/big_folder.py --root /work/scratch/big            # list only

Each backup has a small data file and a sidecar (two million names in one folder). Reports
the wall time of each listing, the I/O process's peak RSS, and the latency of deletes in
another folder made while the listings run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from pathlib import Path

from storage_backends import BackupLocation, LocalBackupStore, LocalConfig, SystemFolder
from storage_backends.ids import new_uuid7
from storage_backends.local import ROOT_MARKER

ORG, KEY = "org_big", "KEY-BIG"


def make(root: Path, count: int) -> None:
    folder = root / ORG / KEY
    folder.mkdir(parents=True, exist_ok=True)
    (root / ROOT_MARKER).touch()
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    start = int(time.time() * 1000) - count
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        for n in range(count):
            bid = new_uuid7(start + n) + ".tar.gz"
            data = os.open(bid, flags, 0o640, dir_fd=fd)
            os.write(data, b"x" * (n % 100 + 1))
            os.close(data)
            meta = os.open(bid + ".meta.json", flags, 0o640, dir_fd=fd)
            os.write(meta, json.dumps({"filename": f"b{n}.tar.gz"}).encode())
            os.close(meta)
    finally:
        os.close(fd)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run(root: Path, rounds: int, limit: int, timeout: float) -> None:
    store = LocalBackupStore(LocalConfig(root=root), timeout)
    await store.start()
    try:
        other = SystemFolder("org_other", "KEY-OTHER")
        (root / other.organization_id / other.system_key).mkdir(parents=True, exist_ok=True)
        pid = store.io_process_pid
        assert pid is not None
        print(f"I/O process peak RSS before: {peak_rss_mb(pid):.0f} MB")
        for _ in range(rounds):
            ids = [new_uuid7(int(time.time() * 1000)) for _ in range(50)]
            for bid in ids:
                (root / other.organization_id / other.system_key / bid).write_bytes(b"x")
            started = time.perf_counter()
            listing = asyncio.ensure_future(store.list_newest(SystemFolder(ORG, KEY), limit))
            waits = []
            for bid in ids:  # one after another while the listing runs
                t = time.perf_counter()
                await store.delete(BackupLocation(other.organization_id, other.system_key, bid))
                waits.append((time.perf_counter() - t) * 1000)
            result = await listing
            took = time.perf_counter() - started
            print(
                f"listed {len(result.backups)} of {result.count} ({result.total_bytes} bytes) "
                f"in {took:.2f} s; 50 deletes meanwhile: median {statistics.median(waits):.1f} ms, "
                f"max {max(waits):.1f} ms; I/O process peak RSS {peak_rss_mb(pid):.0f} MB"
            )
    finally:
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--make", type=int, default=0, help="create this many backups first")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()
    if args.make:
        t = time.perf_counter()
        make(args.root, args.make)
        print(f"made {args.make} backups in {time.perf_counter() - t:.0f} s")
    asyncio.run(run(args.root, args.rounds, args.limit, args.timeout))


if __name__ == "__main__":
    main()
