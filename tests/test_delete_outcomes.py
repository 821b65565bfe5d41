"""A delete that happened is never reported as failed (issue: hostile input round 2, #3).

A real gateway process on a disk whose folder fsyncs are slow (the `faults`
sitecustomize on its PYTHONPATH: every directory fsync sleeps first, in the gateway and in
its local I/O process): once a backup is unlinked, the request waits for its fsync and
answers 200, or, past its deadline, 504 `delete outcome unknown` — audited as such, and a
retry reads 404. Of concurrent deletes of one backup, the one that unlinked reports it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .support import (
    FAULTS,
    LocalHarness,
    free_port,
    http,
    location_for,
    new_backup_id,
    serve_gateway,
    token_for,
    wait_for_port,
    wait_until,
    write_config,
)


def _slow_gateway(
    tmp_path: Path, io: str, fsync_delay: float, request_timeout: float
) -> tuple[Any, int, LocalHarness]:
    harness = LocalHarness(tmp_path / "backups", io=io)
    port = free_port()
    storage = {**harness.storage(), "operation_timeout_seconds": 1}
    config = write_config(
        tmp_path, port, storage, server={"request_timeout_seconds": request_timeout}
    )
    env = {
        "GATEWAY_TEST_FSYNC_DELAY": str(fsync_delay),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(FAULTS), os.environ.get("PYTHONPATH")])),
    }
    proc = serve_gateway(config, env=env)
    wait_for_port(port, proc=proc)
    # ready: its local I/O process answers (a loaded machine may still be starting it, and
    # a delete sent meanwhile would spend its operation timeout waiting)
    ready = f"http://127.0.0.1:{port}/readyz"
    wait_until(lambda: http("GET", ready)[0] == 200, "the gateway ready")
    return proc, port, harness


def _stop(proc: Any) -> list[dict[str, Any]]:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


@pytest.mark.parametrize("io", ["process", "inline"])
def test_a_delete_slower_than_the_operation_timeout_is_200_not_502(tmp_path: Path, io: str) -> None:
    proc, port, harness = _slow_gateway(tmp_path, io, fsync_delay=1.5, request_timeout=10)
    try:
        bid = new_backup_id()
        harness.put(location_for("org_c1", bid))
        started = time.monotonic()
        status, body = http(
            "DELETE",
            f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}",
            token_for("org_c1"),
        )
        assert (status, body["message"]) == (200, "backup deleted")
        assert time.monotonic() - started >= 1.4  # it waited for the (slow) fsync
        assert not harness.exists(location_for("org_c1", bid))
    finally:
        _stop(proc)


@pytest.mark.parametrize("io", ["process", "inline"])
def test_of_concurrent_deletes_the_one_that_unlinked_reports_it(tmp_path: Path, io: str) -> None:
    proc, port, harness = _slow_gateway(tmp_path, io, fsync_delay=1.2, request_timeout=10)
    try:
        bid = new_backup_id()
        harness.put(location_for("org_c1", bid))
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        token = token_for("org_c1")
        with ThreadPoolExecutor(20) as pool:
            statuses = sorted(
                s for s, _ in pool.map(lambda _: http("DELETE", url, token), range(20))
            )
        assert statuses == [200] + [404] * 19
        assert not harness.exists(location_for("org_c1", bid))
    finally:
        _stop(proc)


@pytest.mark.parametrize("io", ["process", "inline"])
def test_past_the_deadline_the_outcome_is_unknown_never_failed(tmp_path: Path, io: str) -> None:
    proc, port, harness = _slow_gateway(tmp_path, io, fsync_delay=3, request_timeout=1)
    bid = new_backup_id()
    try:
        harness.put(location_for("org_c1", bid))
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        status, body = http("DELETE", url, token_for("org_c1"))
        assert (status, body) == (
            504,
            {"code": 504, "message": "delete outcome unknown", "data": {}},
        )
        assert not harness.exists(location_for("org_c1", bid))
        status, body = http("DELETE", url, token_for("org_c1"))  # a retry
        assert (status, body["message"]) == (404, "backup not found")
    finally:
        records = _stop(proc)
    audits = [r for r in records if r["msg"] == "backup delete" and r.get("backup_id") == bid]
    assert [a["outcome"] for a in audits] == ["delete outcome unknown", "backup not found"]
