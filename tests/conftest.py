from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient

from gateway import create_app
from gateway.config import Config

from .faultproxy import FaultProxy
from .servers import PlatformDatabase, PostgresServer, RedisServer, SeaweedServer
from .support import DIRECTORY, LocalHarness, MotoServer, S3Harness, make_config

Harness = LocalHarness | S3Harness
StartGateway = Callable[..., Awaitable[TestClient]]


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def seaweed_server() -> Iterator[SeaweedServer]:
    """A real S3 implementation (SeaweedFS), beside moto."""
    server = SeaweedServer()
    yield server
    server.stop()


S3Server = MotoServer | SeaweedServer


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Every S3 test runs on moto and on SeaweedFS; where they differ is said in test_s3.py."""
    server: S3Server = request.getfixturevalue(
        f"{'moto' if request.param == 'moto' else 'seaweed'}_server"
    )
    return server


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A real PostgreSQL 18 server with the platform's schema as a template database."""
    server = PostgresServer(track_statements=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """The shared Redis with no upload counted yet this minute (other tests upload too), and
    none of the gateway's own keys (`backup_gateway:*`: reservations, failed logins)."""
    db = redis_server.client(1)
    for key in db.keys("backup*"):
        db.delete(key)
    return redis_server


@pytest.fixture
async def platform_db(postgres_server: PostgresServer) -> PlatformDatabase:
    """This test's own copy of the platform's database, holding the test directory."""
    database = PlatformDatabase(postgres_server, await postgres_server.new_database())
    await database.load(DIRECTORY)
    return database


def postgres_directory(database: PlatformDatabase, **settings: Any) -> dict[str, Any]:
    """The `directory` config section for the platform's database."""
    postgres = {"dsn": database.dsn, "owner_organization_id": "org_owner", **settings}
    return {"kind": "postgres", "postgres": postgres}


@pytest.fixture(params=["file", "postgres"])
async def directory_section(
    request: pytest.FixtureRequest, postgres_server: PostgresServer
) -> dict[str, Any]:
    """Each directory kind in turn, holding the same test directory."""
    if request.param == "file":
        return {"kind": "file"}
    database = PlatformDatabase(postgres_server, await postgres_server.new_database())
    await database.load(DIRECTORY)
    return postgres_directory(database)


@pytest.fixture
async def proxy(s3_server: S3Server) -> AsyncIterator[FaultProxy]:
    """A TCP fault proxy in front of the shared S3 server."""
    proxy = FaultProxy("127.0.0.1", int(s3_server.port))
    await proxy.start()
    yield proxy
    await proxy.close()


@pytest.fixture
def directory_file(tmp_path: Path) -> Path:
    path = tmp_path / "directory.yaml"
    path.write_text(yaml.safe_dump(DIRECTORY))
    return path


@pytest.fixture
def local_harness(tmp_path: Path) -> LocalHarness:
    return LocalHarness(tmp_path / "backups")


@pytest.fixture
def s3_harness(s3_server: S3Server) -> S3Harness:
    return S3Harness(s3_server.endpoint, f"bkt-{uuid.uuid4().hex[:12]}")


@pytest.fixture
def local_inline_harness(tmp_path: Path) -> LocalHarness:
    """Local disk with the syscalls on the event loop and fsyncs in a thread pool."""
    return LocalHarness(tmp_path / "backups", io="inline")


@pytest.fixture(params=["local", "local_inline", "s3_moto", "s3_seaweedfs"])
def harness(request: pytest.FixtureRequest) -> Harness:
    """Every storage behaviour test runs against each real backend (local in its two modes,
    S3 on each real server)."""
    if request.param.startswith("s3_"):
        server = request.getfixturevalue(
            "moto_server" if request.param == "s3_moto" else "seaweed_server"
        )
        return S3Harness(server.endpoint, f"bkt-{uuid.uuid4().hex[:12]}")
    harness: Harness = request.getfixturevalue(f"{request.param}_harness")
    return harness


@pytest.fixture
def start_gateway(aiohttp_client: Any, tmp_path: Path, directory_file: Path) -> StartGateway:
    """Start the real app on a loopback port with the given storage and config sections."""

    async def start(storage: dict[str, Any] | None = None, **sections: Any) -> TestClient:
        config: Config = make_config(tmp_path, storage, **sections)
        return await aiohttp_client(create_app(config))

    return start


@pytest.fixture
async def local_gateway(start_gateway: StartGateway, local_harness: LocalHarness) -> TestClient:
    return await start_gateway(local_harness.storage())
