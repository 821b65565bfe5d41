"""Profile the gateway under wrk load with py-spy; print where the time goes.

    .venv/bin/python bench/profile.py [--seconds 8] [--concurrency 64] [--process io]
    .venv/bin/python bench/profile.py --backend s3      # deletes on SeaweedFS
    .venv/bin/python bench/profile.py --directory postgres-cold   # every lookup asked

`--process io` samples the local I/O process instead of the gateway's event loop.

Samples every thread (--idle off), then sums samples by function (self time) and by
top-level phase, so before/after comparisons are one command.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import run as bench


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--no-fsync", action="store_true")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument(
        "--process",
        choices=["gateway", "io"],
        default="gateway",
        help="sample the gateway's event loop, or its local I/O process",
    )
    parser.add_argument("--backend", choices=["local", "s3"], default="local")
    parser.add_argument(
        "--directory",
        choices=["file", "postgres-cold"],
        default="file",
        help="postgres-cold: the tests' PostgreSQL as the directory, cache_seconds 0",
    )
    parser.add_argument(
        "--platform-systems",
        type=int,
        default=200_000,
        help="postgres-cold: other tenants' systems in its tables, as bench/platform_rows.py",
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gateway-profile-"))
    port = bench.free_port()
    weed = None
    if args.backend == "s3":
        weed = bench.seaweedfs()
        bench.make_bucket(weed.endpoint, "profile")
        storage = bench.s3_storage(weed.endpoint, "profile")
        backups = 200
    else:
        storage = {
            "backend": "local",
            "local": {"root": str(work / "backups"), "fsync": not args.no_fsync},
        }
        backups = 1200
    config = bench.gateway_config(work, port, storage)
    text = config.read_text().replace("level: INFO", f"level: {args.log_level}")
    config.write_text(text)
    bench.seed(config, bench.SYSTEMS, backups, work / "ids.txt")
    servers: list[Any] = []
    if args.directory == "postgres-cold":
        from platform_rows import use_platform

        from tests.servers import PostgresServer, RedisServer

        servers += [PostgresServer(), RedisServer()]
        platform = {"postgres": {"cache_seconds": 0}}
        use_platform(work, servers[0], servers[1], platform, args.platform_systems)
    server = bench.Process(
        [str(bench.BIN / "backup-gateway"), "serve", "--config", str(config)], work / "gateway.log"
    )
    bench.wait_port(port, server.proc)
    bench.wait_ready(port, server.proc)
    bench.wait_logged(server.log, "fleet scan done", 1, server.proc)
    target = server.proc.pid
    if args.process == "io":
        [target] = [p for p in bench.process_tree(server.proc.pid) if p != server.proc.pid]
    raw = work / "profile.txt"
    spy = subprocess.Popen(
        [
            str(bench.BIN / "py-spy"),
            "record",
            "--pid",
            str(target),
            "--duration",
            str(args.seconds),
            "--format",
            "raw",
            "--output",
            str(raw),
            "--threads",
            "--nonblocking",  # pausing the process for each sample distorts what it measures
            "--rate",
            "250",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    result = bench.run_load(
        port, work / "ids.txt", bench.owner_token(config), args.concurrency, args.seconds, "wrk"
    )
    spy.wait()
    server.stop()
    for s in [weed, *servers]:
        if s is not None:
            s.stop()
    print(f"{result['requests'] / result['seconds']:.0f} req/s, p99 {result['p99_ms']:.1f} ms")
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count)
        total += n
        self_time[frames[-1].split(" (")[0] + " " + frames[-1].split("/")[-1]] += n
        for name in {f.split(" (")[0] for f in frames}:
            inclusive[name] += n
    print(f"{total} samples; top self time:")
    for name, n in self_time.most_common(25):
        print(f"{100 * n / total:6.1f}%  {name}")
    by_file: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        path = leaf.rsplit("(", 1)[-1].split(":")[0]
        parts = path.split("/")
        key = "/".join(parts[-2:]) if "site-packages" in path or "python3" in path else path
        by_file[key] += int(count)
    print("self time by file:")
    for name, n in by_file.most_common(20):
        print(f"{100 * n / total:6.1f}%  {name}")
    print("inclusive time:")
    for name, n in inclusive.most_common(40):
        print(f"{100 * n / total:6.1f}%  {name}")


if __name__ == "__main__":
    main()
