"""How many folder fsyncs a second this disk does: the ceiling of durable local deletes.

    .venv/bin/python bench/fsync_rate.py                 # 20 and 50 folders, 1-50 threads
    .venv/bin/python bench/fsync_rate.py 20:8 50:16      # folders:threads pairs

Each round unlinks one file in each folder, then fsyncs every folder once, the folders
shared out in contiguous parts over the threads, as the local I/O process does. A
durable delete costs one fsync of its folder unless another delete in the same folder
shares the round; at 64 connections over 50 folders that is ~1 fsync a delete, so this
rate bounds the (b) rows. Runs in a temporary folder on the file system of --dir.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def measure(base: str, folders: int, threads: int, rounds: int) -> str:
    root = tempfile.mkdtemp(prefix="fsync-rate-", dir=base)
    fds = []
    try:
        for i in range(folders):
            folder = os.path.join(root, f"f{i}")
            os.mkdir(folder)
            for r in range(rounds):
                with open(os.path.join(folder, f"x{r}"), "wb"):
                    pass
            fds.append(os.open(folder, os.O_RDONLY | os.O_DIRECTORY))
        os.sync()  # the files are on disk before the clock starts, like real backups
        share = -(-folders // min(threads, folders))
        parts = [fds[i : i + share] for i in range(0, folders, share)]
        with ThreadPoolExecutor(threads) as pool:
            started, cpu0 = time.perf_counter(), os.times()
            for r in range(rounds):
                for fd in fds:
                    os.unlink(f"x{r}", dir_fd=fd)
                list(pool.map(fsync_each, parts))
            elapsed, cpu1 = time.perf_counter() - started, os.times()
    finally:
        for fd in fds:
            os.close(fd)
        shutil.rmtree(root, ignore_errors=True)
    n = folders * rounds
    cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    return (
        f"{folders:>3} folders {threads:>3} threads: round {1000 * elapsed / rounds:5.2f} ms, "
        f"{n / elapsed:>6.0f} fsyncs/s, {1e6 * cpu / n:3.0f} us of CPU a fsync (unlinks included)"
    )


def fsync_each(fds: list[int]) -> None:
    for fd in fds:
        os.fsync(fd)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs", nargs="*", default=["20:1", "20:8", "20:20", "50:8", "50:50"])
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    print(f"# {os.cpu_count()} cores, {args.rounds} rounds, in {args.dir}")
    for pair in args.pairs:
        folders, threads = (int(x) for x in pair.split(":"))
        print(measure(args.dir, folders, threads, args.rounds), flush=True)


if __name__ == "__main__":
    main()
