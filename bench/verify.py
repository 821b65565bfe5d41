"""The verifier (DESIGN.md §12, issue #30), each figure beside its baseline in the same run.

read   `backup-gateway verify --config …` (one pass, unbudgeted: the CLI reads as fast as
       it can unless given --max-bytes-per-second) over a local root of backups, against
       `sha256sum` over the same files; both timed as whole commands, alternating which
       goes first. `--cache warm`: every file read once before, both then hash from the
       page cache; `--cache cold`: `sync; echo 3 > /proc/sys/vm/drop_caches` before each
       command (root only). Ratio sha256sum seconds / verify seconds, target >= 0.8.
delete the standing local delete row of bench/run.py (seeded backups of 50 systems, 64
       connections, durable deletes) on a gateway with `storage.verify.enabled: true` at
       its default budget against the same row without it, alternating; the ratio of
       their p99, target <= 1.2. The verifier starts a pass at start-up: it lists every
       backup (reading each one's sidecar), then reads the never-verified ones (the
       seeds, 1 KiB each: far below its byte budget, so it verifies as many a second as
       it can). Each row starts once the gateway is settled — the fleet index's start-up
       scan done, while which every delete is also re-read from storage once the scan
       is in (DESIGN.md §13) — and, with the verifier, once it has begun reading: the
       row measures the verifier reading, and the time its listing took is reported.
       /metrics says how many it verified during the row. `--unsettled` starts the load
       right after start-up instead (the verifier then still lists, and the fleet scans,
       on both sides).

  .venv/bin/python bench/verify.py                       # both, 3 runs each, warm and cold
  .venv/bin/python bench/verify.py --only read --cache warm --runs 5
  .venv/bin/python bench/verify.py --short               # CI-sized, never fails on speed
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench
from ingest import metric, wait_settled

sys.path.insert(0, str(bench.REPO))
from storage_backends.local import SIDECAR_SUFFIX, mark_root
from tests.support import new_backup_id

MIB = 1 << 20


# --------------------------------------------------------------------------- read


def make_backups(root: Path, systems: int, per_system: int, size: int) -> list[Path]:
    """Backups as an upload leaves them (data and a sidecar with its sha256); their paths."""
    mark_root(root, only_if_in_use=False)
    paths = []
    block = os.urandom(MIB)
    for s in range(systems):
        folder = root / f"org_verify_{s}" / f"VERIFY-{s:04d}"
        folder.mkdir(parents=True)
        for _ in range(per_system):
            backup_id = new_backup_id(".tar.gz")
            digest = hashlib.sha256()
            with (folder / backup_id).open("wb") as out:
                left = size
                while left:
                    piece = block[: min(left, len(block))]
                    # each backup's bytes differ: its first 16 bytes are its own
                    piece = os.urandom(16) + piece[16:] if left == size else piece
                    out.write(piece)
                    digest.update(piece)
                    left -= len(piece)
            meta = {"filename": "b.tar.gz", "sha256": digest.hexdigest()}
            (folder / (backup_id + SIDECAR_SUFFIX)).write_text(json.dumps(meta))
            paths.append(folder / backup_id)
    os.sync()
    return paths


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def timed(args: list[str], cold: bool, paths: list[Path]) -> float:
    if cold:
        drop_caches()
    else:  # warm: every byte in the page cache
        for path in paths:
            with path.open("rb") as f:
                while f.read(8 * MIB):
                    pass
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def read_rows(work: Path, args: argparse.Namespace) -> list[str]:
    root = work / "backups"
    paths = make_backups(root, args.systems, args.per_system, args.size_mib * MIB)
    total = sum(p.stat().st_size for p in paths)
    config = bench.gateway_config(work, 0, {"backend": "local", "local": {"root": str(root)}})
    (work / "directory.yaml").write_text(yaml.safe_dump({"organizations": [], "systems": []}))
    verify = [str(bench.BIN / "backup-gateway"), "verify", "--config", str(config)]
    sha256sum = ["sha256sum", *map(str, paths)]
    # for context, not the target: coreutils' sha256sum (Debian's, not linked to OpenSSL)
    # uses no SHA extensions; OpenSSL's, which the verifier's hashlib uses, does
    openssl = ["openssl", "dgst", "-sha256", *map(str, paths)]
    commands = {"verify": verify, "sha256sum": sha256sum}
    if shutil.which("openssl"):
        commands["openssl dgst"] = openssl
    failures = []
    print(
        f"read: {len(paths)} backups of {args.size_mib} MiB over {args.systems} systems, "
        f"{total / 1e9:.2f} GB, {args.runs} runs"
    )
    for cache in args.cache:
        if cache == "cold" and os.geteuid() != 0:
            print("  cold: skipped (dropping the page cache needs root)")
            continue
        times: dict[str, list[float]] = {name: [] for name in commands}
        ratios, of_openssl, load = [], [], []
        busy, stolen, began = (
            bench.machine_busy_seconds(),
            bench.machine_stolen_seconds(),
            time.monotonic(),
        )
        for run in range(args.runs):
            load.append(os.getloadavg()[0])
            order = list(commands) if run % 2 == 0 else list(reversed(commands))
            for name in order:
                times[name].append(timed(commands[name], cache == "cold", paths))
            ratios.append(times["sha256sum"][-1] / times["verify"][-1])
            if "openssl dgst" in times:
                of_openssl.append(times["openssl dgst"][-1] / times["verify"][-1])
        wall = time.monotonic() - began
        print(
            f"  {cache:4} machine {(bench.machine_busy_seconds() - busy) / wall:.2f} cores busy, "
            f"steal {(bench.machine_stolen_seconds() - stolen) / wall / (os.cpu_count() or 1):.1%}"
            f", load {min(load):.1f} to {max(load):.1f}"
        )
        for name, seconds in times.items():
            rates = [total / s / 1e6 for s in seconds]
            print(
                f"  {cache:4} {name:12} {min(rates):6.0f}-{max(rates):6.0f} MB/s  "
                f"{[round(s, 2) for s in seconds]} s"
            )
        print(
            f"  {cache:4} verify/sha256sum throughput {min(ratios):.2f}-{max(ratios):.2f} "
            f"(median {statistics.median(ratios):.2f}; target >= 0.8)"
        )
        if of_openssl:
            print(
                f"  {cache:4} verify/openssl dgst throughput {min(of_openssl):.2f}-"
                f"{max(of_openssl):.2f} (for context)"
            )
        if min(ratios) < 0.8 and not args.short:
            failures.append(f"verifier {cache}: {min(ratios):.2f} of sha256sum < 0.8")
    return failures


# --------------------------------------------------------------------------- delete


def verifications(port: int) -> float:
    """Backups the verifier has read so far, whatever their outcome."""
    return sum(metric(port, "gateway_backup_verifications_total").values())


def delete_row(work: Path, args: argparse.Namespace, verifier: bool) -> bench.Row:
    storage: dict[str, Any] = {"backend": "local", "local": {"root": str(work / "backups")}}
    if verifier:
        storage["verify"] = {"enabled": True}  # its default budget and interval
    name = "b gateway local" + (", verifier on" if verifier else "")
    serving = bench.serve_row(
        name,
        work,
        storage,
        args.concurrency,
        1,
        bench.SYSTEMS,
        args.seeds,
        lambda: bench.count_local(work / "backups"),
    )
    pid, port = serving.server.proc.pid, serving.port
    verified: list[float] = []
    try:
        started = time.monotonic()
        if not args.unsettled:
            wait_settled(port, (lambda p: verifications(p) > 0) if verifier else None)
        if verifier:
            verified.append(verifications(port))
            print(
                f"  the verifier read {verified[0]:.0f} backups in the "
                f"{time.monotonic() - started:.0f} s before the load"
            )
        meter = bench.CpuMeter.start(pid)
        result = bench.run_load(port, serving.ids, serving.token, args.concurrency, args.seconds,
                                "wrk" if shutil.which("wrk") else "builtin")  # fmt: skip
        cpu = meter.stop(result["requests"])
    except BaseException:
        serving.server.stop()
        raise
    row = serving.finish(
        result, cpu, (lambda p: verified.append(verifications(p))) if verifier else None
    )
    shutil.rmtree(work / "backups", ignore_errors=True)
    if verifier:
        row.name += f" (verified {verified[-1] - verified[0]:.0f})"
    return row


def delete_rows(work: Path, args: argparse.Namespace) -> list[str]:
    rows: dict[bool, list[bench.Row]] = {True: [], False: []}
    ratios, load = [], []
    print(
        f"delete: {args.concurrency} connections, {args.seconds:g} s a row, {args.runs} runs, "
        f"{'right after start-up' if args.unsettled else 'settled'}"
    )
    for run in range(args.runs):
        for verifier in (True, False) if run % 2 == 0 else (False, True):
            load.append(os.getloadavg()[0])
            rows[verifier].append(delete_row(work / f"delete-{run}-{verifier}", args, verifier))
        ratios.append(rows[True][-1].p99_ms / rows[False][-1].p99_ms)
    bench.print_table(rows[False] + rows[True])
    print(f"  load average {min(load):.1f} to {max(load):.1f} as the rows began")
    rps = [on.rps / off.rps for on, off in zip(rows[True], rows[False], strict=True)]
    print(
        f"  p99 on/off {min(ratios):.2f}-{max(ratios):.2f} "
        f"({', '.join(f'{r:.2f}' for r in ratios)}; target <= 1.2); "
        f"req/s on/off {min(rps):.2f}-{max(rps):.2f}"
    )
    return bench.check(rows[True] + rows[False])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["read", "delete"], action="append")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--cache", choices=["warm", "cold"], action="append")
    parser.add_argument("--systems", type=int, default=8)
    parser.add_argument("--per-system", type=int, default=16)
    parser.add_argument("--size-mib", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seeds", type=int, default=2400, help="per system, delete rows")
    parser.add_argument(
        "--unsettled",
        action="store_true",
        help="delete rows right after start-up (the verifier still listing, the fleet scanning)",
    )
    parser.add_argument(
        "--short", action="store_true", help="CI: small and quick; fails on errors, never on speed"
    )
    args = parser.parse_args()
    if args.short:
        args.runs, args.systems, args.per_system, args.size_mib = 1, 2, 4, 4
        args.seconds, args.seeds, args.unsettled = 3, 400, True
    args.cache = args.cache or (["warm", "cold"] if os.geteuid() == 0 else ["warm"])
    only = set(args.only or ["read", "delete"])
    (bench.REPO / "data").mkdir(exist_ok=True)  # a clean clone has no data/ yet
    work = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=bench.REPO / "data"))
    failures = []
    try:
        if "read" in only:
            failures += read_rows(work / "read", args)
        if "delete" in only:
            failures += delete_rows(work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for failure in failures:
        print("FAIL:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
