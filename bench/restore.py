"""Restores (DESIGN.md §10) against what a plain server or client does with the same bytes.

  local 1 GiB      the gateway restoring a 1 GiB backup from local disk (sendfile) vs
                   nginx (sendfile on) serving the same file: time ratio nginx/gateway
  local 64x10 MB   64 concurrent restores of 10 MB backups, a few rounds, vs nginx
  s3 1 GiB         the gateway streaming a 1 GiB object from SeaweedFS vs aiobotocore's
                   own get_object read loop into /dev/null (raw/gateway)

Every download goes to /dev/null through curl (one process, `--parallel` for the 64), the
same client for both sides of a ratio. For the gateway's 1 GiB restores it also reports
its RSS (peak minus before, sampled every 20 ms) and its CPU time per GiB (user+system of
its process and children, from /proc). Each figure is the best of `--rounds` (the machine
is shared: the best is the least disturbed), and every byte count is checked.

    .venv/bin/python bench/restore.py              # needs nginx on PATH (/usr/sbin too)
    .venv/bin/python bench/restore.py --rounds 3 --skip-s3
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
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
# the tests' own helpers and fixtures, and raw_s3's client: one copy of each
from raw_s3 import raw_client  # noqa: E402

from tests.servers import SeaweedServer  # noqa: E402
from tests.support import (  # noqa: E402
    APPLIANCE_SECRETS,
    KEEP_EVERYTHING,
    ROOT_MARKER,
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
SMALL = 10 * 1000 * 1000
CONCURRENT = 64
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
    """Seconds for curl to fetch every URL at once into /dev/null; checks the bytes."""
    args = ["curl", "-s", "--fail", "--parallel", "--parallel-max", str(len(urls))]
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
    """RSS (peak minus before) and CPU seconds of a process and its children, sampled."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self._rss()
        self.peak = self.before
        self._cpu_before = self._cpu()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _rss(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        return 0

    def _cpu(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
        return ticks / os.sysconf("SC_CLK_TCK")

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    def stop(self) -> tuple[float, float]:
        """(RSS growth in MB, CPU seconds)."""
        self._stop.set()
        self._thread.join()
        return (self.peak - self.before) / 1e6, self._cpu() - self._cpu_before


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
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/api/systems/backups/", proc.pid
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


def measured(name: str, pid: int, rounds: int, run: Callable[[], float]) -> dict[str, float]:
    """The best time of `rounds` 1 GiB restores, the most RSS any grew by, the least CPU."""
    times, rss, cpu = [], [], []
    for _ in range(rounds):
        usage = Usage(pid)
        times.append(run())
        grown, seconds = usage.stop()
        rss.append(grown)
        cpu.append(seconds)
    return {
        f"{name}_s": min(times),
        f"{name}_rss_growth_mb": max(rss),
        f"{name}_cpu_s_per_gib": min(cpu),
    }


def best(rounds: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(rounds))


def local(folder: Path, rounds: int) -> dict[str, float]:
    root = folder / "backups"
    root.mkdir()
    (root / ROOT_MARKER).touch()
    big_id, big_path = write_backup(root, GIB)
    small = [write_backup(root, SMALL) for _ in range(CONCURRENT)]
    storage = {
        "backend": "local",
        "local": {"root": str(root)},
        "retention": KEEP_EVERYTHING,
        # 64 restores of one organization's systems at once: past the default share of 32
        "download": {"max_open_backups_per_organization": CONCURRENT},
    }
    out: dict[str, float] = {}
    with nginx(folder, root) as plain:
        out["nginx_1gib_s"] = best(rounds, lambda: fetch([plain + big_path], [], GIB))
        urls = [plain + path for _, path in small]
        out["nginx_64x10mb_s"] = best(rounds, lambda: fetch(urls, [], SMALL))
    with gateway(folder, storage) as (base, pid):
        auth = [auth_header()]
        fetch([base + big_id], auth, GIB)  # warm: the page cache, the directory's cache
        out |= measured("gateway_1gib", pid, rounds, lambda: fetch([base + big_id], auth, GIB))
        urls = [base + backup_id for backup_id, _ in small]
        out["gateway_64x10mb_s"] = best(rounds, lambda: fetch(urls, auth, SMALL))
    out["ratio_1gib"] = out["nginx_1gib_s"] / out["gateway_1gib_s"]
    out["ratio_64x10mb"] = out["nginx_64x10mb_s"] / out["gateway_64x10mb_s"]
    return out


async def raw_read(endpoint: str, bucket: str, key: str) -> float:
    async with raw_client(endpoint, 1) as client:
        started = time.perf_counter()
        answer = await client.get_object(Bucket=bucket, Key=key)
        got = 0
        async with answer["Body"] as body:
            while piece := await body.read(1 << 20):
                got += len(piece)
        assert got == GIB, got
        return time.perf_counter() - started


def s3(folder: Path, rounds: int) -> dict[str, float]:
    server = SeaweedServer()
    try:
        bucket = "restore-bench"
        client = s3_client(server.endpoint)
        client.create_bucket(Bucket=bucket)
        location = location_for("org_c1", new_backup_id(".tar.gz"))
        source = folder / "big.bin"
        with source.open("wb") as sink:
            block = os.urandom(1 << 20)
            for _ in range(GIB // len(block)):
                sink.write(block)
        with source.open("rb") as body:
            client.put_object(Bucket=bucket, Key=location.relative_key, Body=body)
        source.unlink()
        out: dict[str, float] = {}
        out["raw_get_object_1gib_s"] = best(
            rounds, lambda: asyncio.run(raw_read(server.endpoint, bucket, location.relative_key))
        )
        storage = {
            "backend": "s3",
            "s3": s3_settings(server.endpoint, bucket),
            "retention": KEEP_EVERYTHING,
        }
        with gateway(folder, storage) as (base, pid):
            auth = [auth_header()]
            restore = [base + location.backup_id]
            out |= measured("gateway_s3_1gib", pid, rounds, lambda: fetch(restore, auth, GIB))
        out["ratio_s3_1gib"] = out["raw_get_object_1gib_s"] / out["gateway_s3_1gib_s"]
        return out
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="restore-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o755)  # nginx's workers run as another user
        if not args.skip_local:
            (folder / "local").mkdir()
            results |= local(folder / "local", args.rounds)
        if not args.skip_s3:
            (folder / "s3").mkdir()
            results |= s3(folder / "s3", args.rounds)
    for name, value in results.items():
        print(f"{name:32} {value:10.3f}")


if __name__ == "__main__":
    main()
