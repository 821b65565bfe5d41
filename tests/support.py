"""Test helpers: config building, token minting, and storage harnesses that look at real storage."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Iterator
from http.client import HTTPConnection
from pathlib import Path
from typing import Any, TypeVar, overload

import botocore.session
import yaml
from botocore.config import Config as BotoConfig
from jose import jwt

from gateway.config import Config, config_from_mapping
from gateway.identity.appliance import new_secret
from storage_backends import BackupLocation
from storage_backends.local import ROOT_MARKER

FOLDER_LOCK_SUFFIX = ".lock"  # the store's own per-purpose folder locks: .retention.lock

SECRET = "test-secret-" + "x" * 40
ISSUER = "https://platform.example/auth"
AUDIENCE = "backup-gateway"

# A tree with every role, soft-deleted organizations at each level, and odd parents.
ORGANIZATIONS: list[dict[str, Any]] = [
    {"id": "org_owner", "role": "owner"},
    {"id": "org_d1", "role": "distributor", "parent": "org_owner"},
    {"id": "org_d2", "role": "distributor", "parent": "org_owner"},
    {"id": "org_d_gone", "role": "distributor", "parent": "org_owner", "deleted": True},
    {"id": "org_r1", "role": "reseller", "parent": "org_d1"},
    {"id": "org_r2", "role": "reseller", "parent": "org_d2"},
    {"id": "org_r_gone", "role": "reseller", "parent": "org_d1", "deleted": True},
    {"id": "org_r_owner", "role": "reseller", "parent": "org_owner"},
    {"id": "org_c1", "role": "customer", "parent": "org_r1"},
    {"id": "org_c1b", "role": "customer", "parent": "org_r1"},
    {"id": "org_c_d1", "role": "customer", "parent": "org_d1"},
    {"id": "org_c2", "role": "customer", "parent": "org_r2"},
    {"id": "org_c_orphan", "role": "customer", "parent": "org_r_gone"},
    {"id": "org_c_gone", "role": "customer", "parent": "org_r1", "deleted": True},
    {"id": "org_c_owner", "role": "customer", "parent": "org_owner"},
    {"id": "org_c_under_d_gone", "role": "customer", "parent": "org_d_gone"},
]
ORG_IDS = [o["id"] for o in ORGANIZATIONS]


def system_id_of(org_id: str) -> str:
    return "sys_" + org_id.removeprefix("org_")


def system_key_of(org_id: str) -> str:
    return "KEY-" + org_id.removeprefix("org_").upper().replace("_", "-")


SYSTEMS: list[dict[str, Any]] = [
    {"id": system_id_of(o), "system_key": system_key_of(o), "organization_id": o} for o in ORG_IDS
] + [
    {
        "id": "sys_deleted",
        "system_key": "KEY-DELETED",
        "organization_id": "org_c1",
        "deleted": True,
    },
    {"id": "sys_unregistered", "organization_id": "org_c1"},
]
# Appliance credentials (DESIGN.md §9) for a few systems: the secret the appliance sends,
# and the public part and salted hash the directory holds.
APPLIANCE_SECRETS: dict[str, str] = {}
for _system in SYSTEMS:
    if _system["id"] in ("sys_c1", "sys_c1b", "sys_c2", "sys_deleted", "sys_c_gone"):
        _made = new_secret()
        APPLIANCE_SECRETS[_system["id"]] = _made.secret
        _system["system_secret_public"] = _made.public
        _system["system_secret_sha256"] = _made.sha256
DIRECTORY = {"organizations": ORGANIZATIONS, "systems": SYSTEMS}
ROLE_OF = {o["id"]: o["role"] for o in ORGANIZATIONS}


def new_backup_id(suffix: str = ".tar.gz") -> str:
    """A fresh UUIDv7-shaped id."""
    ms = int(time.time() * 1000)
    rand = uuid.uuid4().hex
    return (
        f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7{rand[:3]}-{'89ab'[int(rand[3], 16) % 4]}"
        f"{rand[4:7]}-{rand[7:19]}{suffix}"
    )


def location_for(org_id: str, backup_id: str) -> BackupLocation:
    return BackupLocation(org_id, system_key_of(org_id), backup_id)


def make_config(tmp_path: Path, storage: dict[str, Any] | None = None, **sections: Any) -> Config:
    raw: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0},
        "auth": {"algorithms": ["HS256"], "secret": SECRET},
        "directory": {"path": str(tmp_path / "directory.yaml")},
        "storage": storage or {"backend": "local", "local": {"root": str(tmp_path / "backups")}},
        "logging": {"level": "INFO"},
    }
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    return config_from_mapping(raw, tmp_path, environ={})


def claims_for(
    org_id: str,
    role: str | None = None,
    permissions: list[str] | None = None,
    ttl: int = 600,
    **overrides: Any,
) -> dict[str, Any]:
    now = int(time.time())
    claims: dict[str, Any] = {
        "token_type": "access",
        "sub": "u_test",
        "iat": now,
        "nbf": now,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "user": {
            "id": "u_test",
            "username": "tester",
            "organization_id": org_id,
            "org_role": (role or ROLE_OF.get(org_id, "customer")).capitalize(),
            "user_permissions": ["read:systems"],
            "org_permissions": ["read:systems", "manage:systems"]
            if permissions is None
            else permissions,
        },
    }
    claims.update(overrides)
    return claims


def token_for(org_id: str, role: str | None = None, **kwargs: Any) -> str:
    return jwt.encode(claims_for(org_id, role, **kwargs), SECRET, algorithm="HS256")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(key: str, secret: str) -> dict[str, str]:
    """An appliance's credentials (DESIGN.md §9) as its Authorization header."""
    token = base64.b64encode(f"{key}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def delete_as(client: Any, bid: str, sid: str = "sys_c1", org: str = "org_c1") -> Any:
    """DELETE a backup as a caller of `org` with the usual permissions."""
    return await client.delete(f"/api/systems/{sid}/backups/{bid}", headers=bearer(token_for(org)))


# --------------------------------------------------------------------------- storage harnesses


# Retention off (every keep rule at 0): what a test plants stays until the test says
# otherwise; a test of retention gives its own `retention` section, which replaces this.
KEEP_EVERYTHING: dict[str, Any] = {
    "keep_last": 0,
    "keep_daily": 0,
    "keep_weekly": 0,
    "keep_monthly": 0,
}


class LocalHarness:
    """Arrange and inspect backups on real disk."""

    name = "local"

    def __init__(self, root: Path, io: str = "process") -> None:
        self.root = root
        self.io = io
        root.mkdir(parents=True, exist_ok=True)
        # a root in use carries the marker (an unmarked one is an unmounted volume's)
        (root / ROOT_MARKER).touch()

    def storage(self, **extra: Any) -> dict[str, Any]:
        settings = {"root": str(self.root), "io": self.io, **extra}
        return {"backend": "local", "local": settings, "retention": KEEP_EVERYTHING}

    def put(self, location: BackupLocation, data: bytes = b"backup", sidecar: bool = True) -> None:
        folder = self.root / location.organization_id / location.system_key
        folder.mkdir(parents=True, exist_ok=True)
        (folder / location.backup_id).write_bytes(data)
        if sidecar:
            (folder / (location.backup_id + ".meta.json")).write_text('{"filename": "x"}')

    def put_backup(
        self,
        location: BackupLocation,
        data: bytes,
        filename: str,
        mimetype: str = "application/gzip",
        uploaded_at: str | None = None,
    ) -> None:
        """A backup as an upload leaves it: data and a full sidecar."""
        self.put(location, data, sidecar=False)
        meta = {
            "filename": filename,
            "sha256": hashlib.sha256(data).hexdigest(),
            "mimetype": mimetype,
            "uploaded_at": uploaded_at or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        sidecar = self.root / (location.relative_key + ".meta.json")
        sidecar.write_text(json.dumps(meta))

    def put_key(self, relative_key: str, data: bytes = b"other") -> None:
        path = self.root / relative_key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def exists(self, location: BackupLocation) -> bool:
        return os.path.lexists(self.root / location.relative_key)

    def keys(self) -> set[str]:
        """Every file under the root but the root's marker and the system folders' lock
        files (an flock the store's processes share, DESIGN.md §11): no backup's bytes."""
        return {
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if (p.is_file() or p.is_symlink())
            and p.name != ROOT_MARKER
            and not (p.name.startswith(".") and p.name.endswith(FOLDER_LOCK_SUFFIX))
        }


class S3Harness:
    """Arrange and inspect objects over HTTP with botocore's real signing."""

    name = "s3"

    def __init__(self, endpoint: str, bucket: str, prefix: str = "", versioned: bool = False):
        self.endpoint = endpoint
        self.bucket = bucket
        self.prefix = prefix
        self.client = s3_client(endpoint)
        self.client.create_bucket(Bucket=bucket)
        if versioned:
            self.client.put_bucket_versioning(
                Bucket=bucket, VersioningConfiguration={"Status": "Enabled"}
            )

    def storage(self, **extra: Any) -> dict[str, Any]:
        settings = s3_settings(self.endpoint, self.bucket, self.prefix, **extra)
        return {"backend": "s3", "s3": settings, "retention": KEEP_EVERYTHING}

    def put(self, location: BackupLocation, data: bytes = b"backup", sidecar: bool = True) -> None:
        # On S3 the metadata travels with the object (x-amz-meta-*), not as a sidecar key.
        metadata = {"filename": location.backup_id, "sha256": "0" * 64} if sidecar else {}
        self.put_key(location.relative_key, data, metadata)

    def put_backup(
        self,
        location: BackupLocation,
        data: bytes,
        filename: str,
        mimetype: str = "application/gzip",
        uploaded_at: str | None = None,  # S3 keeps its own LastModified
    ) -> None:
        self.client.put_object(
            Bucket=self.bucket,
            Key=self.prefix + location.relative_key,
            Body=data,
            ContentType=mimetype,
            Metadata={"filename": filename, "sha256": hashlib.sha256(data).hexdigest()},
        )

    def put_key(
        self, relative_key: str, data: bytes = b"other", metadata: dict[str, str] | None = None
    ) -> None:
        self.client.put_object(
            Bucket=self.bucket, Key=self.prefix + relative_key, Body=data, Metadata=metadata or {}
        )

    def exists(self, location: BackupLocation) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + location.relative_key)
            return True
        except self.client.exceptions.ClientError:
            return False

    def keys(self) -> set[str]:
        """Current keys under the whole bucket (prefix kept, so neighbours show too)."""
        found: set[str] = set()
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            found.update(o["Key"] for o in page.get("Contents", []))
        return {k.removeprefix(self.prefix) for k in found}

    def versions(self, key: str) -> list[dict[str, Any]]:
        answer = self.client.list_object_versions(Bucket=self.bucket, Prefix=key)
        return [
            v
            for v in answer.get("Versions", []) + answer.get("DeleteMarkers", [])
            if v["Key"] == key
        ]


def s3_client(endpoint: str, access_key: str = "testing", secret_key: str = "testing") -> Any:
    session = botocore.session.get_session()
    return session.create_client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
    )


def s3_settings(endpoint: str, bucket: str, prefix: str = "", **extra: Any) -> dict[str, Any]:
    return {
        "bucket": bucket,
        "endpoint_url": endpoint,
        "region": "us-east-1",
        "access_key_id": "testing",
        "secret_access_key": "testing",
        "addressing_style": "path",
        "prefix": prefix,
        "connect_timeout_seconds": 1,
        "read_timeout_seconds": 1,
        "max_attempts": 2,
        **extra,
    }


# --------------------------------------------------------------------------- servers


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a gateway log record carries (its `fields` extra)."""
    fields: dict[str, Any] = record.__dict__["fields"]
    return fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    """One blocking request to a gateway running as a process: (status, JSON body)."""
    request = urllib.request.Request(url, method=method)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def appliance_upload(
    port: int, data: bytes, system_id: str = "sys_c1"
) -> tuple[int, dict[str, Any]]:
    """One blocking upload as the appliance `system_id` sends it (HTTP Basic, its own
    key and secret) to a gateway running as a process: (status, JSON body)."""
    system = next(s for s in SYSTEMS if s["id"] == system_id)
    credentials = basic(system["system_key"], APPLIANCE_SECRETS[system_id])
    connection = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        connection.request(
            "POST",
            "/api/systems/backups",
            body=data,
            headers={**credentials, "X-Filename": "b.tar.gz"},
        )
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


def write_config(tmp_path: Path, port: int, storage: dict[str, Any], **extra: Any) -> Path:
    """A config file for a gateway process on `port`, with the test directory beside it."""
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
    path = tmp_path / "config.yaml"
    sections: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port},
        "auth": {"secret": SECRET},
        "storage": storage,
    }
    for name, value in extra.items():
        sections[name] = {**sections.get(name, {}), **value}
    path.write_text(yaml.safe_dump(sections))
    return path


FAULTS = Path(__file__).resolve().parent / "faults"  # sitecustomize.py: injected slow fsyncs


def serve_gateway(
    config: Path,
    *args: str,
    open_files: int | None = None,
    env: dict[str, str] | None = None,
    new_session: bool = False,
    hard_open_files: bool = False,
) -> subprocess.Popen[str]:
    """`python -m gateway serve --config CONFIG [ARGS]` as a real process, output captured.

    `open_files` starts it with that soft RLIMIT_NOFILE (the hard limit unchanged), as a
    service manager's default of 1,024 would; with `hard_open_files` the hard limit too,
    so the gateway cannot raise it (a host whose hard limit is 1,024)."""

    def limit() -> None:
        if open_files is not None:
            hard = open_files if hard_open_files else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, hard))

    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=limit if open_files is not None else None,
        env={**os.environ, **env} if env else None,
        start_new_session=new_session,  # its own process group, for a signal to all of it
    )


class OutputWatcher:
    """Reads a process's output on a thread as it comes, so a test can wait for a line (a log
    record) instead of sleeping; `text()` is everything read so far, `wait_closed()` all."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        self._proc = proc
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, args=(proc.stdout,), daemon=True)
        self._thread.start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    def lines(self) -> list[str]:
        with self._changed:
            return list(self._lines)

    def text(self) -> str:
        return "".join(self.lines())

    def records(self) -> list[dict[str, Any]]:
        """The JSON log records read so far."""
        return [json.loads(line) for line in self.lines() if line.startswith("{")]

    def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], Any], timeout: float = 30.0
    ) -> Any:
        """Wait until `predicate(records)` is truthy and return its value; fail, with the
        output so far, when the process's output ends or `timeout` passes first."""
        return self._wait(
            lambda lines: predicate([json.loads(line) for line in lines if line.startswith("{")]),
            timeout,
        )

    def wait_for_line(self, fragment: str, timeout: float = 30.0) -> str:
        """Wait until a line (of any log format) holding `fragment` is read; return it."""
        found: str = self._wait(
            lambda lines: next((line for line in lines if fragment in line), None), timeout
        )
        return found

    def _wait(self, predicate: Callable[[list[str]], Any], timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = predicate(self._lines)
                if found:
                    return found
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    raise AssertionError(
                        f"not seen in the output (closed={self._closed}):\n" + "".join(self._lines)
                    )
                self._changed.wait(left)

    def wait_closed(self, timeout: float = 30.0) -> str:
        self._thread.join(timeout)
        return self.text()


T = TypeVar("T")


def wait_until(
    condition: Callable[[], T], what: str, timeout: float = 30.0, every: float = 0.02
) -> T:
    """Poll `condition`, for a state that no event announces (a file, a key, /proc), until
    it is truthy; return its value. Fails, naming `what`, once `timeout` has passed."""
    deadline = time.monotonic() + timeout
    while not (found := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        time.sleep(every)
    return found


@overload
async def eventually(
    condition: Callable[[], Awaitable[T]], what: str, timeout: float = ..., every: float = ...
) -> T: ...
@overload
async def eventually(
    condition: Callable[[], T], what: str, timeout: float = ..., every: float = ...
) -> T: ...
async def eventually(
    condition: Callable[[], Any], what: str, timeout: float = 30.0, every: float = 0.02
) -> Any:
    """`wait_until` on the event loop, which goes on serving between polls: `condition`
    may be a probe to await (a request, a query) or a plain check."""
    deadline = time.monotonic() + timeout
    while True:
        probe = condition()
        found = await probe if inspect.isawaitable(probe) else probe
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout}s: {what}")
        await asyncio.sleep(every)


async def storage_scanned(client: Any) -> None:
    """Wait until the fleet index's start-up scan of storage ended, done or failed: a test
    that counts the store's requests counts its own from here, not the scan's."""
    from gateway.fleet.index import FLEET

    index = client.app[FLEET]
    await eventually(lambda: sum(index.scans.values()) >= 1, "the start-up fleet scan ended")


def metric_value(text: str, sample: str) -> float:
    """The value of `sample` (a name and its labels as /metrics writes them) in a scrape's
    text; 0 when absent (a counter not yet incremented)."""
    for line in text.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    return 0.0


async def scrape(client: Any, sample: str) -> float:
    """One sample of the in-process gateway's /metrics (an aiohttp TestClient)."""
    resp = await client.get("/metrics")
    return metric_value(await resp.text(), sample)


async def scraped_is(client: Any, sample: str, value: float) -> bool:
    """Whether the in-process gateway's /metrics shows `sample` at `value` now."""
    return await scrape(client, sample) == value


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[Any] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class MotoServer:
    """A standalone S3-protocol server (moto's server mode) in its own process."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )
        wait_for_port(self.port, proc=self.proc)

    def stop(self) -> None:
        stop_process(self.proc)


def stop_process(
    proc: subprocess.Popen[Any], signum: int = signal.SIGTERM, grace: float = 5
) -> None:
    """Stop a server by its process id: `signum`, then SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signum)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def replace_storage(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, storage=dataclasses.replace(config.storage, **changes))


@contextlib.contextmanager
def mounted_tmpfs(path: Path, options: str = "size=4m") -> Iterator[Path]:
    """A real tmpfs mounted at `path` for the test (needs root: the test is skipped, with
    the reason, where it cannot be mounted); unmounted after."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        import pytest

        pytest.skip(f"cannot mount a tmpfs ({options}) here: {done.stderr.strip()[:120]}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)
