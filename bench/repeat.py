"""The same rows, one after another: how much does this machine drift?

    .venv/bin/python bench/repeat.py a,b,b,a,b,b     # a = bare aiohttp, b = gateway local

Each row is bench/run.py's (a) or (b) row (fresh seeds for every (b), sized from the
last bare row's rate as bench/run.py sizes them; 64 connections, wrk).
For every row it prints req/s, p50, p99, the server's CPU per request split into its
processes (the gateway's loop and its local I/O process, user and system time) and the
disk writes per request. Identical rows that differ here differ because of the machine,
not the code: read bench/run.py's ratios accordingly.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import run as bench

TICK = os.sysconf("SC_CLK_TCK")


def cpu_by_process(pids: list[int]) -> dict[int, tuple[str, int, int]]:
    """pid -> (role, user ticks, system ticks), all of each process's threads included."""
    out = {}
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        kind = "io" if b"local.io_process" in cmdline else "loop"
        out[pid] = (kind, int(fields[11]), int(fields[12]))
    return out


def disk_writes() -> int:
    """Write requests completed on every disk (/proc/diskstats field 8)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        fields = line.split()
        if not fields[2].startswith(("loop", "ram")):
            total += int(fields[7])
    return total


@dataclass
class SplitMeter(bench.CpuMeter):
    """bench's CpuMeter, noting the split by process and the disk writes as well."""

    before: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    writes: int = 0
    last: ClassVar[str] = ""

    @classmethod
    def start(cls, pid: int) -> SplitMeter:
        meter = super().start(pid)
        assert isinstance(meter, SplitMeter)
        meter.before = cpu_by_process(meter.pids)
        meter.writes = disk_writes()
        return meter

    def stop(self, requests: int) -> bench.CpuReading:
        parts = []
        for pid, (role, user, system) in cpu_by_process(self.pids).items():
            _, user0, system0 = self.before.get(pid, (role, 0, 0))
            if requests and (user - user0 or system - system0):
                per = 1e6 / TICK / requests
                parts.append(
                    f"{role} user {per * (user - user0):.0f} sys {per * (system - system0):.0f}"
                )
        writes = (disk_writes() - self.writes) / requests if requests else 0.0
        SplitMeter.last = ", ".join(parts) + f"; disk writes/req {writes:.2f}"
        return super().stop(requests)


def main() -> int:
    sequence = (sys.argv[1] if len(sys.argv) > 1 else "a,b,b,a,b,b").split(",")
    seconds = float(os.environ.get("SECONDS_A_ROW", "10"))
    bench.CpuMeter = SplitMeter  # type: ignore[misc]  # the rows meter with this one
    work = Path(tempfile.mkdtemp(prefix="gateway-repeat-"))
    bare_ids = bench.write_bare_ids(work / "bare-ids.txt")
    print("row  kind  req/s   p50 ms  p99 ms  server CPU us/req  (by process, us/req)")
    bare_rps = 25000.0  # until a bare row says otherwise: above any seen here
    try:
        for n, kind in enumerate(sequence):
            if kind == "a":
                row = bench.row_bare(work / f"a{n}", 64, seconds, "wrk", bare_ids)
                bare_rps = row.rps
            elif kind == "b":
                w = work / f"b{n}"
                row = bench.row_gateway(
                    "b",
                    w,
                    {"backend": "local", "local": {"root": str(w / "backups")}},
                    64,
                    seconds,
                    "wrk",
                    1,
                    bench.SYSTEMS,
                    bench.seeds_per_system(bare_rps, seconds),
                    lambda w=w: bench.count_local(w / "backups"),
                )
                shutil.rmtree(w / "backups", ignore_errors=True)  # as bench/run.py does
            else:
                raise SystemExit(f"unknown row {kind!r}: a or b")
            print(
                f"{n:>3}  {kind:<4}{row.rps:>7.0f}{row.p50_ms:>9.2f}{row.p99_ms:>8.2f}"
                f"{row.cpu_us_per_request:>19.0f}  ({SplitMeter.last})",
                flush=True,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
