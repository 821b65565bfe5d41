"""The OpenAPI document is served, valid, and every live response matches it (schemathesis)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from .support import DIRECTORY, SECRET, free_port, location_for, token_for, wait_for_port

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def live_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real server in its own process, local storage holding the demo-like tree."""
    tmp = tmp_path_factory.mktemp("openapi")
    (tmp / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
    port = free_port()
    (tmp / "config.yaml").write_text(
        yaml.safe_dump(
            {
                "server": {"host": "127.0.0.1", "port": port},
                "auth": {"secret": SECRET},
                "storage": {"backend": "local", "local": {"root": str(tmp / "backups")}},
                "logging": {"level": "WARNING"},
            }
        )
    )
    for i in range(3):
        path = (
            tmp
            / "backups"
            / location_for("org_c1", f"01934fab-bc33-7890-a1b2-c3d4e5f6a7b{i}").relative_key
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(tmp / "config.yaml")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port(port, proc=proc)
    yield f"http://127.0.0.1:{port}"
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def check_operation(strategy: Any, base: str, token: str) -> None:
    @given(case=strategy)
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(
            base_url=base, headers={"Authorization": f"Bearer {token}"}, checks=CHECKS
        )

    check()


def test_every_response_matches_the_document(live_gateway: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_gateway}/api/openapi.yaml")
    token = token_for("org_c1")
    tested = []
    for result in schema.get_all_operations():
        assert not isinstance(result, Err), result.err()
        operation = result.ok()
        base = live_gateway + ("" if operation.path in ("/healthz", "/readyz") else "/api")

        check_operation(operation.as_strategy(), base, token)
        tested.append(f"{operation.method.upper()} {operation.path}")
    assert {
        "DELETE /systems/{id}/backups/{backup_id}",
        "DELETE /systems/{id}/backups/{backup_id}/download",
        "GET /systems/{id}/backups",
        "GET /systems/{id}/backups/{backup_id}/download",
        "POST /systems/backups",
        "GET /backups/content/{link}",
        "HEAD /backups/content/{link}",
        "GET /healthz",
        "GET /readyz",
    } <= set(tested), tested


def test_document_is_served_with_the_deployment_base_path(live_gateway: str) -> None:
    import urllib.request

    with urllib.request.urlopen(f"{live_gateway}/api/openapi.yaml", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("application/yaml")
        document = yaml.safe_load(resp.read())
    assert document["servers"] == [{"url": "/api"}]
    assert set(document["paths"]) >= {
        "/systems/{id}/backups/{backup_id}",
        "/systems/{id}/backups/{backup_id}/download",
    }
    source = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
    assert yaml.safe_load(source.read_text())["info"] == document["info"]
