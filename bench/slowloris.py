"""Legitimate deletes under a sustained slowloris (issue #26, 2): their success and latency
without and with COUNT reconnecting slow connections, against a gateway process whose open
files are capped (hard) at 1,024, as a service manager's default.

    .venv/bin/python bench/slowloris.py [DELETES] [COUNT] [--attacker-core] [--all-trickle]
                                                   # defaults: 300 deletes, 1,100
    .venv/bin/python bench/slowloris.py --churn-cost [--all-trickle] [--attacker-core]

With --churn-cost no delete is sent: the attack runs alone for 8 s once sustained, and the
gateway's CPU time (its /proc counters) over the connections it closed to make room (its
evicted counter) is printed, the cost of one reopened connection: a steadier figure than a
p99 for comparing two versions of the accept path.

With --all-trickle every attacker sends its first byte at once (half of them send nothing
by default): the kernel hands each over at once, and the gateway's cap alone decides.

With --attacker-core the attacker runs on the last core alone and the gateway, its I/O
process and the measuring client on the others, in both phases: the shape of a real
attack, whose CPU is not the server's. Without it all three share every core.

Each delete is sent on a connection of its own (the case the connection cap decides: a
kept-alive connection is already in), one after another. Printed: per phase, successes,
p50, p99, max; then p99 under attack over p99 without it. The attacker is its own process
(tests/slowloris.py), so its churn does not slow the measuring client's loop; the three
processes share this machine's cores, which the ratio includes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.slowloris import attacking
from tests.support import (
    LocalHarness,
    bearer,
    free_port,
    location_for,
    metric_value,
    new_backup_id,
    serve_gateway,
    token_for,
    wait_for_port,
    write_config,
)


async def deletes(url: str, ids: list[str]) -> tuple[int, list[float], list[float]]:
    """(successes, each delete's seconds, each delete's seconds to connect)."""
    ok, took, connecting = 0, [], []
    connector = aiohttp.TCPConnector(force_close=True)
    trace = aiohttp.TraceConfig()
    connect_started = 0.0

    async def on_connect_start(*_: object) -> None:
        nonlocal connect_started
        connect_started = time.perf_counter()

    async def on_connect_end(*_: object) -> None:
        connecting.append(time.perf_counter() - connect_started)

    trace.on_connection_create_start.append(on_connect_start)
    trace.on_connection_create_end.append(on_connect_end)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        for bid in ids:
            started = time.perf_counter()
            try:
                async with session.delete(
                    f"{url}/api/systems/sys_c1/backups/{bid}",
                    headers=bearer(token_for("org_c1")),
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as resp:
                    await resp.read()
                    ok += resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                pass
            took.append(time.perf_counter() - started)
    return ok, took, connecting


def percentiles(seconds: list[float]) -> tuple[float, float, float]:
    """(p50, p99, max) in milliseconds."""
    ms = sorted(t * 1000 for t in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.99 * len(ms)) - 1)], ms[-1]


def report(name: str, ok: int, took: list[float], connecting: list[float]) -> float:
    p50, whole_p99, top = percentiles(took)
    print(
        f"{name:>16}: {ok}/{len(took)} ok ({100 * ok / len(took):.1f} %), "
        f"p50 {p50:.1f} ms, p99 {whole_p99:.1f} ms, max {top:.1f} ms"
    )
    # the connect (the handshake, done by the kernel before the gateway accepts) apart
    # from the rest: the time in the accept queue and the request's own is in the rest
    p50, p99, top = percentiles(connecting)
    print(f"{'':>16}  of which connecting: p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {top:.1f} ms")
    return whole_p99


async def main(count: int, attackers: int, attacker_core: bool, all_trickle: bool) -> None:
    attacker_cpus = None
    if attacker_core:
        cores = sorted(os.sched_getaffinity(0))
        attacker_cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))  # the gateway started below inherits it
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        harness = LocalHarness(Path(tmp) / "backups")
        config = write_config(Path(tmp), port, harness.storage(), logging={"level": "WARNING"})
        proc = serve_gateway(config, open_files=1024, hard_open_files=True)
        try:
            wait_for_port(port, proc=proc)
            ids = [new_backup_id() for _ in range(2 * count)]
            for bid in ids:
                harness.put(location_for("org_c1", bid))
            url = f"http://127.0.0.1:{port}"
            await deletes(url, ids[:20])  # warm-up, not counted
            calm = report("without attack", *await deletes(url, ids[20:count]))
            with attacking(
                port, attackers, attacker_cpus, sustained=True, all_trickle=all_trickle
            ) as attack:
                loud = report(f"{attackers} attackers", *await deletes(url, ids[count:]))
            print(f"{'':>16}  attackers' connections closed and reopened: {attack.reopened}")
            print(f"{'':>16}  p99 ratio (attack / calm): {loud / calm:.2f}")
        finally:
            proc.send_signal(signal.SIGTERM)
            output, _ = proc.communicate(timeout=30)
        errors = [line for line in output.splitlines() if '"level":"error"' in line]
        print(f"{'':>16}  gateway error lines: {len(errors)}", *errors[:3], sep="\n")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def churn_cost(attackers: int, attacker_core: bool, all_trickle: bool, seconds: float = 8) -> None:
    attacker_cpus = None
    if attacker_core:
        cores = sorted(os.sched_getaffinity(0))
        attacker_cpus = {cores[-1]}
        os.sched_setaffinity(0, set(cores[:-1]))
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        harness = LocalHarness(Path(tmp) / "backups")
        config = write_config(Path(tmp), port, harness.storage(), logging={"level": "WARNING"})
        proc = serve_gateway(config, open_files=1024, hard_open_files=True)

        def evicted() -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as resp:
                return metric_value(resp.read().decode(), "gateway_connections_evicted_total")

        try:
            wait_for_port(port, proc=proc)
            with attacking(port, attackers, attacker_cpus, sustained=True, all_trickle=all_trickle):
                before, (user0, sys0), started = evicted(), cpu_seconds(proc.pid), time.time()
                time.sleep(seconds)
                after, (user1, sys1), ended = evicted(), cpu_seconds(proc.pid), time.time()
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    wall, closed = ended - started, after - before
    user, system = user1 - user0, sys1 - sys0
    print(
        f"{attackers} attackers: {closed / wall:.0f} connections closed and reopened a second; "
        f"the gateway {100 * (user + system) / wall:.0f} % of a core "
        f"(user {100 * user / wall:.0f} %, system {100 * system / wall:.0f} %), "
        f"{1e6 * (user + system) / max(closed, 1):.0f} us a reopened connection"
    )


if __name__ == "__main__":
    flags = [a for a in sys.argv[1:] if a.startswith("--")]
    args = [int(a) for a in sys.argv[1:] if not a.startswith("--")][:2]
    count, attackers = args + [300, 1100][len(args) :]
    if "--churn-cost" in flags:
        churn_cost(attackers, "--attacker-core" in flags, "--all-trickle" in flags)
        sys.exit(0)
    asyncio.run(main(count, attackers, "--attacker-core" in flags, "--all-trickle" in flags))
