"""A sustained slowloris, as its own process: COUNT connections that never complete a request
head (half send nothing, half trickle one byte every half second), each reopened the moment
the server closes or resets it.

    python -m tests.slowloris PORT COUNT [all-trickle]

With `all-trickle` every connection trickles, its first byte sent at once: the shape that
the kernel's deferred accept (a connection is handed over with its first bytes) does not
hold back.

It prints `attacking` once every connection has been open at least once, then, on SIGTERM,
`reopened N` (how many times the server closed one) and exits. A process of its own, so its
churn takes none of the measuring client's event loop: `attacking()` runs it for
tests/test_connections.py and bench/slowloris.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HEAD = b"DELETE /api/systems/sys_c1/backups/x HTTP/1.1\r\nHost: a\r\n"  # no blank line, ever
PACE = 0.5  # seconds between a trickler's bytes
RETRY_PAUSE = 0.01  # after a refused connect: the backlog is full, not a reset to answer


class Attack:
    def __init__(self, port: int, count: int) -> None:
        self.port = port
        self.count = count
        self.reopened = 0
        self.connected_once: set[int] = set()
        self.all_open = asyncio.Event()

    async def one(self, slot: int, trickle: bool) -> None:
        while True:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(RETRY_PAUSE)
                continue
            self.connected_once.add(slot)
            if len(self.connected_once) == self.count:
                self.all_open.set()
            try:
                await self._hold(reader, writer, trickle)
            finally:
                writer.close()
            self.reopened += 1
            if self.reopened == self.count:
                print("sustained", flush=True)  # as many closes as connections: churning

    @staticmethod
    async def _hold(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, trickle: bool
    ) -> None:
        """Until the server closes the connection (EOF or reset)."""
        sent = 0
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                if trickle and sent < len(HEAD):
                    writer.write(HEAD[sent : sent + 1])
                    sent += 1
                try:
                    async with asyncio.timeout(PACE if trickle else None):
                        if not await reader.read(4096):
                            return
                except TimeoutError:
                    continue


@dataclass
class Outcome:
    reopened: int = 0  # times the server closed an attacker's connection, filled in at the end


@contextlib.contextmanager
def attacking(
    port: int,
    count: int,
    cpus: set[int] | None = None,
    sustained: bool = False,
    all_trickle: bool = False,
) -> Iterator[Outcome]:
    """The attack on `port` for the duration of the block, started once every connection
    has been open once (and, when `sustained`, once the server has closed as many as there
    are); `reopened` is read when it stops. `cpus`: the only cores it runs on (an attacker
    elsewhere spends none of the server's)."""
    from .support import OutputWatcher

    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.slowloris", str(port), str(count)]
        + (["all-trickle"] if all_trickle else []),
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=None if cpus is None else lambda: os.sched_setaffinity(0, cpus),
    )
    output = OutputWatcher(proc)
    outcome = Outcome()
    try:
        output.wait_for_line("attacking", timeout=60)
        if sustained:
            output.wait_for_line("sustained", timeout=120)
        yield outcome
    finally:
        proc.terminate()
        found = re.search(r"reopened (\d+)", output.wait_closed())
        proc.wait(30)
    outcome.reopened = int(found.group(1)) if found else 0


async def main(port: int, count: int, all_trickle: bool) -> None:
    # one descriptor a connection: the attacker is not bound by a service manager's 1,024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, count + 256)), hard))
    attack = Attack(port, count)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    tasks = [
        asyncio.create_task(attack.one(i, trickle=all_trickle or i % 2 == 1)) for i in range(count)
    ]
    waiting = asyncio.create_task(attack.all_open.wait())
    await asyncio.wait([waiting, asyncio.create_task(stop.wait())], return_when="FIRST_COMPLETED")
    if attack.all_open.is_set():
        print("attacking", flush=True)
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(f"reopened {attack.reopened}", flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:] == ["all-trickle"]))
