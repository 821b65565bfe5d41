"""The one log line format (storage_backends.log_format), in the gateway and in the local I/O
process: what a request sends can never start a line of its own."""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from gateway.telemetry.logs import LoopBufferedHandler
from storage_backends.log_format import TRACE_INDENT, TextFormatter

from .conftest import StartGateway
from .support import (
    LocalHarness,
    OutputWatcher,
    appliance_upload,
    free_port,
    http,
    location_for,
    mounted_tmpfs,
    new_backup_id,
    serve_gateway,
    token_for,
    wait_for_port,
    write_config,
)

# what every text line starts with, the gateway's and the I/O process's alike
TEXT_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z [A-Z]+ [\w.]+ ")
FORGED = "2030-01-01T00:00:00.000Z INFO gateway.audit backup delete outcome=backup deleted"


def _text_gateway(tmp_path: Path) -> tuple[int, LocalHarness, OutputWatcher, object]:
    harness = LocalHarness(tmp_path / "backups")
    port = free_port()
    config = write_config(tmp_path, port, harness.storage(), logging={"format": "text"})
    proc = serve_gateway(config)
    wait_for_port(port, proc=proc)
    return port, harness, OutputWatcher(proc), proc


def test_a_url_cannot_forge_a_text_log_line(tmp_path: Path) -> None:
    """Issue #26, 7: the text a traceback starts with, in a URL, used to end the escaping
    there, and what followed it was written as lines of its own: whole forged audit lines."""
    port, _, output, proc = _text_gateway(tmp_path)
    system_id = "sys_x\nTraceback (most recent call last):\n" + FORGED
    url = f"http://127.0.0.1:{port}/api/systems/{quote(system_id, safe='')}/backups/"
    try:
        status, _ = http("DELETE", url + new_backup_id(), token_for("org_c1"))
        assert status == 404  # audited: the delete reached authorization
        output.wait_for_line("sys_x")
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.wait(timeout=30)  # type: ignore[attr-defined]
    out = output.wait_closed()
    assert all(TEXT_LINE.match(line) for line in out.splitlines()), out
    [audit] = [line for line in out.splitlines() if "sys_x" in line and "gateway.audit" in line]
    assert "system_id=sys_x\\nTraceback (most recent call last):\\n2030-01-01T" in audit


def test_the_io_process_writes_the_gateways_text_layout(tmp_path: Path) -> None:
    """Issue #26, 14: one layout, the I/O process's lines only naming it ([local-io])."""
    port, harness, output, proc = _text_gateway(tmp_path)
    bid = new_backup_id()
    harness.put(location_for("org_c1", bid), sidecar=False)
    # a sidecar that cannot be removed (a directory): the I/O process warns
    (harness.root / (location_for("org_c1", bid).relative_key + ".meta.json")).mkdir()
    try:
        url = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups/{bid}"
        assert http("DELETE", url, token_for("org_c1"))[0] == 200
        output.wait_for_line("not removed")
    finally:
        proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
        proc.wait(timeout=30)  # type: ignore[attr-defined]
    lines = output.wait_closed().splitlines()
    # (it also warns that the sidecar read as defaults: the delete looks at it first)
    [io_line] = [line for line in lines if "[local-io] sidecar of" in line and "removed" in line]
    [gateway_line] = [line for line in lines if "listening on" in line]
    assert TEXT_LINE.match(io_line) and " [local-io] sidecar of " in io_line
    assert TEXT_LINE.match(gateway_line) and " INFO gateway listening on " in gateway_line


def test_a_traceback_keeps_to_indented_lines() -> None:
    """An exception's message may hold request data: no line of its traceback can pass for a
    record of its own."""
    try:
        raise ValueError("bad id x\n" + FORGED)
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord("gateway", logging.ERROR, "", 0, "failed: %s", ("a\nb",), exc_info)
    first, *trace = TextFormatter().format(record).split("\n")
    assert TEXT_LINE.match(first) and first.endswith("failed: a\\nb")
    assert trace and all(line.startswith(TRACE_INDENT) for line in trace)
    assert TRACE_INDENT + FORGED in trace  # there, but indented: never a record


async def test_a_failed_readiness_probe_logs_its_cause(
    start_gateway: StartGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue #26, 14: not only the exception's type."""
    missing = tmp_path / "not-mounted"
    client = await start_gateway({"backend": "local", "local": {"root": str(missing)}})
    resp = await client.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["data"]["checks"]["storage"] == "unavailable"  # no detail here
    [line] = [r.getMessage() for r in caplog.records if "readiness probe" in r.getMessage()]
    assert line.startswith("readiness probe storage failed: StorageUnavailable: ")
    assert len(line) > len("readiness probe storage failed: StorageUnavailable: "), line


def test_a_full_log_disk_fails_no_request_and_is_told_on_stderr(tmp_path: Path) -> None:
    """stdout on a full disk: a log write that failed used to raise into the code that
    logged (a thread's warning became its caller's error) or, on the event loop, the lines
    were dropped without a word. Now every request is answered as before and stderr says,
    once, that lines were not written."""
    harness = LocalHarness(tmp_path / "backups")
    port = free_port()
    config = write_config(tmp_path, port, harness.storage())
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    try:
        wait_for_port(port, proc=proc)
        listing = f"http://127.0.0.1:{port}/api/systems/sys_c1/backups"
        assert http("GET", listing, token_for("org_c1"))[0] == 200
        assert http("GET", listing, "not-a-token")[0] == 401
        status, body = appliance_upload(port, b"a backup on a host whose log disk is full")
        assert status == 201, body
        stored = location_for("org_c1", body["data"]["id"])
        assert harness.exists(stored)
        [listed] = http("GET", listing, token_for("org_c1"))[1]["data"]["backups"]
        assert listed["id"] == body["data"]["id"]
    finally:
        proc.send_signal(signal.SIGTERM)
        _, errors = proc.communicate(timeout=30)
    assert proc.returncode == 0, errors
    # the loss is told once (at most one report a minute), never a traceback a line
    [report] = [line for line in errors.splitlines() if line.startswith("--- logging:")]
    assert "log lines not written" in report and "No space left on device" in report, errors
    assert "Traceback" not in errors, errors


def test_lines_lost_to_a_full_disk_are_counted_when_writing_works_again(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report once a minute would leave the lines lost after it untold if the disk
    never filled again: the first write that works again tells their count."""
    with mounted_tmpfs(tmp_path / "logs", "size=64k") as logs:
        filler = logs / "filler"
        with contextlib.suppress(OSError):
            filler.write_bytes(b"x" * 128 * 1024)  # the disk is full
        with open(logs / "gateway.log", "w", buffering=1) as stream:
            handler = LoopBufferedHandler(stream)
            handler.setFormatter(logging.Formatter("%(message)s"))
            log = logging.getLogger("test.full_disk")
            log.addHandler(handler)
            log.propagate = False
            try:
                for n in range(3):  # off the loop: each a write of its own, each failing
                    log.warning("line %d %s", n, "y" * 8192)
                failed = capsys.readouterr().err
                filler.unlink()  # room again
                log.warning("written")
                recovered = capsys.readouterr().err
            finally:
                log.removeHandler(handler)
        assert failed.count("--- logging:") == 1 and "No space left on device" in failed
        assert "--- logging: 2 log lines not written (writes work again)" in recovered
        assert (logs / "gateway.log").read_text().endswith("written\n")
