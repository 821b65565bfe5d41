"""Restores (DESIGN.md §10) against what a plain server or client does with the same bytes.

  local 1 GiB      the gateway restoring a 1 GiB backup from local disk (sendfile) vs
                   nginx (sendfile on) serving the same file: time ratio nginx/gateway
  local 64x10 MB   64 concurrent restores of 10 MB backups vs nginx: `--passes` times
                   over the 64 backups, 64 transfers in flight throughout
  s3 1 GiB         the gateway streaming a 1 GiB object from SeaweedFS vs aiobotocore's
                   own get_object read loop into nothing (raw/gateway)
  s3 64x10 MB      64 concurrent restores of 10 MB objects vs 64 concurrent raw read loops
                   (one aiobotocore client, a pool of 64 connections opened before the
                   clock starts, as the gateway's are), `--passes` times over the 64

The gateway's downloads go to /dev/null through curl (one process, `--parallel`), as do
nginx's; the raw S3 side reads in this process. Each row runs `--rounds` times, the
gateway and its baseline alternating (which goes first swaps each round), and reports the
range of times and of the per-round ratios (baseline time / gateway time). For every
gateway run it also reports the RSS growth (peak minus before, summed over the gateway's
process tree, sampled every 20 ms) and the CPU time per GiB sent (user+system of the same
processes, from /proc); for each row, how busy the machine was (cores, the host's steal,
the load average). Every byte count is checked. Page cache warm for local disk. Nothing
fails on speed: a run fails only on an error (a short or failed transfer).

    .venv/bin/python bench/restore.py              # needs nginx on PATH (/usr/sbin too)
    .venv/bin/python bench/restore.py --rounds 3 --skip-s3
    .venv/bin/python bench/restore.py --short      # 64 MiB and 64x1 MB, one round
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
# the tests' own helpers and fixtures, and raw_s3's client: one copy of each
from raw_s3 import raw_client  # noqa: E402
from read_side import rss_kb  # noqa: E402
from run import (  # noqa: E402
    machine_busy_seconds,
    machine_stolen_seconds,
    process_tree,
    tree_cpu_seconds,
)

from tests.servers import SeaweedServer  # noqa: E402
from tests.support import (  # noqa: E402
    APPLIANCE_SECRETS,
    KEEP_EVERYTHING,
    ROOT_MARKER,
    OutputWatcher,
    free_port,
    location_for,
    new_backup_id,
    s3_client,
    s3_settings,
    serve_gateway,
    stop_process,
    wait_for_port,
    write_config,
)

GIB = 1 << 30
CONCURRENT = 64


@dataclass(frozen=True)
class Sizes:
    big: int = GIB
    small: int = 10 * 1000 * 1000
    passes: int = 4  # of the concurrent rows: transfers = passes x CONCURRENT

    @property
    def big_name(self) -> str:
        return f"{self.big / GIB:g} GiB" if self.big >= GIB else f"{self.big >> 20} MiB"

    @property
    def small_name(self) -> str:
        return f"{self.small / 1e6:g} MB"


NGINX_CONF = """
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    server {{
        listen 127.0.0.1:{port};
        root {root};
    }}
}}
"""


def auth_header() -> str:
    token = base64.b64encode(f"KEY-C1:{APPLIANCE_SECRETS['sys_c1']}".encode()).decode()
    return f"Authorization: Basic {token}"


def fetch(urls: list[str], headers: list[str], expected: int) -> float:
    """Seconds for curl to fetch every URL into /dev/null, at most CONCURRENT at once;
    checks the bytes."""
    args = ["curl", "-s", "--fail", "--parallel", "--parallel-max", str(CONCURRENT)]
    for header in headers:
        args += ["-H", header]
    args += ["-w", "%{size_download}\n"]
    for url in urls:
        args += [url, "-o", "/dev/null"]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - started
    sizes = [int(line) for line in done.stdout.split()]
    assert sizes == [expected] * len(urls), sizes
    return seconds


class Usage:
    """RSS (peak minus before) and CPU seconds of a process tree (the gateway and its local
    I/O process), sampled."""

    def __init__(self, pid: int) -> None:
        self.pids = process_tree(pid)
        self.before = self._rss()
        self.peak = self.before
        self._cpu_before = tree_cpu_seconds(self.pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        return rss_kb(self.pids) * 1024

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[float, float]:
        """(RSS growth in MB, CPU seconds)."""
        self._stop.set()
        self._thread.join()
        return (self.peak - self.before) / 1e6, tree_cpu_seconds(self.pids) - self._cpu_before


@contextlib.contextmanager
def gateway(folder: Path, storage: dict[str, Any]) -> Iterator[tuple[str, int]]:
    port = free_port()
    config = write_config(
        folder,
        port,
        storage,
        logging={"level": "WARNING", "access_log": False},
        server={"request_timeout_seconds": 60},
    )
    proc = serve_gateway(config)
    output = OutputWatcher(proc)  # drained, so that a chatty gateway never blocks on its pipe
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/api/systems/backups/", proc.pid
    except BaseException:
        sys.stderr.write(output.text()[-4000:])
        raise
    finally:
        stop_process(proc)


@contextlib.contextmanager
def nginx(folder: Path, root: Path) -> Iterator[str]:
    port = free_port()
    conf = folder / "nginx.conf"
    conf.write_text(NGINX_CONF.format(dir=folder, port=port, root=root))
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([binary, "-c", str(conf), "-e", str(folder / "error.log")])
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        stop_process(proc)


def write_backup(root: Path, size: int) -> tuple[str, str]:
    """A backup as an upload leaves it (data and sidecar); its id and path under root."""
    location = location_for("org_c1", new_backup_id(".tar.gz"))
    path = root / location.relative_key
    path.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    with path.open("wb") as out:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            out.write(block)
            digest.update(block)
        rest = os.urandom(size % len(block))
        out.write(rest)
        digest.update(rest)
    meta = {"filename": "backup.tar.gz", "sha256": digest.hexdigest()}
    (root / (location.relative_key + ".meta.json")).write_text(json.dumps(meta))
    return location.backup_id, location.relative_key


class Row:
    """One figure against its baseline: `rounds` times each, the two alternating (which
    goes first swaps each round), with the gateway's RSS and CPU per GiB, and how busy the
    machine was meanwhile."""

    def __init__(self, name: str, baseline: str, size: int) -> None:
        self.name, self.baseline, self.size = name, baseline, size
        self.base_s: list[float] = []
        self.gateway_s: list[float] = []
        self.rss_before_mb: list[float] = []
        self.rss_mb: list[float] = []
        self.cpu_s_per_gib: list[float] = []
        self.load: list[float] = []  # the 1-minute load average as each round began
        self.cores = self.stolen = 0.0

    def measure(
        self, rounds: int, pid: int, base: Callable[[], float], gateway: Callable[[], float]
    ) -> Row:
        busy, stolen, started = machine_busy_seconds(), machine_stolen_seconds(), time.monotonic()
        for n in range(rounds):
            self.load.append(os.getloadavg()[0])
            if n % 2:
                self.base_s.append(base())
            usage = Usage(pid)
            self.gateway_s.append(gateway())
            grown, cpu = usage.stop()
            self.rss_before_mb.append(usage.before / 1e6)
            self.rss_mb.append(grown)
            self.cpu_s_per_gib.append(cpu * GIB / self.size)
            if not n % 2:
                self.base_s.append(base())
        wall = time.monotonic() - started
        self.cores = (machine_busy_seconds() - busy) / wall
        self.stolen = (machine_stolen_seconds() - stolen) / (wall * (os.cpu_count() or 1))
        return self

    def ratios(self) -> list[float]:
        """Baseline time / gateway time, round by round: the gateway's share of its speed."""
        return [b / g for b, g in zip(self.base_s, self.gateway_s, strict=True)]

    def lines(self) -> list[str]:
        def rates(times: list[float]) -> str:
            mb = sorted(self.size / t / 1e6 for t in times)
            return f"{mb[0]:,.0f}-{mb[-1]:,.0f} MB/s"

        def span(values: list[float], form: str) -> str:
            return f"{min(values):{form}} to {max(values):{form}}"

        r = self.ratios()
        return [
            f"{self.name}",
            f"  gateway   {rates(self.gateway_s):>22}  {[round(t, 3) for t in self.gateway_s]} s",
            f"  {self.baseline:9} {rates(self.base_s):>22}  {[round(t, 3) for t in self.base_s]} s",
            f"  ratio {min(r):.2f}-{max(r):.2f} (median {statistics.median(r):.2f}; target >= 0.8)"
            f"  per round: {', '.join(f'{x:.2f}' for x in r)}",
            f"  gateway CPU {span(self.cpu_s_per_gib, '.2f')} s/GiB; RSS "
            f"{span(self.rss_before_mb, '.1f')} MB before, growth {span(self.rss_mb, '+.1f')} MB",
            f"  machine {self.cores:.2f} cores busy, steal {self.stolen:.1%}, "
            f"load {span(self.load, '.1f')}",
        ]


def local(folder: Path, rounds: int, sizes: Sizes) -> list[Row]:
    root = folder / "backups"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    big_id, big_path = write_backup(root, sizes.big)
    small = [write_backup(root, sizes.small) for _ in range(CONCURRENT)]
    storage = {
        "backend": "local",
        "local": {"root": str(root)},
        "retention": KEEP_EVERYTHING,
        # 64 restores of one organization's systems at once: past the default share of 32
        "download": {"max_open_backups_per_organization": CONCURRENT},
    }
    with nginx(folder, root) as plain, gateway(folder, storage) as (base, pid):
        auth = [auth_header()]
        fetch([base + big_id], auth, sizes.big)  # warm: the page cache, the directory's cache
        fetch([plain + big_path], [], sizes.big)
        big = Row(f"local, one {sizes.big_name} restore", "nginx", sizes.big).measure(
            rounds,
            pid,
            lambda: fetch([plain + big_path], [], sizes.big),
            lambda: fetch([base + big_id], auth, sizes.big),
        )
        plain_urls = [plain + path for _, path in small] * sizes.passes
        urls = [base + backup_id for backup_id, _ in small] * sizes.passes
        fetch(plain_urls[:CONCURRENT], [], sizes.small)
        fetch(urls[:CONCURRENT], auth, sizes.small)
        many = Row(
            f"local, {CONCURRENT} concurrent {sizes.small_name} restores x{sizes.passes}",
            "nginx",
            len(urls) * sizes.small,
        ).measure(
            rounds,
            pid,
            lambda: fetch(plain_urls, [], sizes.small),
            lambda: fetch(urls, auth, sizes.small),
        )
    return [big, many]


async def raw_read(endpoint: str, bucket: str, keys: list[str], size: int) -> float:
    """aiobotocore's own get_object read loop over `keys`, CONCURRENT at once, into nothing:
    seconds. The client's connections are opened first (a HeadObject each), as a running
    gateway's pool already holds them."""
    async with raw_client(endpoint, CONCURRENT) as client:
        await asyncio.gather(
            *(client.head_object(Bucket=bucket, Key=key) for key in keys[:CONCURRENT])
        )
        slots = asyncio.Semaphore(CONCURRENT)

        async def one(key: str) -> None:
            async with slots:
                answer = await client.get_object(Bucket=bucket, Key=key)
                got = 0
                async with answer["Body"] as body:
                    while piece := await body.read(1 << 20):
                        got += len(piece)
            assert got == size, got

        started = time.perf_counter()
        await asyncio.gather(*(one(key) for key in keys))
        return time.perf_counter() - started


def put(client: Any, bucket: str, key: str, source: Path, size: int) -> None:
    with source.open("wb") as sink:
        block = os.urandom(1 << 20)
        for _ in range(size // len(block)):
            sink.write(block)
        sink.write(os.urandom(size % len(block)))
    with source.open("rb") as body:
        client.put_object(Bucket=bucket, Key=key, Body=body)
    source.unlink()


def s3(folder: Path, rounds: int, sizes: Sizes) -> list[Row]:
    server = SeaweedServer()
    try:
        bucket = "restore-bench"
        client = s3_client(server.endpoint)
        client.create_bucket(Bucket=bucket)
        big = location_for("org_c1", new_backup_id(".tar.gz"))
        put(client, bucket, big.relative_key, folder / "big.bin", sizes.big)
        small = [location_for("org_c1", new_backup_id(".tar.gz")) for _ in range(CONCURRENT)]
        for location in small:
            put(client, bucket, location.relative_key, folder / "small.bin", sizes.small)
        storage = {
            "backend": "s3",
            "s3": s3_settings(server.endpoint, bucket, max_pool_connections=CONCURRENT),
            "retention": KEEP_EVERYTHING,
            "download": {"max_open_backups_per_organization": CONCURRENT},
        }
        endpoint = server.endpoint
        small_keys = [location.relative_key for location in small] * sizes.passes
        with gateway(folder, storage) as (base, pid):
            auth = [auth_header()]
            fetch([base + big.backup_id], auth, sizes.big)  # warm, as the raw side's is
            asyncio.run(raw_read(endpoint, bucket, [big.relative_key], sizes.big))
            one = Row(
                f"s3 (SeaweedFS), one {sizes.big_name} restore", "raw get", sizes.big
            ).measure(
                rounds,
                pid,
                lambda: asyncio.run(raw_read(endpoint, bucket, [big.relative_key], sizes.big)),
                lambda: fetch([base + big.backup_id], auth, sizes.big),
            )
            urls = [base + location.backup_id for location in small] * sizes.passes
            fetch(urls[:CONCURRENT], auth, sizes.small)  # the gateway's pool of 64, opened
            many = Row(
                f"s3 (SeaweedFS), {CONCURRENT} concurrent {sizes.small_name} restores "
                f"x{sizes.passes}",
                "raw get",
                len(urls) * sizes.small,
            ).measure(
                rounds,
                pid,
                lambda: asyncio.run(raw_read(endpoint, bucket, small_keys, sizes.small)),
                lambda: fetch(urls, auth, sizes.small),
            )
        return [one, many]
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--passes", type=int, default=4, help="of the 64 concurrent restores")
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    parser.add_argument(
        "--short", action="store_true", help="CI: small and quick; fails on errors, never on speed"
    )
    args = parser.parse_args()
    sizes = Sizes(passes=args.passes)
    if args.short:
        args.rounds, sizes = 1, Sizes(big=64 << 20, small=1000 * 1000, passes=1)
    rows: list[Row] = []
    print(
        f"# {os.cpu_count()} cores, load {' '.join(f'{x:.1f}' for x in os.getloadavg())}, "
        f"{args.rounds} rounds"
    )
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # nginx's workers run as another user
        if not args.skip_local:
            (folder / "local").mkdir()
            rows += local(folder / "local", args.rounds, sizes)
        if not args.skip_s3:
            (folder / "s3").mkdir()
            rows += s3(folder / "s3", args.rounds, sizes)
    for row in rows:
        print("\n".join(row.lines()))
    return 0  # an error (a short transfer, a failed request) has raised before this


if __name__ == "__main__":
    raise SystemExit(main())
