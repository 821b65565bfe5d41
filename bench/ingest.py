"""Upload rows (issue: uploads from appliances), each beside its baseline in the same run.

- ingest: one 1 GiB upload into local storage (sha256, fsync, rename, folder fsync: a
  durable 201), timed from the first byte sent to the answer, against
  `dd if=/dev/zero bs=1M count=1024 conv=fsync` into the same folder. Target >= 0.7.
- many: 64 connections uploading 1 MB bodies for a few seconds (wrk, each request with
  the next of 64 systems' credentials; the default keep rules, each system starting
  empty), against bare aiohttp reading the same bodies and answering 201.
- retention: the same 64-connection row twice per run, on two gateways started alike but
  for the keep rules: (on) the default rules of DESIGN.md §11 with every system filled to
  its keep limit first (keep_last uploads each, all of today), so every upload prunes one;
  (off) every rule at 0, nothing pruned. on/off per run, target >= 0.9 (issue #28). The
  two alternate, which goes first swapping each run. Each row starts once the gateway is
  settled: its fleet index's start-up scan done, while which every upload and prune is
  also re-read from storage once the scan is in (DESIGN.md §13) — a cost of start-up, not
  of retention (`--unsettled` measures it).

    .venv/bin/python bench/ingest.py [--gib 1] [--seconds 8] [--concurrency 64] [--runs 3]
    .venv/bin/python bench/ingest.py --only retention --runs 3 [--unsettled]

THREADS=N sets storage.local.threads (the writer pool); PROFILE=out records the gateway and
its I/O process with py-spy (raw format, out-<row>.raw) while the ingest, 64-connection and
retention rows run (`.venv/bin/pip install py-spy` first).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import read_side
import run as bench

sys.path.insert(0, str(bench.REPO))
from concurrent.futures import ThreadPoolExecutor

from gateway.config import RetentionConfig
from gateway.identity.appliance import new_secret
from storage_backends.local import ROOT_MARKER, mark_root

LUA = bench.REPO / "bench" / "upload.lua"


def appliances(count: int) -> tuple[dict[str, Any], list[str]]:
    """A directory of `count` systems with secrets, and their Basic header values."""
    systems, headers = [], []
    for n in range(count):
        made = new_secret()
        key = f"BENCH-{n:04d}"
        systems.append(
            {
                "id": f"sys_bench_{n}",
                "system_key": key,
                "organization_id": "org_bench",
                "system_secret_public": made.public,
                "system_secret_sha256": made.sha256,
            }
        )
        token = base64.b64encode(f"{key}:{made.secret}".encode()).decode()
        headers.append(f"Basic {token}")
    directory = {
        "organizations": [
            {"id": "org_owner", "role": "owner"},
            {"id": "org_bench", "role": "customer", "parent": "org_owner"},
        ],
        "systems": systems,
    }
    return directory, headers


def start_gateway(
    work: Path, root: Path, directory: dict[str, Any], keep: dict[str, int] | None = None
) -> tuple[Any, int]:
    """`keep`: keep rules (e.g. KEEP_EVERYTHING); None: the defaults of DESIGN.md §5."""
    port = bench.free_port()
    local = {
        "root": str(root),
        **({"threads": int(os.environ["THREADS"])} if os.environ.get("THREADS") else {}),
    }
    config = bench.gateway_config(work, port, {"backend": "local", "local": local})
    data = yaml.safe_load(config.read_text())
    data["storage"]["retention"] = {
        "max_upload_bytes": 4 * 1024**3,
        "max_bytes_per_system": 4 * 1024**3,
        "max_bytes_per_organization": 0,
        "uploads_per_minute": 0,
        "uploads_per_hour": 0,
        **(keep or {}),
    }
    data["logging"] = {"level": "WARNING", "access_log": False}
    config.write_text(yaml.safe_dump(data))
    (work / "directory.yaml").write_text(yaml.safe_dump(directory))
    mark_root(root, only_if_in_use=False)  # a new, empty root: marked as in use
    server = bench.Process(
        [str(bench.BIN / "backup-gateway"), "serve", "--config", str(config)], work / "gateway.log"
    )
    bench.wait_port(port, server.proc)
    bench.wait_ready(port, server.proc)
    return server, port


def dd_seconds(folder: Path, mib: int) -> float:
    target = folder / "dd.bin"
    started = time.perf_counter()
    subprocess.run(
        ["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    target.unlink()
    return seconds


def ingest_seconds(port: int, auth: str, size: int) -> float:
    block = memoryview(os.urandom(16 * 1024 * 1024))
    head = (
        f"POST /api/systems/backups HTTP/1.1\r\nHost: bench\r\nAuthorization: {auth}\r\n"
        f"Content-Length: {size}\r\nContent-Type: application/gzip\r\n"
        "X-Filename: big.tar.gz\r\nConnection: close\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.perf_counter()
        sock.sendall(head)
        left = size
        while left:
            part = block[: min(left, len(block))]
            sock.sendall(part)
            left -= len(part)
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(65536)
        seconds = time.perf_counter() - started
    if not answer.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"upload failed: {answer[:300]!r}")
    return seconds


def wrk_upload(port: int, auth_file: Path, c: int, seconds: float, body: int) -> dict[str, Any]:
    env = {"AUTH_FILE": str(auth_file), "BODY_BYTES": str(body)}
    result = read_side.wrk_script(LUA, env, port, c, seconds)
    result["mb_s"] = result["rps"] * body / 1e6  # what went up, not what came back
    return result


def post_upload(port: int, auth: str, body: bytes) -> int:
    """One upload by http.client; its status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request(
            "POST",
            "/api/systems/backups",
            body,
            {"Authorization": auth, "Content-Type": "application/gzip", "X-Filename": "f.tar.gz"},
        )
        answer = conn.getresponse()
        answer.read()
        return answer.status
    finally:
        conn.close()


def metric(port: int, name: str) -> dict[str, float]:
    """One metric's values from the gateway's /metrics, by its one label's value ('' for a
    metric without labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    found = {}
    pattern = rf'^{re.escape(name)}(?:\{{\w+="([^"]*)"\}})? (\S+)$'
    for match in re.finditer(pattern, text, re.M):
        found[match[1] or ""] = float(match[2])
    return found


def wait_settled(port: int, ready: Any = None, timeout: float = 600) -> float:
    """Until the fleet index's start-up scan is done (and `ready(port)` says yes, when
    given): seconds waited."""
    started = time.monotonic()
    while True:
        now = time.monotonic()
        if now - started > timeout:
            raise RuntimeError(f"the gateway did not settle in {timeout:g} s")
        if metric(port, "gateway_fleet_scans_total").get("done") and (ready is None or ready(port)):
            return now - started
        time.sleep(0.2)


def stored_backups(root: Path) -> int:
    return sum(1 for p in root.rglob("*.tar.gz") if p.is_file())


def retention_row(
    work: Path,
    directory: dict[str, Any],
    headers: list[str],
    keep: bool,
    c: int,
    seconds: float,
    settle: bool,
) -> dict[str, Any]:
    """The 64-connection 1 MB row on a gateway of its own: with the default keep rules and
    every system at its keep limit (`keep`), or with every rule at 0; once the gateway is
    settled (`settle`), or right after start-up."""
    root = work / "backups"
    server, port = start_gateway(work, root, directory, None if keep else bench.KEEP_EVERYTHING)
    try:
        prefill = 0
        if keep:  # keep_last uploads each, all of today: the rules keep exactly these
            body = os.urandom(1_000_000)
            jobs = [h for h in headers for _ in range(RetentionConfig().keep_last)]
            with ThreadPoolExecutor(16) as pool:
                statuses = list(pool.map(lambda h: post_upload(port, h, body), jobs))
            if set(statuses) != {201}:
                raise RuntimeError(f"prefill uploads answered {sorted(set(statuses))}")
            prefill = len(jobs)
            time.sleep(1)  # nothing to prune: the runs after them end at once
        auth_file = work / "auths.txt"
        auth_file.write_text("\n".join(headers) + "\n")
        if settle:
            wait_settled(port)
        os.sync()  # the prefill's dirty pages written back before the row, not in it
        meter = bench.CpuMeter.start(server.proc.pid)
        spy = _profile(server.proc.pid, int(seconds), f"retention-{'on' if keep else 'off'}")
        result = wrk_upload(port, auth_file, c, seconds, 1_000_000)
        result.update(meter.stop(result["requests"]))
        if spy is not None:
            spy.wait(30)
        time.sleep(2)  # the prunes after the last uploads
        left = stored_backups(root)
    finally:
        server.stop()
    result["stored"] = prefill + result["requests"] - result["non2xx"]
    result["left"] = left
    shutil.rmtree(root, ignore_errors=True)
    return result


def _profile(pid: int, seconds: int, row: str) -> subprocess.Popen[bytes] | None:
    """py-spy on the gateway while a row runs, when PROFILE=<prefix> is set."""
    prefix = os.environ.get("PROFILE")
    if not prefix:
        return None
    return subprocess.Popen(
        [str(bench.BIN / "py-spy"), "record", "-p", str(pid), "-d", str(seconds), "-f", "raw",
         "-o", f"{prefix}-{row}.raw", "--threads", "--nonblocking", "--subprocesses"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def retention_rows(
    work: Path, directory: dict[str, Any], headers: list[str], args: argparse.Namespace
) -> list[str]:
    """`args.runs` pairs of the retention row, on then off or off then on; the failures."""
    failures, ratios = [], []
    print(
        f"{args.concurrency} connections, 1 MB uploads, {args.seconds:g} s a row, "
        f"{'right after start-up' if args.unsettled else 'settled'}, retention:"
    )
    for run in range(args.runs):
        pair = {}
        for keep in (True, False) if run % 2 == 0 else (False, True):
            label = "on" if keep else "off"
            r = retention_row(
                work / f"retention-{run}-{label}", directory, headers, keep,
                args.concurrency, args.seconds, not args.unsettled,
            )  # fmt: skip
            pair[label] = r
            print(
                f"  run {run + 1} {label:3}  {r['rps']:6.0f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                f"p99 {r['p99_ms']:7.1f} ms  non-2xx {r['non2xx']}  "
                f"CPU {r['cpu_us_per_request']:5.0f} us/upload  "
                f"stored {r['stored']}, left {r['left']}  machine "
                f"{r['machine_cores_busy']:.2f} cores, steal {r['machine_stolen']:.1%}, "
                f"load {os.getloadavg()[0]:.1f}"
            )
            if r["non2xx"]:
                failures.append(f"retention {label}: {r['non2xx']} uploads were not 201")
        ratios.append(pair["on"]["rps"] / pair["off"]["rps"])
        # every system at its limit, so at most keep_last each once the prunes are done
        # (a few more when the last uploads' runs had not ended)
        if pair["on"]["left"] > len(headers) * (RetentionConfig().keep_last + 1):
            failures.append(f"retention on: {pair['on']['left']} backups left, not pruned")
    shown = ", ".join(f"{r:.2f}" for r in ratios)
    print(f"  on/off {min(ratios):.2f}-{max(ratios):.2f} ({shown}; target >= 0.9)")
    return failures


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--only", choices=["ingest", "many", "retention"], action="append")
    parser.add_argument(
        "--short", action="store_true", help="CI: small and quick; fails on errors, never on speed"
    )
    parser.add_argument(
        "--unsettled",
        action="store_true",
        help="retention rows right after start-up, while the fleet's first scan runs",
    )
    args = parser.parse_args()
    if args.short:
        args.gib, args.runs, args.seconds, args.unsettled = 0.25, 1, 2, True
    only = set(args.only or ["ingest", "many", "retention"])
    if shutil.which("wrk") is None and only & {"many", "retention"}:
        # the 64-connection rows are wrk's; a host without it still measures the ingest
        print("wrk not installed: the many and retention rows are skipped")
        only -= {"many", "retention"}
    (bench.REPO / "data").mkdir(exist_ok=True)  # a clean clone has no data/ yet
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-", dir=bench.REPO / "data"))
    failures = []
    try:
        directory, headers = appliances(args.concurrency)
        root = work / "backups"
        server, port = start_gateway(work, root, directory)
        try:
            if "ingest" in only:
                size = int(args.gib * 1024**3)
                spy = _profile(server.proc.pid, 6, "ingest")
                dd, up = [], []
                for _ in range(args.runs):  # interleaved: the same disk weather for both
                    dd.append(dd_seconds(root, size // 1024**2))
                    up.append(ingest_seconds(port, headers[0], size))
                    for path in root.rglob("*"):
                        if path.is_file() and path.name != ROOT_MARKER:
                            path.unlink()
                if spy is not None:
                    spy.wait(30)
                dd_mb = size / statistics.median(dd) / 1e6
                up_mb = size / statistics.median(up) / 1e6
                ratio = up_mb / dd_mb
                print(f"ingest {args.gib:g} GiB, median of {args.runs}:")
                for name, mb_s, times in (
                    ("dd bs=1M conv=fsync", dd_mb, dd),
                    ("gateway upload (sha256, durable)", up_mb, up),
                ):
                    print(f"  {name:34} {mb_s:6.0f} MB/s  {[round(t, 2) for t in times]} s")
                print(f"  ratio {ratio:.2f} (target >= 0.7)")
                if ratio < 0.7 and not args.short:
                    failures.append(f"ingest ratio {ratio:.2f} < 0.7")
            if "many" in only:
                auth_file = work / "auths.txt"
                auth_file.write_text("\n".join(headers) + "\n")
                meter = bench.CpuMeter.start(server.proc.pid)
                spy = _profile(server.proc.pid, int(args.seconds), "many")
                many = wrk_upload(port, auth_file, args.concurrency, args.seconds, 1_000_000)
                many.update(meter.stop(many["requests"]))
                if spy is not None:
                    spy.wait(30)
        finally:
            server.stop()
        if "many" in only:
            bare_port = bench.free_port()
            bare = bench.Process(
                [
                    str(bench.BIN / "python"),
                    str(bench.REPO / "bench" / "bare_app.py"),
                    str(bare_port),
                ],
                work / "bare.log",
            )
            bench.wait_port(bare_port, bare.proc)
            try:
                base = wrk_upload(bare_port, auth_file, args.concurrency, args.seconds, 1_000_000)
            finally:
                bare.stop()
            print(f"{args.concurrency} connections, 1 MB uploads, {args.seconds:g} s each:")
            for name, r in (
                ("bare aiohttp (reads, answers 201)", base),
                ("gateway (local, durable)", many),
            ):
                print(
                    f"  {name:36} {r['rps']:7.0f} req/s  p50 {r['p50_ms']:7.1f} ms  "
                    f"p99 {r['p99_ms']:7.1f} ms  non-2xx {r['non2xx']}  {r['mb_s']:6.0f} MB/s"
                )
            print(f"  ratio {many['rps'] / base['rps']:.2f} of bare")
            print(
                f"  gateway CPU {many['cpu_us_per_request']:.0f} us/upload (all its processes), "
                f"machine {many['machine_cores_busy']:.2f} of 2 cores busy"
            )
            if many["non2xx"]:
                failures.append(f"{many['non2xx']} uploads were not 201")
        if "retention" in only:
            failures += retention_rows(work, directory, headers, args)
    finally:
        if not os.environ.get("KEEP"):
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("kept", work)
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
