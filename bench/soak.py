"""Soak: mixed traffic for a long time against the real server, then prove nothing leaked.

    .venv/bin/python bench/soak.py                  # 10 minutes each on local and S3
    .venv/bin/python bench/soak.py --short          # CI: 30 seconds each

Traffic: valid deletes, phantom ids (404), bad tokens (401), other tenants and missing
permissions (403), malformed ids (400). Afterwards: every 200 matches an object gone, every
non-200 left its object, RSS grew less than 10% after warm-up, open fds are flat (both
summed over the gateway and its local I/O process).
Exit status 1 on any violation.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

from gateway.config import load_config
from gateway.identity.tokens import mint_token
from storage_backends import BackupLocation
from storage_backends.ids import new_uuid7

CUSTOMERS = [f"org_cust_{i:06d}" for i in range(4)]


@dataclass
class Tally:
    expected: dict[str, int] = field(default_factory=dict)
    wrong: list[str] = field(default_factory=list)
    deleted: set[str] = field(default_factory=set)
    kept: set[str] = field(default_factory=set)


def server_sample(pid: int) -> tuple[float, int]:
    """RSS in MB, and open fds that are not sockets (files, folders, pipes), summed over
    the gateway and its local I/O process.

    Sockets come and go with the client's keep-alive pool, so they say nothing about a
    leak; a folder fd left open by a delete (in either process) would show here.
    """
    rss = 0
    fds = 0
    for p in bench.process_tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1])
            for fd in Path(f"/proc/{p}/fd").iterdir():
                try:
                    if not os.readlink(fd).startswith("socket:"):
                        fds += 1
                except OSError:
                    pass
        except OSError:
            pass
    return rss / 1024, fds


async def traffic(
    port: int,
    config_path: Path,
    pool: list[BackupLocation],
    others: list[BackupLocation],
    seconds: float,
    rate: float,
    tally: Tally,
    samples: list[tuple[float, float, int]],
    pid: int,
) -> None:
    config = load_config(config_path)
    tokens = {org: mint_token(config.auth, org, "customer", ttl_seconds=7200) for org in CUSTOMERS}
    no_perm = mint_token(config.auth, CUSTOMERS[0], "customer", ("read:systems",), 7200)
    bad = tokens[CUSTOMERS[0]][:-3] + "abc"
    rng = random.Random(7)
    base = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    sent = 0

    def system_of(loc: BackupLocation) -> str:
        return "sys_" + loc.organization_id.removeprefix("org_cust_")

    async def one(session: aiohttp.ClientSession) -> None:
        kind = rng.choices(
            ["valid", "phantom", "401", "403", "403perm", "400"], [40, 20, 10, 10, 5, 15]
        )[0]
        loc = None
        if kind == "valid" and pool:
            loc = pool.pop()
            token, path, want = tokens[loc.organization_id], loc, 200
        elif kind == "403" or (kind == "valid" and not pool):
            loc = rng.choice(others)  # another tenant's backup: must stay
            caller = next(c for c in CUSTOMERS if c != loc.organization_id)
            token, path, want = tokens[caller], loc, 403
        elif kind == "403perm":
            loc = rng.choice(others)
            token, path, want = no_perm, loc, 403
        elif kind == "401":
            loc = rng.choice(others)
            token, path, want = bad, loc, 401
        elif kind == "phantom":
            org = rng.choice(CUSTOMERS)
            path = BackupLocation(org, org.replace("org_cust_", "SEED-"), new_uuid7(0) + ".bin")
            token, want = tokens[org], 404
        else:
            org = rng.choice(CUSTOMERS)
            path = BackupLocation(
                org,
                "",
                rng.choice(["x.zip", "a" * 300, "01934fab-bc33-4890-a1b2-c3d4e5f6a7b8", "..x"]),
            )
            token, want = tokens[org], 400
        url = f"{base}/api/systems/{system_of(path)}/backups/{path.backup_id}"
        async with session.delete(url, headers={"Authorization": f"Bearer {token}"}) as resp:
            await resp.read()
            tally.expected[kind] = tally.expected.get(kind, 0) + 1
            if resp.status != want:
                tally.wrong.append(f"{kind}: wanted {want}, got {resp.status}")
            if loc is not None:
                (tally.deleted if resp.status == 200 else tally.kept).add(loc.relative_key)

    async with aiohttp.ClientSession() as session:
        pending: set[asyncio.Task[None]] = set()
        next_sample = started
        while (now := time.monotonic()) - started < seconds:
            if now >= next_sample:
                samples.append((now - started, *server_sample(pid)))
                next_sample += max(1.0, seconds / 60)
            due = int((now - started) * rate)
            while sent < due:
                task = asyncio.ensure_future(one(session))
                pending.add(task)
                task.add_done_callback(pending.discard)
                sent += 1
            await asyncio.sleep(0.005)
        await asyncio.gather(*pending)
    await asyncio.sleep(1.0)  # the client's connections are closed; the server lets go
    samples.append((time.monotonic() - started, *server_sample(pid)))


def soak(backend: str, seconds: float, rate: float, endpoint: str | None) -> list[str]:
    work = Path(tempfile.mkdtemp(prefix=f"soak-{backend}-"))
    port = bench.free_port()
    if backend == "local":
        storage: dict[str, Any] = {"backend": "local", "local": {"root": str(work / "backups")}}
    else:
        assert endpoint is not None
        bucket = f"soak{int(time.time())}"
        bench.make_bucket(endpoint, bucket)
        storage = bench.s3_storage(endpoint, bucket)
    config_path = bench.gateway_config(work, port, storage)
    text = config_path.read_text().replace("level: INFO", "level: WARNING")
    config_path.write_text(text)
    valid_needed = int(seconds * rate * 0.45) + 100
    per = valid_needed // len(CUSTOMERS) + 1
    ids = work / "ids.txt"
    bench.seed(config_path, len(CUSTOMERS), per + 20, ids)
    pool: list[BackupLocation] = []
    for line in ids.read_text().splitlines():
        sid, bid = line.split()
        index = int(sid.removeprefix("sys_"))
        pool.append(BackupLocation(CUSTOMERS[index], f"SEED-{index:06d}", bid))
    random.Random(1).shuffle(pool)
    others, pool = pool[:80], pool[80:]
    log = work / "gateway.log"
    server = bench.Process(
        [str(bench.BIN / "backup-gateway"), "serve", "--config", str(config_path)], log
    )
    bench.wait_port(port, server.proc)
    tally = Tally()
    samples: list[tuple[float, float, int]] = []
    try:
        asyncio.run(
            traffic(port, config_path, pool, others, seconds, rate, tally, samples, server.proc.pid)
        )
    finally:
        server.stop()
    config = load_config(config_path)

    def exists(key: str) -> bool:
        if backend == "local":
            return (config.storage.local.root / key).exists()
        return key in s3_keys

    s3_keys: set[str] = set()
    if backend == "s3":
        import botocore.session

        client = botocore.session.get_session().create_client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
        )
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=config.storage.s3.bucket
        ):
            s3_keys.update(o["Key"] for o in page.get("Contents", []))
    problems = list(tally.wrong[:10])
    if len(tally.wrong) > 10:
        problems.append(f"... {len(tally.wrong) - 10} more wrong answers")
    problems += [f"200 but still there: {k}" for k in tally.deleted if exists(k)][:10]
    problems += [f"non-200 but gone: {k}" for k in tally.kept - tally.deleted if not exists(k)][:10]
    warm = [s for s in samples if s[0] >= seconds * 0.2] or samples
    rss_warm, rss_end = warm[0][1], samples[-1][1]
    fd_warm, fd_end = warm[0][2], samples[-1][2]
    growth = (rss_end - rss_warm) / rss_warm
    print(
        f"{backend}: {sum(tally.expected.values())} requests in {seconds:.0f}s "
        f"({dict(sorted(tally.expected.items()))}); {len(tally.deleted)} deleted, "
        f"{len(tally.kept)} kept; RSS {rss_warm:.1f} -> {rss_end:.1f} MB after warm-up "
        f"({100 * growth:+.1f}%); open non-socket fds {fd_warm} -> {fd_end}; "
        f"{len(tally.wrong)} wrong answers"
    )
    if growth >= 0.10:
        problems.append(f"RSS grew {100 * growth:.1f}% after warm-up")
    if fd_end > fd_warm:
        problems.append(f"open non-socket fds grew from {fd_warm} to {fd_end}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--short", action="store_true", help="30 s a backend (CI)")
    parser.add_argument("--seconds", type=float)
    parser.add_argument("--backend", choices=["local", "s3", "both"], default="both")
    args = parser.parse_args()
    seconds = args.seconds or (30.0 if args.short else 600.0)
    problems: list[str] = []
    if args.backend in ("local", "both"):
        problems += soak("local", seconds, 200.0, None)
    if args.backend in ("s3", "both"):
        work = Path(tempfile.mkdtemp(prefix="soak-moto-"))
        moto, endpoint = bench.moto(work)
        try:
            problems += soak("s3", seconds, 40.0, endpoint)
        finally:
            moto.stop()
    for problem in problems:
        print("ERROR:", problem)
    print("soak: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
