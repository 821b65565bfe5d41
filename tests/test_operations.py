"""Running it like a production service: metrics, logs, readiness, limits, shutdown, workers."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient

from gateway.telemetry.metrics import Metrics

from .conftest import S3Server, StartGateway
from .faultproxy import FaultProxy
from .support import (
    KEEP_EVERYTHING,
    LocalHarness,
    OutputWatcher,
    S3Harness,
    bearer,
    eventually,
    fields_of,
    free_port,
    http,
    location_for,
    new_backup_id,
    s3_settings,
    serve_gateway,
    storage_scanned,
    token_for,
    wait_for_port,
    wait_until,
    write_config,
)
from .support import (
    delete_as as delete,
)


@pytest.fixture
def proxied_harness(s3_server: S3Server, s3_harness: S3Harness, proxy: FaultProxy) -> Any:
    """Arrange through the real server; point the gateway at the proxy."""
    return s3_harness, {
        "backend": "s3",
        "s3": s3_settings(proxy.endpoint, s3_harness.bucket, versioning="off"),
        "retention": KEEP_EVERYTHING,  # no start-up sweep among the proxied requests
    }


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# ---- metrics


async def test_metrics_after_a_known_sequence(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    await delete(local_gateway, bid)  # 200
    await delete(local_gateway, bid)  # 404
    await delete(local_gateway, new_backup_id(), sid="sys_c2")  # 403
    await local_gateway.delete(f"/api/systems/sys_c1/backups/{bid}")  # 401
    await local_gateway.get(f"/api/systems/sys_c1/backups/{bid}/extra/path")  # 404 unmatched

    resp = await local_gateway.get("/metrics")
    assert resp.status == 200
    assert resp.content_type == "text/plain"
    text = await resp.text()
    route = "/api/systems/{id}/backups/{backup_id}"
    for status, count in (("200", 1), ("404", 1), ("403", 1), ("401", 1)):
        assert (
            metric(text, "gateway_http_requests_total", route=route, method="DELETE", status=status)
            == count
        )
    assert metric(text, "gateway_http_requests_total", route="unmatched", status="404") == 1
    assert metric(text, "gateway_backup_deletes_total", outcome="backup_deleted") == 1
    assert metric(text, "gateway_backup_deletes_total", outcome="backup_not_found") == 1
    assert metric(text, "gateway_backup_deletes_total", outcome="access_denied_to_system") == 1
    assert (
        metric(
            text,
            "gateway_storage_operations_total",
            backend="local",
            operation="delete",
            outcome="ok",
        )
        == 1
    )
    assert (
        metric(
            text,
            "gateway_storage_operations_total",
            backend="local",
            # the look at protection and the delete are one store step: an absent backup
            # is told there
            operation="delete",
            outcome="BackupNotFound",
        )
        == 1
    )
    assert metric(text, "gateway_http_request_duration_seconds_count", route=route) == 4
    assert metric(text, "gateway_http_request_duration_seconds_bucket", route=route, le="+Inf") == 4
    assert metric(text, "gateway_http_request_duration_seconds_sum", route=route) > 0
    # two deletes asked of the store (one absent), nothing described first
    durations = "gateway_storage_operation_duration_seconds_count"
    assert metric(text, durations, backend="local", operation="describe") == 0
    assert metric(text, durations, backend="local", operation="delete") == 2
    assert "gateway_http_requests_in_flight" in text
    # bounded labels: no raw path or id ever becomes a label value
    assert bid not in text and "extra/path" not in text


def test_latency_buckets_are_cumulative_and_bounds_inclusive() -> None:
    metrics = Metrics()
    for seconds in (0.001, 0.0011, 0.3, 99.0):
        metrics.request_answered("/r", "GET", 200, seconds)
    text = metrics.render().decode()

    def bucket(le: str) -> float:
        return metric(text, "gateway_http_request_duration_seconds_bucket", route="/r", le=le)

    assert bucket("0.001") == 1  # a value on a bound counts in that bucket
    assert bucket("0.0025") == 2
    assert bucket("0.25") == 2
    assert bucket("0.5") == 3
    assert bucket("30.0") == 3
    assert bucket("+Inf") == 4
    assert metric(text, "gateway_http_request_duration_seconds_sum", route="/r") == pytest.approx(
        99.3021
    )


async def test_metrics_scrape_token_and_switch(
    start_gateway: StartGateway, local_harness: LocalHarness
) -> None:
    client = await start_gateway(local_harness.storage(), metrics={"bearer_token": "scrape-me"})
    assert (await client.get("/metrics")).status == 401
    assert (await client.get("/metrics", headers=bearer("wrong"))).status == 401
    assert (await client.get("/metrics", headers=bearer("scrape-me"))).status == 200
    off = await start_gateway(local_harness.storage(), metrics={"enabled": False})
    resp = await off.get("/metrics")
    assert resp.status == 404
    assert (await resp.json())["message"] == "not found"


# ---- logs


async def test_access_and_audit_lines(
    local_gateway: TestClient, local_harness: LocalHarness, caplog: pytest.LogCaptureFixture
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = token_for("org_c1")
    with caplog.at_level(logging.INFO):
        resp = await local_gateway.delete(
            f"/api/systems/sys_c1/backups/{bid}",
            headers={**bearer(token), "X-Request-ID": "req-42"},
        )
        await delete(local_gateway, new_backup_id(), sid="sys_c2")
    assert resp.status == 200
    access = [fields_of(r) for r in caplog.records if r.name == "gateway.access"]
    audit = [fields_of(r) for r in caplog.records if r.name == "gateway.audit"]
    assert access[0] == {
        "request_id": "req-42",
        "method": "DELETE",
        "route": "/api/systems/{id}/backups/{backup_id}",
        "status": 200,
        "client": "127.0.0.1",  # the peer: no trusted proxy forwarded it
        "latency_ms": access[0]["latency_ms"],
        "user_id": "u_test",
        "organization_id": "org_c1",
    }
    assert audit[0] == {
        "request_id": "req-42",
        "user_id": "u_test",
        "organization_id": "org_c1",
        "org_role": "customer",
        "system_id": "sys_c1",
        "backup_id": bid,
        "decision": "allow",
        "outcome": "backup deleted",
        "storage_backend": "local",
    }
    assert audit[1]["decision"] == "deny"
    assert audit[1]["outcome"] == "access denied to system"
    # never the token, anywhere
    assert all(
        token not in r.getMessage() and token not in str(getattr(r, "fields", ""))
        for r in caplog.records
    )


async def test_request_lines_written_straight_to_the_json_handler(
    local_gateway: TestClient, local_harness: LocalHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The service's logging set-up (one JSON handler on the root): access and audit lines
    # skip the LogRecord machinery, and must come out exactly as the formatter writes them.
    from gateway.telemetry.logs import JsonFormatter, LoopBufferedHandler

    out = io.StringIO()
    handler = LoopBufferedHandler(out)
    handler.setFormatter(JsonFormatter())
    long_way: list[str] = []
    real_log = logging.Logger._log

    def spy(self: logging.Logger, *args: Any, **kwargs: Any) -> None:
        long_way.append(self.name)
        real_log(self, *args, **kwargs)

    monkeypatch.setattr(logging.Logger, "_log", spy)
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        bid = new_backup_id()
        local_harness.put(location_for("org_c1", bid))
        assert (await delete(local_gateway, bid)).status == 200
        # the handler writes a loop iteration's lines together, at the end of it
        await eventually(lambda: '"gateway.audit"' in out.getvalue(), "the audit line")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    by_logger = {line["logger"]: line for line in lines}
    record = logging.LogRecord(
        "gateway.audit", logging.INFO, __file__, 1, "backup delete", (), None
    )
    record.fields = {k: v for k, v in by_logger["gateway.audit"].items() if k not in BASE_KEYS}
    expected = json.loads(JsonFormatter().format(record))
    assert list(by_logger["gateway.audit"]) == list(expected)
    assert {k: v for k, v in by_logger["gateway.audit"].items() if k != "ts"} == {
        k: v for k, v in expected.items() if k != "ts"
    }
    assert by_logger["gateway.audit"]["outcome"] == "backup deleted"
    access = by_logger["gateway.access"]
    assert list(access)[: len(BASE_KEYS)] == list(BASE_KEYS)
    assert access["status"] == 200 and access["pid"] == os.getpid()
    assert access["level"] == "info" and access["msg"] == "request"


BASE_KEYS = ("ts", "level", "logger", "pid", "msg")


def test_json_log_lines_on_stdout(tmp_path: Path) -> None:
    from gateway.config import LoggingConfig
    from gateway.telemetry.logs import JsonFormatter

    record = logging.LogRecord(
        "gateway.audit", logging.INFO, __file__, 1, "backup delete", (), None
    )
    record.fields = {"system_id": "sys_c1"}
    line = json.loads(JsonFormatter().format(record))
    assert line["msg"] == "backup delete" and line["system_id"] == "sys_c1"
    assert line["level"] == "info" and "ts" in line and "pid" in line
    assert LoggingConfig().format == "json"


# ---- readiness


async def test_readiness_flips_with_s3_and_back(
    start_gateway: StartGateway, proxied_harness: Any, proxy: FaultProxy
) -> None:
    _, storage = proxied_harness
    client = await start_gateway(storage)
    assert (await client.get("/readyz")).status == 200
    proxy.faults.drop = True
    resp = await client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body == {
        "code": 503,
        "message": "not ready",
        "data": {"checks": {"directory": "ok", "storage": "unavailable"}},
    }
    assert (await client.get("/healthz")).status == 200  # alive all along
    proxy.reset()
    assert (await client.get("/readyz")).status == 200


# ---- limits


async def test_stalled_storage_is_504_at_the_request_deadline(
    start_gateway: StartGateway,
    proxied_harness: Any,
    proxy: FaultProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    harness, storage = proxied_harness
    storage["s3"]["read_timeout_seconds"] = 30
    client = await start_gateway(storage, server={"request_timeout_seconds": 1})
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid))
    # the store's HEAD and its look at the backup's marks (protection, DESIGN.md §11)
    # pass; the DELETE itself never reaches the store, nor does any answer
    await storage_scanned(client)  # the fleet's start-up listing is not among the two
    proxy.faults.swallow_requests_after = proxy.faults.requests + 2
    started = time.monotonic()
    with caplog.at_level(logging.INFO):
        resp = await delete(client, bid)
    assert resp.status == 504
    # The store was asked: the gateway cannot know what the store did with the request,
    # so it never says "failed" (here the stalled store had applied nothing).
    assert await resp.json() == {"code": 504, "message": "delete outcome unknown", "data": {}}
    # the request deadline (1 s) answered it, not the read timeout (30 s)
    assert 1 - 0.1 <= time.monotonic() - started < 1 + 5
    assert harness.exists(location_for("org_c1", bid))
    audit = [fields_of(r) for r in caplog.records if r.name == "gateway.audit"]
    assert audit[-1]["outcome"] == "delete outcome unknown" and audit[-1]["decision"] == "allow"


async def test_saturation_is_503_with_retry_after(
    start_gateway: StartGateway, proxied_harness: Any, proxy: FaultProxy
) -> None:
    harness, storage = proxied_harness
    client = await start_gateway(
        storage,
        limits={"max_concurrent_storage_operations": 2, "storage_queue_timeout_seconds": 0.2},
    )
    ids = [new_backup_id() for _ in range(6)]
    for bid in ids:
        harness.put(location_for("org_c1", bid))
    proxy.faults.delay = 0.6
    responses = await asyncio.gather(*(delete(client, bid) for bid in ids))
    statuses = [r.status for r in responses]
    assert statuses.count(200) >= 2
    assert statuses.count(503) >= 1
    for bid, resp in zip(ids, responses, strict=True):
        if resp.status == 503:
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["message"] == "storage busy, retry later"
            assert harness.exists(location_for("org_c1", bid))
        else:
            assert not harness.exists(location_for("org_c1", bid))


# ---- graceful shutdown and workers (real processes)


async def test_sigterm_lets_an_in_flight_delete_finish(
    tmp_path: Path, proxied_harness: Any, proxy: FaultProxy
) -> None:
    harness, storage = proxied_harness
    port = free_port()
    config = write_config(tmp_path, port, storage, server={"shutdown_grace_seconds": 10})
    proc = serve_gateway(config)
    try:
        await asyncio.to_thread(wait_for_port, port, 20.0, proc)
        bid = new_backup_id()
        harness.put(location_for("org_c1", bid))
        proxy.faults.delay = 0.5  # each storage round trip now takes half a second
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(
                session.delete(
                    f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}",
                    headers=bearer(token_for("org_c1")),
                )
            )
            # in flight: the gateway has asked the store (each answer takes 0.5 s)
            # (its HEAD: the start-up sweep's listings go through the proxy too)
            await eventually(
                lambda: proxy.faults.by_method[b"HEAD"] >= 1, "the delete at the store"
            )
            proc.send_signal(signal.SIGTERM)
            resp = await pending
            assert resp.status == 200
        code = await asyncio.to_thread(proc.wait, 30)
        assert code == 0
        assert not harness.exists(location_for("org_c1", bid))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def test_two_workers_share_one_port(tmp_path: Path) -> None:
    port = free_port()
    storage = {"backend": "local", "local": {"root": str(tmp_path / "backups")}}
    config = write_config(tmp_path, port, storage)
    proc = serve_gateway(config, "--workers", "2")
    output = OutputWatcher(proc)
    try:
        output.wait_for(lambda rs: len(_listening(rs)) == 2)  # both workers bound
        import urllib.request

        for _ in range(100):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = output.wait_closed()
    assert proc.returncode == 0, out
    records = output.records()
    listening = _listening(records)
    serving = {r["pid"] for r in records if r.get("route") == "/healthz"}
    assert len(listening) == 2
    assert len(serving) == 2, "the kernel spread 100 connections over both workers"


def _workers_of(pid: int) -> set[int]:
    """The worker processes (spawned by multiprocessing) directly under `pid`."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended since the list was read
        for child in children:
            try:
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except (FileNotFoundError, ProcessLookupError):
                continue  # gone (a killed worker being reaped) since the list was read
            if b"spawn_main" in cmdline:
                found.add(int(child))
    return found


def _listening(records: list[dict[str, Any]]) -> set[int]:
    return {r["pid"] for r in records if r["msg"].startswith("listening on")}


def _wait_for_workers(proc: subprocess.Popen[str], count: int, without: int = 0) -> set[int]:
    """Wait until `proc` has `count` worker processes, none of them `without` (a poll of
    /proc: there is no event to wait on)."""

    def workers() -> set[int]:
        assert proc.poll() is None, proc.returncode
        now = _workers_of(proc.pid)
        return now if len(now) == count and without not in now else set()

    return wait_until(workers, f"{count} workers of {proc.pid}, {without} not among them")


def test_a_killed_worker_is_logged_and_replaced(tmp_path: Path) -> None:
    port = free_port()
    storage = {"backend": "local", "local": {"root": str(tmp_path / "backups")}}
    config = write_config(tmp_path, port, storage)
    proc = serve_gateway(config, "--workers", "2")
    output = OutputWatcher(proc)
    try:
        before = output.wait_for(lambda rs: len(_listening(rs)) == 2 and _listening(rs))
        assert before == _workers_of(proc.pid)
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        after = _wait_for_workers(proc, 2, without=victim)
        replacement = (after - before).pop()
        output.wait_for(lambda rs: replacement in _listening(rs))
        import urllib.request

        for _ in range(50):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
                assert r.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = output.wait_closed()
    assert proc.returncode == 0, out
    records = output.records()
    replaced = [r for r in records if "starting a new one" in r["msg"]]
    assert len(replaced) == 1 and replaced[0]["level"] == "warning"
    assert replaced[0]["pid"] == proc.pid and replaced[0]["worker_pid"] == victim
    # every worker that ever ran, the replacement included, was one of these
    assert _listening(records) <= before | after


@pytest.mark.parametrize("round_", range(3))
def test_a_stop_during_a_worker_restart_is_a_clean_exit(tmp_path: Path, round_: int) -> None:
    """systemctl stop sends SIGTERM to every process of the service at once. One that reaches
    a replacement worker before its handlers exist must not kill it: the stop is clean."""
    port = free_port()
    storage = {"backend": "local", "local": {"root": str(tmp_path / "backups")}}
    config = write_config(tmp_path, port, storage)
    proc = serve_gateway(config, "--workers", "2", new_session=True)
    output = OutputWatcher(proc)
    try:
        before = output.wait_for(lambda rs: len(_listening(rs)) == 2 and _listening(rs))
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        after = _wait_for_workers(proc, 2, without=victim)
        replacement = (after - before).pop()
        # the replacement exists but is still starting: the whole group is told to stop
        assert replacement not in _listening(output.records())
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    out = output.wait_closed()
    assert proc.returncode == 0, out
    assert "Traceback" not in out, out


def test_gunicorn_app_factory(tmp_path: Path) -> None:
    """The README's gunicorn command, run as written."""
    port = free_port()
    bid = new_backup_id()
    root = tmp_path / "backups"
    LocalHarness(root).put(location_for("org_c1", bid))
    config = write_config(tmp_path, 0, {"backend": "local", "local": {"root": str(root)}})
    gunicorn = Path(sys.executable).parent / "gunicorn"
    proc = subprocess.Popen(
        [
            str(gunicorn),
            "gateway.gunicorn:app",
            "--worker-class",
            "aiohttp.GunicornWebWorker",
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
        ],
        env={**__import__("os").environ, "GATEWAY_CONFIG": str(config)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for_port(port, proc=proc)
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        status, body = http("DELETE", url, token_for("org_c1"))
        assert status == 200
        assert body["message"] == "backup deleted"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert not LocalHarness(root).exists(location_for("org_c1", bid))


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_the_io_process_logs_in_the_gateways_format(tmp_path: Path, log_format: str) -> None:
    """A warning raised inside the local I/O process (a sidecar that cannot be removed: it
    is a directory) reaches the gateway's stdout as one line in the configured format."""
    root = tmp_path / "backups"
    bid = new_backup_id()
    LocalHarness(root).put(location_for("org_c1", bid), sidecar=False)
    (root / (location_for("org_c1", bid).relative_key + ".meta.json")).mkdir()
    port = free_port()
    storage = {"backend": "local", "local": {"root": str(root), "io": "process"}}
    config = write_config(tmp_path, port, storage, logging={"format": log_format})
    proc = serve_gateway(config)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        assert http("DELETE", url, token_for("org_c1"))[0] == 200
        output.wait_for_line("not removed")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = output.wait_closed()
    # (it also warns that the sidecar read as defaults: a delete looks at it first)
    lines = [line for line in out.splitlines() if "not removed" in line and "local-io" in line]
    assert len(lines) == 1, out
    if log_format == "json":
        record = json.loads(lines[0])
        assert record["level"] == "warning" and record["process"] == "local-io"
        assert record["logger"] == "storage_backends.local.fs"
    else:
        assert " WARNING storage_backends.local.fs [local-io] sidecar of " in lines[0]
