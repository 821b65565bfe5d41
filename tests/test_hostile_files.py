"""Hostile config and directory files (issue #26, points 8 and 9), against real processes.

A directory file with one Latin-1 byte or 5,000-deep nesting killed the reload task
silently: nothing logged, the failure metric at 0, /readyz 200, and a later good version
that soft-deleted an organization was never applied. The same bytes in a config or
directory file at start-up were a traceback and exit 1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from gateway.directory import DirectoryUnavailable, FileDirectory

from .support import (
    DIRECTORY,
    LocalHarness,
    OutputWatcher,
    free_port,
    http,
    location_for,
    new_backup_id,
    serve_gateway,
    token_for,
    wait_for_port,
    write_config,
)
from .test_platform import with_org_deleted, write_directory

LATIN_1 = "organizations:\n  - {id: org_caf\xe9, role: owner}\n".encode("latin-1")
DEEP = ("organizations: " + "[" * 5000 + "]" * 5000 + "\n").encode()


def _replace(path: Path, data: bytes) -> None:
    """A new version renamed into place, as an operator's tool writes it."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    os.replace(new, path)


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = [line.split()[-1] for line in text.splitlines() if line.startswith(name + " ")]
    return float(values[0])


def test_the_reload_survives_any_bad_version_and_applies_the_next_good_one(
    tmp_path: Path,
) -> None:
    port = free_port()
    harness = LocalHarness(tmp_path / "backups")
    config = write_config(tmp_path, port, harness.storage(), directory={"reload_seconds": 3600})
    directory = tmp_path / "directory.yaml"
    proc = serve_gateway(config)
    output = OutputWatcher(proc)
    try:
        wait_for_port(port, proc=proc)
        refused = "directory not reloaded, the last good one stays in service"
        for count, bad in enumerate((LATIN_1, DEEP), start=1):
            _replace(directory, bad)
            proc.send_signal(signal.SIGHUP)

            def seen(records: list[dict[str, Any]], n: int = count) -> bool:
                return sum(refused in r["msg"] for r in records) == n

            output.wait_for(seen)
            assert _metric(port, "gateway_directory_reload_failures_total") == count
            assert http("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200
        lines = [r["msg"] for r in output.records() if refused in r["msg"]]
        assert "is not UTF-8: byte 0xe9 at line 2, column 17" in lines[0]
        assert "is nested too deeply (over 64 levels) at line 1, column" in lines[1]
        # the next good version soft-deletes org_c1: its reseller may no longer delete there
        write_directory(directory, with_org_deleted("org_c1"))
        proc.send_signal(signal.SIGHUP)
        output.wait_for(lambda rs: any(r["msg"] == "directory reloaded" for r in rs))
        bid = new_backup_id()
        harness.put(location_for("org_c1", bid))
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        assert http("DELETE", url, token_for("org_r1"))[0] == 403
        assert harness.exists(location_for("org_c1", bid))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    out = output.wait_closed()
    assert proc.returncode == 0, out
    assert "Traceback" not in out


async def test_readiness_reports_a_reload_task_that_is_not_running(tmp_path: Path) -> None:
    path = tmp_path / "directory.yaml"
    write_directory(path, DIRECTORY)
    directory = FileDirectory(path, reload_seconds=3600)
    await directory.start()
    await directory.check_ready()
    task = directory._task
    assert task is not None
    task.cancel()  # however it ended, the gateway must say so
    with pytest.raises(asyncio.CancelledError):
        await task
    with pytest.raises(DirectoryUnavailable, match="reload task is not running"):
        await directory.check_ready()
    await directory.close()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(
    ("which", "data", "message"),
    [
        ("config", b"auth: {secret: caf\xe9}\n", "is not UTF-8: byte 0xe9 at line 1, column 19"),
        (
            "config",
            b"a: " + b"[" * 500 + b"]" * 500,
            "nested too deeply (over 64 levels) at line 1",
        ),
        ("directory", LATIN_1, "is not UTF-8: byte 0xe9 at line 2, column 17"),
        ("directory", DEEP, "nested too deeply (over 64 levels) at line 1, column 79"),
    ],
)
def test_a_hostile_file_at_start_up_is_one_line_and_exit_2(
    tmp_path: Path, which: str, data: bytes, message: str
) -> None:
    config = write_config(tmp_path, free_port(), LocalHarness(tmp_path / "b").storage())
    target = config if which == "config" else tmp_path / "directory.yaml"
    target.write_bytes(data)
    for command in ("check-config", "serve"):
        result = _cli(command, "--config", str(config))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert str(target) in lines[0] and message in lines[0], lines[0]
