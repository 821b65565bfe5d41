"""The OpenAPI document is served, valid, names every route the app registers, and every
live response matches it (schemathesis): generated requests against every operation, and the
answers generated requests rarely reach (an appliance's upload, list, restore and refused
delete; a protection; the fleet and orphans; the metrics) asked for on purpose."""

from __future__ import annotations

import base64
import hashlib
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

from gateway.routes import routes

from .support import (
    APPLIANCE_SECRETS,
    DIRECTORY,
    SECRET,
    free_port,
    location_for,
    system_key_of,
    token_for,
    wait_for_port,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
DOCUMENT = Path(__file__).resolve().parent.parent / "docs" / "openapi.yaml"
BASE = "/api"
ROOT_PATHS = ("/healthz", "/readyz", "/metrics")  # outside the base path


def basic(system_id: str) -> str:
    """An appliance's own credentials (HTTP Basic system_key:secret)."""
    org = next(s["organization_id"] for s in DIRECTORY["systems"] if s["id"] == system_id)
    raw = f"{system_key_of(org)}:{APPLIANCE_SECRETS[system_id]}".encode()
    return "Basic " + base64.b64encode(raw).decode()


def is_appliance_route(operation: Any) -> bool:
    return {"appliance": []} in (operation.definition.raw.get("security") or [])


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


def check_operation(strategy: Any, base: str, authorization: str) -> None:
    @given(case=strategy)
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(
            base_url=base, headers={"Authorization": authorization}, checks=CHECKS
        )

    check()


def registered_operations() -> set[str]:
    """Every route the app registers, as the document names it: "METHOD /path" with the
    base path taken off (the document's server URL carries it)."""
    found = set()
    for route in routes(BASE):
        path = route.path if route.path in ROOT_PATHS else route.path.removeprefix(BASE)
        found.add(f"{route.method} {path}")
    return found


def documented_operations() -> set[str]:
    document = yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))
    methods = {"get", "head", "post", "put", "delete", "patch", "options"}
    return {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        for method in item
        if method in methods
    }


def test_every_route_is_in_the_document() -> None:
    registered, documented = registered_operations(), documented_operations()
    assert registered - documented == set(), "routes the document does not describe"
    assert documented - registered == set(), "operations the document describes, not served"


def test_every_response_matches_the_document(live_gateway: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_gateway}/api/openapi.yaml")
    token = f"Bearer {token_for('org_c1')}"
    # a system of its own: generated uploads (and their retention) stay out of sys_c1's
    # folder, which test_the_answers_that_generated_requests_rarely_reach uses
    appliance = basic("sys_c1b")
    tested = []
    for result in schema.get_all_operations():
        assert not isinstance(result, Err), result.err()
        operation = result.ok()
        base = live_gateway + ("" if operation.path in ROOT_PATHS else BASE)
        authorization = appliance if is_appliance_route(operation) else token
        check_operation(operation.as_strategy(), base, authorization)
        tested.append(f"{operation.method.upper()} {operation.path}")
    # schemathesis leaves out the operation it loaded the document from
    assert set(tested) == registered_operations() - {"GET /openapi.yaml"}, tested


def test_the_answers_that_generated_requests_rarely_reach(live_gateway: str) -> None:
    schema = schemathesis.openapi.from_url(f"{live_gateway}/api/openapi.yaml")
    api, root = live_gateway + BASE, live_gateway
    user = {"Authorization": f"Bearer {token_for('org_c1')}"}
    owner = {"Authorization": f"Bearer {token_for('org_owner')}"}
    appliance = {"Authorization": basic("sys_c1")}

    def call(path: str, method: str, status: int, base: str = api, **case: Any) -> Any:
        operation = schema[path][method]
        response = operation.Case(**case).call_and_validate(base_url=base, checks=CHECKS)
        assert response.status_code == status, (method, path, response.text)
        return response

    body = b"a configuration backup\n" * 1000
    digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
    upload: dict[str, Any] = {
        "headers": {
            **appliance,
            "X-Filename": "config-backup.tar.gz",
            "Content-Digest": f"sha-256=:{digest}:",
        },
        "body": body,
        "media_type": "application/octet-stream",
    }
    stored = call("/systems/backups", "POST", 201, **upload).json()["data"]
    again = call("/systems/backups", "POST", 200, **upload).json()
    assert again["message"] == "backup already stored" and again["data"] == stored
    mismatch: dict[str, Any] = {**upload, "body": body + b"!"}
    call("/systems/backups", "POST", 400, **mismatch)
    call("/systems/backups", "POST", 400, **{**upload, "body": b""})

    listed = call("/systems/backups", "GET", 200, headers=appliance).json()["data"]
    assert listed["backups"][0]["id"] == stored["id"]
    own = {"backup_id": stored["id"]}
    whole = call("/systems/backups/{backup_id}", "GET", 200, path_parameters=own, headers=appliance)
    assert whole.content == body and whole.headers["repr-digest"] == [f"sha-256=:{digest}:"]
    part = {**appliance, "Range": "bytes=100-"}
    resumed = call("/systems/backups/{backup_id}", "GET", 206, path_parameters=own, headers=part)
    assert resumed.content == body[100:]
    past = {**appliance, "Range": f"bytes={len(body)}-"}
    call("/systems/backups/{backup_id}", "GET", 416, path_parameters=own, headers=past)
    call("/systems/backups/{backup_id}", "HEAD", 200, path_parameters=own, headers=appliance)
    call("/systems/backups/{backup_id}", "DELETE", 403, path_parameters=own, headers=appliance)

    backup = {"id": "sys_c1", "backup_id": stored["id"]}
    protection = "/systems/{id}/backups/{backup_id}/protection"
    for protected in (True, True, False):  # setting what is set answers 200 too
        call(
            protection,
            "PUT",
            200,
            path_parameters=backup,
            headers=user,
            body={"protected": protected},
            media_type="application/json",
        )
        if protected:
            call(
                "/systems/{id}/backups/{backup_id}",
                "DELETE",
                409,
                path_parameters=backup,
                headers=user,
            )
    call(
        protection,
        "PUT",
        400,
        path_parameters=backup,
        headers=user,
        body={"protected": "yes"},
        media_type="application/json",
    )
    items = call(
        "/systems/{id}/backups", "GET", 200, path_parameters={"id": "sys_c1"}, headers=user
    ).json()["data"]["backups"]
    assert {"protected", "kept_by", "integrity", "verified_at"} <= set(items[0])

    fleet = call("/backups/fleet", "GET", 200, headers=user, query={"limit": 1}).json()["data"]
    assert [s["system_id"] for s in fleet["systems"]] == ["sys_c1"]
    call("/backups/fleet", "GET", 200, headers=owner, query={"state": "never", "limit": 2})
    call("/backups/orphans", "GET", 200, headers=owner)
    call("/backups/orphans", "GET", 403, headers=user)
    call("/metrics", "GET", 200, base=root)


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
    assert yaml.safe_load(DOCUMENT.read_text())["info"] == document["info"]
