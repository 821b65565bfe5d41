"""S3 uploads with a digest, on SeaweedFS (issue #30): the in-place path against raw
aiobotocore and against the staging path, in one run, alternating.

With `Content-Digest: sha-256=:<base64>:` the gateway writes the backup once at its final
key with `x-amz-checksum-sha256` (one PutObject; above `storage.s3.multipart_threshold_bytes`
a multipart upload with a checksum on each part); without one it streams to a staging key
and copies it into place (DESIGN.md §9, §12). Rows:

  1  gateway, digest     64 connections uploading 1 MB bodies (wrk, upload.lua + the header)
  2  raw aiobotocore     put_object(..., ChecksumSHA256=...) of the same body, 64 at once
  3  gateway, staging    as 1 without the header
  4  gateway, digest     one 1 GiB body (multipart in place: 16 parts of 64 MiB, the defaults)
  5  raw aiobotocore     one multipart upload, ChecksumAlgorithm SHA256, the same parts, in turn
  6  gateway, staging    as 4 without the header (multipart to the staging key, CopyObject)

Each run starts its own SeaweedFS and one gateway (1 worker), each gateway row uploading
to 64 systems of its own, and waits out the gateway's first minute (see Run); appliance
credentials, rates off, every keep rule at 0 (nothing pruned), the per-system cap at 4 GiB
(still checked, listing the folder twice an upload; --system-cap 0: none), no organization
cap and the duplicate window off (wrk sends one body again and again: with the window on
every upload after a system's first is a 200 "already stored"). Rows 1-3 and 4-6 alternate
per run: 2,1,3 then 3,1,2, so the digest row sits next to both of its baselines. Targets:
1/2 and 4/5 >= 0.9, 1/3 and 4/6 >= 1.5.

    .venv/bin/python bench/s3_digest.py [--runs 3] [--seconds 10] [--gib 1]
    .venv/bin/python bench/s3_digest.py --short       # CI: small, fails on errors only
    .venv/bin/python bench/s3_digest.py --profile /tmp/prof   # py-spy on rows 1, 3, 4, 6

Exit status 1 on an error (a non-2xx, a missing object, a staging key left, a digest row's
object without its checksum), never on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import http.client
import json
import math
import os
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ingest
import raw_s3
import read_side
import run as bench

from storage_backends.s3.uploads import STAGING_PREFIX

MB = 1_000_000
MiB = 1024**2
GiB = 1024**3
ORG = "org_bench"  # ingest.appliances' organization: every backup's key starts with it
# upload.lua, with the digest header added to each request it formats
DIGEST_LUA = """
dofile(os.getenv("UPLOAD_LUA"))
local digest = os.getenv("CONTENT_DIGEST")
local format = wrk.format
wrk.format = function(method, path, headers, body)
  if headers then  -- wrk's own call (its default request) has none
    headers["Content-Digest"] = digest
  end
  return format(method, path, headers, body)
end
"""


def content_digest(sha256: bytes) -> str:
    return f"sha-256=:{base64.b64encode(sha256).decode()}:"


@dataclass
class Shape:
    """The big rows' body and the store's multipart settings for them."""

    size: int
    part: int
    threshold: int
    block: bytes = field(repr=False)  # the body is this, again and again; `part` a multiple

    def blocks(self) -> Iterator[memoryview]:
        view, left = memoryview(self.block), self.size
        while left:
            yield view[: min(left, len(view))]
            left -= min(left, len(view))

    def sha256(self) -> bytes:
        digest = hashlib.sha256()
        for chunk in self.blocks():
            digest.update(chunk)
        return digest.digest()


# --------------------------------------------------------------------------- measuring


@dataclass
class Meter:
    """CPU over a row, in seconds: the gateway's processes, SeaweedFS's, the load client's
    (this process and the children it waited for: wrk), the machine's busy time and the
    host's steal; and the load average when it began."""

    trees: dict[str, list[int]]
    before: dict[str, float]
    wall: float
    loadavg: float

    @classmethod
    def start(cls, gateway_pid: int | None, weed_pid: int) -> Meter:
        trees = {"weed": bench.process_tree(weed_pid)}
        if gateway_pid:
            trees["gw"] = bench.process_tree(gateway_pid)
        meter = cls(trees, {}, time.monotonic(), os.getloadavg()[0])
        meter.before = meter._read()
        return meter

    def _read(self) -> dict[str, float]:
        seconds = {name: bench.tree_cpu_seconds(pids) for name, pids in self.trees.items()}
        seconds["client"] = _own_cpu()
        seconds["busy"] = bench.machine_busy_seconds()
        seconds["steal"] = bench.machine_stolen_seconds()
        return seconds

    def stop(self, requests: int) -> dict[str, Any]:
        now = self._read()
        wall = time.monotonic() - self.wall
        used = {name: now[name] - self.before[name] for name in now}
        ours = used.get("gw", 0.0) + used["weed"] + used["client"]
        per = max(1, requests)
        return {
            "gw_cpu_ms": 1e3 * used.get("gw", 0.0) / per,
            "weed_cpu_ms": 1e3 * used["weed"] / per,
            "client_cpu_ms": 1e3 * used["client"] / per,
            "busy": used["busy"] / wall,
            # what ran on the machine beside this row: other agents' work
            "others": max(0.0, (used["busy"] - ours) / wall),
            "steal": used["steal"] / (wall * (os.cpu_count() or 1)),
            "loadavg": self.loadavg,
        }


def _own_cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


# --------------------------------------------------------------------------- one run


# each gateway row's uploads go to 64 systems of its own: no row lists another's backups
GROUPS = {"1": 0, "3": 1, "4": 2, "6": 3}
BUCKET = "bench"


class Run:
    """One SeaweedFS, one bucket, one gateway (1 worker) for the gateway rows, started once
    and loaded only after its fleet index's first scan: every upload while it runs also makes
    the gateway re-read the system's folder once it is in (fleet.index), which a gateway in
    service does not."""

    def __init__(self, work: Path, args: argparse.Namespace, shape: Shape) -> None:
        self.work = work
        self.args = args
        self.shape = shape
        work.mkdir(parents=True)
        c = args.concurrency
        self.directory, headers = ingest.appliances(len(GROUPS) * c)
        self.headers: dict[str, list[str]] = {}
        self.auth_files: dict[str, Path] = {}
        self.folders: dict[str, set[str]] = {}
        for row, group in GROUPS.items():
            self.headers[row] = headers[group * c : (group + 1) * c]
            self.auth_files[row] = work / f"auths-{row}.txt"
            self.auth_files[row].write_text("\n".join(self.headers[row]) + "\n")
            self.folders[row] = {f"{ORG}/BENCH-{n:04d}" for n in range(group * c, (group + 1) * c)}
        self.lua = work / "digest_upload.lua"
        self.lua.write_text(DIGEST_LUA)
        self.body = b"x" * MB  # upload.lua's body
        self.body_sha256 = hashlib.sha256(self.body).digest()
        self.problems: list[str] = []
        self.rss_mb = 0.0
        self.weed = bench.seaweedfs()
        self.endpoint = self.weed.endpoint
        try:
            bench.make_bucket(self.endpoint, BUCKET)
            self.gateway = self._gateway()
        except BaseException:
            self.weed.stop()
            raise
        self.scanned = args.short  # CI's short rows do not wait for the first scan

    def stop(self) -> None:
        try:
            self.rss_mb = self.gateway.server.stop()
        finally:
            self.weed.stop()

    def _gateway(self) -> read_side.Gateway:
        storage = bench.s3_storage(self.endpoint, BUCKET)
        storage["s3"].update(
            multipart_threshold_bytes=self.shape.threshold,
            multipart_part_bytes=self.shape.part,
        )
        retention = {
            **bench.KEEP_EVERYTHING,
            "max_upload_bytes": 4 * GiB,
            "max_bytes_per_system": self.args.system_cap,
            "max_bytes_per_organization": 0,
            "uploads_per_minute": 0,
            "uploads_per_hour": 0,
            "duplicate_window_seconds": 0,
        }
        extra = {
            "logging": {"level": "WARNING", "access_log": False},
            "storage": {"retention": retention},
        }
        work = self.work / "gateway"
        work.mkdir()
        (work / "directory.yaml").write_text(json.dumps(self.directory))
        gateway = read_side.Gateway(work, storage, extra)
        gateway.start()
        return gateway

    def settled(self) -> read_side.Gateway:
        """The gateway, once its fleet index's first scan is in."""
        if not self.scanned:
            ingest.wait_settled(self.gateway.port)
            self.scanned = True
        return self.gateway

    def profile(self, pid: int, seconds: float, label: str) -> Any:
        if not self.args.profile:
            return None
        os.environ["PROFILE"] = str(self.args.profile)
        return ingest._profile(pid, max(1, round(seconds)), label)

    # ---- 1 MB bodies, 64 connections

    def gateway_many(self, row: str, label: str, digest: bool) -> dict[str, Any]:
        gateway = self.settled()
        c, seconds = self.args.concurrency, self.args.seconds
        meter = Meter.start(gateway.server.proc.pid, self.weed.proc.pid)
        spy = self.profile(gateway.server.proc.pid, seconds, label)
        if digest:
            env = {
                "AUTH_FILE": str(self.auth_files[row]),
                "BODY_BYTES": str(MB),
                "UPLOAD_LUA": str(ingest.LUA),
                "CONTENT_DIGEST": content_digest(self.body_sha256),
            }
            result = read_side.wrk_script(self.lua, env, gateway.port, c, seconds)
            result["mb_s"] = result["rps"] * MB / 1e6
        else:
            result = ingest.wrk_upload(gateway.port, self.auth_files[row], c, seconds, MB)
        result.update(meter.stop(result["requests"]))
        if spy is not None:
            spy.wait(60)
        ok = result["requests"] - result["non2xx"]
        self.check_stored(label, self.folders[row], ok, c, digest, MB)
        return result

    def raw_many(self, label: str) -> dict[str, Any]:
        folders = [f"org_raw/{label}-{n:04d}" for n in range(self.args.concurrency)]
        meter = Meter.start(None, self.weed.proc.pid)
        result = asyncio.run(self._raw_many(folders))
        result.update(meter.stop(result["requests"]))
        ok = result["requests"] - result["non2xx"]
        self.check_stored(label, set(folders), ok, 0, True, MB)
        return result

    async def _raw_many(self, folders: list[str]) -> dict[str, Any]:
        c, seconds = self.args.concurrency, self.args.seconds
        checksum = base64.b64encode(self.body_sha256).decode()
        latencies: list[float] = []
        errors = 0
        async with raw_s3.raw_client(self.endpoint, c) as client:
            deadline = time.perf_counter() + seconds

            async def worker(folder: str) -> None:
                nonlocal errors
                while time.perf_counter() < deadline:
                    started = time.perf_counter()
                    try:
                        await client.put_object(
                            Bucket=BUCKET,
                            Key=f"{folder}/{uuid.uuid4()}.tar.gz",
                            Body=self.body,
                            ContentType="application/gzip",
                            ChecksumSHA256=checksum,
                        )
                    except Exception as exc:
                        errors += 1
                        if errors == 1:
                            print(f"  raw put_object failed: {exc!r}", file=sys.stderr)
                    latencies.append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(worker(folder) for folder in folders))
            elapsed = time.perf_counter() - started
        return {
            "requests": len(latencies),
            "rps": len(latencies) / elapsed,
            "mb_s": len(latencies) * MB / elapsed / 1e6,
            "non2xx": errors,
            "p50_ms": percentile(latencies, 0.5) * 1000,
            "p99_ms": percentile(latencies, 0.99) * 1000,
        }

    # ---- one big body

    def gateway_big(self, row: str, label: str, digest: bool) -> dict[str, Any]:
        gateway = self.settled()
        shape = self.shape
        header = content_digest(shape.sha256()) if digest else None
        meter = Meter.start(gateway.server.proc.pid, self.weed.proc.pid)
        spy = self.profile(gateway.server.proc.pid, self.args.big_seconds_guess, label)
        seconds, status, answer = self._send(gateway.port, self.headers[row][0], header)
        result: dict[str, Any] = {"requests": 1, "seconds": seconds, "status": status}
        result.update(meter.stop(1))
        if spy is not None:
            spy.wait(120)
        result["mb_s"] = shape.size / seconds / 1e6
        result["non2xx"] = 0 if status == 201 else 1
        if status != 201:
            self.problems.append(f"{label}: answered {status}: {answer[:300]!r}")
        ok = 1 - result["non2xx"]
        self.check_stored(label, self.folders[row], ok, 0, digest, shape.size)
        return result

    def _send(self, port: int, auth: str, digest: str | None) -> tuple[float, int, bytes]:
        """The big body from memory through one connection, timed from the first byte sent
        to the answer; the digest (when sent) computed before."""
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            conn.putrequest("POST", "/api/systems/backups", skip_accept_encoding=True)
            headers = {
                "Authorization": auth,
                "Content-Length": str(self.shape.size),
                "Content-Type": "application/gzip",
                "X-Filename": "big.tar.gz",
                **({"Content-Digest": digest} if digest else {}),
            }
            for name, value in headers.items():
                conn.putheader(name, value)
            started = time.perf_counter()
            conn.endheaders()
            for chunk in self.shape.blocks():
                conn.send(chunk)
            answer = conn.getresponse()
            body = answer.read()
            return time.perf_counter() - started, answer.status, body
        finally:
            conn.close()

    def raw_big(self, label: str) -> dict[str, Any]:
        shape = self.shape
        part = bytes(shape.block) * (shape.part // len(shape.block))  # every full part alike
        folder = f"org_raw/{label}"
        meter = Meter.start(None, self.weed.proc.pid)
        result = asyncio.run(self._raw_big(f"{folder}/{uuid.uuid4()}.tar.gz", part))
        result.update(meter.stop(1))
        result["mb_s"] = shape.size / result["seconds"] / 1e6
        self.check_stored(label, {folder}, 1 - result["non2xx"], 0, True, shape.size)
        return result

    async def _raw_big(self, key: str, part: bytes) -> dict[str, Any]:
        size = self.shape.size
        checksums: dict[int, str] = {}  # by a part's length
        for length in {len(part), size % len(part) or len(part)}:
            checksums[length] = base64.b64encode(hashlib.sha256(part[:length]).digest()).decode()
        async with raw_s3.raw_client(self.endpoint, 1) as client:
            started = time.perf_counter()
            try:
                created = await client.create_multipart_upload(
                    Bucket=BUCKET,
                    Key=key,
                    ChecksumAlgorithm="SHA256",
                    ContentType="application/gzip",
                )
                parts: list[dict[str, Any]] = []
                left = size
                while left:
                    length = min(left, len(part))
                    answer = await client.upload_part(
                        Bucket=BUCKET,
                        Key=key,
                        UploadId=created["UploadId"],
                        PartNumber=len(parts) + 1,
                        Body=part[:length] if length < len(part) else part,
                        ChecksumSHA256=checksums[length],
                    )
                    parts.append(
                        {
                            "PartNumber": len(parts) + 1,
                            "ETag": answer["ETag"],
                            "ChecksumSHA256": checksums[length],
                        }
                    )
                    left -= length
                await client.complete_multipart_upload(
                    Bucket=BUCKET,
                    Key=key,
                    UploadId=created["UploadId"],
                    MultipartUpload={"Parts": parts},
                )
                errors = 0
            except Exception as exc:
                print(f"  raw multipart upload failed: {exc!r}", file=sys.stderr)
                errors = 1
            seconds = time.perf_counter() - started
        return {"requests": 1, "seconds": seconds, "non2xx": errors}

    # ---- checks

    def check_stored(
        self, label: str, folders: set[str], ok: int, in_flight: int, digest: bool, size: int
    ) -> None:
        """The row's backups (those in `folders`) are its 2xx answers, plus those in flight
        when wrk stopped, each of `size`; no staging key is left; a digest row's objects
        carry their sha256 checksum (written in place, not copied)."""
        client = bench.s3_client(self.endpoint, bench.S3_KEY, bench.S3_KEY)
        keys: list[str] = []
        sizes: set[int] = set()
        deadline = time.monotonic() + 10
        while True:
            keys, staging, sizes = [], 0, set()
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
                for entry in page.get("Contents", []):
                    if entry["Key"].startswith(STAGING_PREFIX):
                        staging += 1
                    elif entry["Key"].rsplit("/", 1)[0] in folders:
                        keys.append(entry["Key"])
                        sizes.add(entry["Size"])
            # the staging keys of the last uploads are removed after their answers
            if not staging or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        if not ok <= len(keys) <= ok + in_flight:
            self.problems.append(f"{label}: {len(keys)} backups stored for {ok} 2xx answers")
        if staging:
            self.problems.append(f"{label}: {staging} staging keys left")
        if sizes - {size}:
            self.problems.append(f"{label}: stored sizes {sorted(sizes)}, not {size}")
        if digest and keys:
            head = client.head_object(Bucket=BUCKET, Key=keys[-1], ChecksumMode="ENABLED")
            if not head.get("ChecksumSHA256"):
                self.problems.append(f"{label}: {keys[-1]} has no sha256 checksum: not in place")


# --------------------------------------------------------------------------- report

GATEWAY_DIGEST = "gateway, digest (in place)"
GATEWAY_STAGING = "gateway, staging"
# each shape's rows: raw, digest, staging
SHAPES = {
    "many": {"2": "raw aiobotocore put_object", "1": GATEWAY_DIGEST, "3": GATEWAY_STAGING},
    "big": {"5": "raw aiobotocore multipart", "4": GATEWAY_DIGEST, "6": GATEWAY_STAGING},
}


def print_row(run: int, key: str, name: str, r: dict[str, Any]) -> None:
    if "rps" in r:
        rate = (
            f"{r['rps']:6.0f} req/s {r['mb_s']:5.0f} MB/s  "
            f"p50 {r['p50_ms']:6.1f} p99 {r['p99_ms']:6.1f} ms"
        )
        cpu = "ms/req"
    else:
        rate = f"{r['seconds']:6.2f} s      {r['mb_s']:5.0f} MB/s  {'':28}"
        cpu = "ms"
    print(
        f"  run {run + 1} ({key}) {name:28} {rate}  non-2xx {r['non2xx']:<3} "
        f"CPU {cpu}: gw {r['gw_cpu_ms']:.2f} weed {r['weed_cpu_ms']:.2f} "
        f"client {r['client_cpu_ms']:.2f} | busy {r['busy']:.2f} others {r['others']:.2f} "
        f"cores, steal {r['steal']:.0%}, load {r['loadavg']:.2f}"
    )


def span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f} (median {statistics.median(values):.2f}: " + (
        ", ".join(f"{v:.2f}" for v in values) + ")"
    )


def run_shape(run: Run, n: int, shape: str, ratios: dict[str, list[float]]) -> list[dict[str, Any]]:
    """One shape's three rows, raw-digest-staging in even runs, staging-digest-raw in odd
    ones; its two ratios (in MB/s: the same as in req/s or in seconds) appended to `ratios`."""
    raw, digest, staging = SHAPES[shape]
    rows: dict[str, dict[str, Any]] = {}
    for key in [raw, digest, staging][:: 1 if n % 2 == 0 else -1]:
        label = f"r{n}-{shape}-{key}"
        if key == raw:
            rows[key] = getattr(run, f"raw_{shape}")(label)
        else:
            rows[key] = getattr(run, f"gateway_{shape}")(key, label, digest=key == digest)
        print_row(n, key, SHAPES[shape][key], rows[key])
    for base in (raw, staging):
        ratios.setdefault(f"{digest}/{base}", []).append(
            _ratio(rows[digest]["mb_s"], rows[base]["mb_s"])
        )
    return [{"run": n + 1, "row": key, **r} for key, r in rows.items()]


def _ratio(a: float, b: float) -> float:
    """a/b; a short row on a slow machine may complete nothing (nan then, not a failure)."""
    return a / b if b else math.nan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--gib", type=float, default=1.0, help="the big body, GiB")
    parser.add_argument("--only", choices=["many", "big"], action="append")
    parser.add_argument(
        "--system-cap",
        type=int,
        default=4 * GiB,
        help="storage.retention.max_bytes_per_system (0: none, and no folder listed an upload)",
    )
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--profile", type=Path, help="py-spy raw profiles, this path prefix")
    parser.add_argument(
        "--short", action="store_true", help="CI: small and quick; fails on errors, never on speed"
    )
    args = parser.parse_args()
    if args.short:
        args.runs, args.seconds = 1, 2
        # still multipart: 24 MiB in 8 MiB parts above an 8 MiB threshold
        shape = Shape(24 * MiB, 8 * MiB, 8 * MiB, os.urandom(8 * MiB))
    else:
        # the defaults (storage.s3): multipart above 512 MiB, 64 MiB parts
        from storage_backends.s3.settings import S3Config

        defaults = S3Config()
        size = int(args.gib * GiB) // MiB * MiB
        part = defaults.multipart_part_bytes
        shape = Shape(size, part, defaults.multipart_threshold_bytes, os.urandom(16 * MiB))
    args.big_seconds_guess = max(2, shape.size / (150 * MB))
    only = set(args.only or ["many", "big"])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    (bench.REPO / "data").mkdir(exist_ok=True)
    work_root = Path(tempfile.mkdtemp(prefix="bench-s3-digest-", dir=bench.REPO / "data"))
    print(
        f"# {os.cpu_count()} cores, SeaweedFS, {args.runs} runs; many: {args.concurrency} "
        f"connections x 1 MB, {args.seconds:g} s a row; big: {shape.size / MiB:.0f} MiB, parts "
        f"of {shape.part / MiB:.0f} MiB above {shape.threshold / MiB:.0f} MiB; load "
        f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}"
    )
    ratios: dict[str, list[float]] = {}
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    try:
        for n in range(args.runs):
            run = Run(work_root / f"run{n}", args, shape)
            try:
                run.settled()  # every row of the run after it, the raw ones too
                for name in SHAPES:
                    if name in only:
                        rows += run_shape(run, n, name, ratios)
            finally:
                run.stop()
                problems += run.problems
            print(f"  run {n + 1}: the gateway's peak RSS {run.rss_mb:.0f} MB (all its processes)")
    finally:
        import shutil

        if os.environ.get("KEEP"):
            print("kept", work_root)
        else:
            shutil.rmtree(work_root, ignore_errors=True)
    targets = {"1/2": 0.9, "1/3": 1.5, "4/5": 0.9, "4/6": 1.5}
    if args.short:
        print("(--short: 2 s rows, a check that every path works; the ratios mean nothing)")
    for name, measured in ratios.items():
        values = [v for v in measured if not math.isnan(v)]
        if values:
            met = (
                "met"
                if min(values) >= targets[name]
                else ("not met" if max(values) < targets[name] else "met in some runs")
            )
            print(f"{name} = {span(values)}   target >= {targets[name]}: {met}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    for p in problems:
        print("ERROR:", p)
    print("s3_digest: " + ("FAILED" if problems else "ok"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
