"""DESIGN.md §2 to the letter: the order of checks, statuses, messages and the envelope."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.directory import Directory, Organization, System

from .support import (
    LocalHarness,
    bearer,
    location_for,
    new_backup_id,
    token_for,
)

PATHS = ["/api/systems/{sid}/backups/{bid}", "/api/systems/{sid}/backups/{bid}/download"]


async def delete(client: TestClient, sid: str, bid: str, token: str | None, path: str = PATHS[0]):
    headers = bearer(token) if token is not None else {}
    resp = await client.delete(path.format(sid=sid, bid=bid), headers=headers)
    return resp, await resp.json()


def assert_envelope(body: dict[str, Any], status: int, message: str, data: Any = None) -> None:
    assert body["code"] == status
    assert body["message"] == message
    assert body["data"] == ({} if data is None else data)


@pytest.mark.parametrize("path", PATHS)
async def test_delete_answers_200_and_removes_data_and_sidecar(
    local_gateway: TestClient, local_harness: LocalHarness, path: str
) -> None:
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    local_harness.put(loc)
    neighbour = location_for("org_c1", new_backup_id())
    local_harness.put(neighbour)

    resp, body = await delete(local_gateway, "sys_c1", bid, token_for("org_c1"), path)

    assert resp.status == 200
    assert_envelope(body, 200, "backup deleted", {"system_id": "sys_c1", "backup_id": bid})
    assert local_harness.keys() == {
        neighbour.relative_key,
        neighbour.relative_key + ".meta.json",
    }


async def test_ids_are_lower_cased_before_use(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id(".TAR.GZ").upper()
    loc = location_for("org_c1", bid.lower())
    local_harness.put(loc)
    resp, body = await delete(local_gateway, "sys_c1", bid, token_for("org_c1"))
    assert resp.status == 200
    assert body["data"]["backup_id"] == bid.lower()
    assert not local_harness.exists(loc)


# ---- step 1: authentication


async def test_missing_token_is_401_with_bearer_challenge(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp, body = await delete(local_gateway, "sys_c1", bid, None)
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    assert_envelope(body, 401, "invalid token")
    assert local_harness.exists(location_for("org_c1", bid))


async def test_auth_comes_before_id_validation(local_gateway: TestClient) -> None:
    resp, body = await delete(local_gateway, "sys_c1", "not-an-id", None)
    assert resp.status == 401
    assert_envelope(body, 401, "invalid token")


# ---- step 2: permission


@pytest.mark.parametrize(
    "permissions", [[], ["read:systems"], ["MANAGE:SYSTEMS"], ["manage:system"]]
)
async def test_without_manage_systems_is_403(
    local_gateway: TestClient, local_harness: LocalHarness, permissions: list[str]
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    token = token_for("org_c1", permissions=permissions)
    resp, body = await delete(local_gateway, "sys_c1", bid, token)
    assert resp.status == 403
    assert_envelope(body, 403, "insufficient permissions")
    assert local_harness.exists(location_for("org_c1", bid))


async def test_manage_systems_in_user_permissions_is_enough(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    from jose import jwt

    from .support import SECRET, claims_for

    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    claims = claims_for("org_c1", permissions=[])
    claims["user"]["user_permissions"] = ["manage:systems"]
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    resp, _ = await delete(local_gateway, "sys_c1", bid, token)
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", bid))


async def test_permission_comes_before_id_validation(local_gateway: TestClient) -> None:
    resp, body = await delete(local_gateway, "sys_c1", "bad", token_for("org_c1", permissions=[]))
    assert resp.status == 403
    assert_envelope(body, 403, "insufficient permissions")


# ---- step 3: id validation


async def test_bad_id_is_400_before_directory(local_gateway: TestClient) -> None:
    resp, body = await delete(local_gateway, "sys_no_such", "nope.zip", token_for("org_c1"))
    assert resp.status == 400
    assert_envelope(
        body,
        400,
        "validation failed",
        {
            "type": "validation_error",
            "errors": [{"key": "backup_id", "message": "invalid_format", "value": "nope.zip"}],
        },
    )


async def test_rejected_value_is_echoed_cut_to_256(local_gateway: TestClient) -> None:
    long_id = "a" * 2000
    resp, body = await delete(local_gateway, "sys_c1", long_id, token_for("org_c1"))
    assert resp.status == 400
    assert body["data"]["errors"][0]["value"] == "a" * 256


# ---- step 4: system and hierarchy


@pytest.mark.parametrize("system_id", ["sys_no_such", "sys_deleted"])
async def test_unknown_or_deleted_system_is_404(
    local_gateway: TestClient, local_harness: LocalHarness, system_id: str
) -> None:
    bid = new_backup_id()
    local_harness.put_key(f"org_c1/KEY-DELETED/{bid}")
    resp, body = await delete(local_gateway, system_id, bid, token_for("org_owner"))
    assert resp.status == 404
    assert_envelope(body, 404, "system not found")
    assert f"org_c1/KEY-DELETED/{bid}" in local_harness.keys()


async def test_other_tenant_is_403(local_gateway: TestClient, local_harness: LocalHarness) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c2", bid))
    resp, body = await delete(local_gateway, "sys_c2", bid, token_for("org_c1"))
    assert resp.status == 403
    assert_envelope(body, 403, "access denied to system")
    assert local_harness.exists(location_for("org_c2", bid))


@pytest.mark.parametrize("backend", ["local", "none"])
async def test_unregistered_system_is_backup_not_found_whatever_the_backend(
    start_gateway: Any, local_harness: LocalHarness, backend: str
) -> None:
    storage = local_harness.storage() if backend == "local" else {"backend": "none"}
    client = await start_gateway(storage)
    resp, body = await delete(client, "sys_unregistered", new_backup_id(), token_for("org_c1"))
    assert resp.status == 404
    assert_envelope(body, 404, "backup not found")


# ---- step 5: storage not configured


async def test_none_backend_is_503_after_every_other_check(
    start_gateway: Any, local_harness: LocalHarness
) -> None:
    client = await start_gateway({"backend": "none"})
    bid = new_backup_id()
    resp, body = await delete(client, "sys_c1", bid, token_for("org_c1"))
    assert resp.status == 503
    assert_envelope(body, 503, "backup storage not configured")
    # ... but each earlier check still wins
    assert (await delete(client, "sys_c1", bid, None))[0].status == 401
    assert (await delete(client, "sys_c1", bid, token_for("org_c1", permissions=[])))[
        0
    ].status == 403
    assert (await delete(client, "sys_c1", "x", token_for("org_c1")))[0].status == 400
    assert (await delete(client, "sys_nope", bid, token_for("org_c1")))[0].status == 404
    assert (await delete(client, "sys_c2", bid, token_for("org_c1")))[0].status == 403


# ---- step 6: absent object, and storage failure


async def test_absent_backup_is_404(local_gateway: TestClient, local_harness: LocalHarness) -> None:
    other = location_for("org_c1", new_backup_id())
    local_harness.put(other)
    resp, body = await delete(local_gateway, "sys_c1", new_backup_id(), token_for("org_c1"))
    assert resp.status == 404
    assert_envelope(body, 404, "backup not found")
    assert local_harness.exists(other)


async def test_missing_local_root_is_502_without_internals(
    start_gateway: Any, tmp_path: Any
) -> None:
    root = tmp_path / "secret-mount-point"
    client = await start_gateway({"backend": "local", "local": {"root": str(root)}})
    resp, body = await delete(client, "sys_c1", new_backup_id(), token_for("org_c1"))
    assert resp.status == 502
    assert_envelope(
        body, 502, "failed to delete backup", {"type": "external_api_error", "errors": []}
    )
    assert "secret-mount-point" not in await resp.text()
    assert not root.exists()


# ---- routing and the envelope everywhere


async def test_unknown_route_is_404_envelope_without_auth(local_gateway: TestClient) -> None:
    resp = await local_gateway.get("/api/nothing/here")
    assert resp.status == 404
    assert "WWW-Authenticate" not in resp.headers
    assert_envelope(await resp.json(), 404, "not found")


async def test_wrong_method_is_405_envelope_with_allow(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    resp = await local_gateway.post(f"/api/systems/sys_c1/backups/{bid}")
    assert resp.status == 405
    assert resp.headers["Allow"] == "DELETE"
    assert "WWW-Authenticate" not in resp.headers
    assert_envelope(await resp.json(), 405, "method not allowed")
    assert local_harness.exists(location_for("org_c1", bid))


class ExplodingDirectory(Directory):
    async def system(self, system_id: str) -> System | None:
        raise RuntimeError("directory exploded with internal detail /etc/shadow")

    async def organization(self, organization_id: str) -> Organization | None:
        raise RuntimeError("boom")

    async def system_by_key(self, system_key: str) -> System | None:
        raise RuntimeError("boom")


async def test_unexpected_error_is_logged_500_envelope(
    aiohttp_client: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import create_app

    from .support import make_config

    client = await aiohttp_client(create_app(make_config(tmp_path), directory=ExplodingDirectory()))
    with caplog.at_level(logging.ERROR):
        resp = await client.delete(
            f"/api/systems/sys_c1/backups/{new_backup_id()}", headers=bearer(token_for("org_c1"))
        )
    assert resp.status == 500
    assert_envelope(await resp.json(), 500, "internal server error")
    assert "shadow" not in await resp.text()
    assert any("directory exploded" in (r.exc_text or "") for r in caplog.records)


# ---- request id


@pytest.mark.parametrize(
    ("incoming", "echoed"),
    [("abc-123_X.y", True), ("a" * 128, True), ("a" * 129, False), ("bad id!", False), ("", False)],
)
async def test_request_id_is_echoed_when_well_formed(
    local_gateway: TestClient, incoming: str, echoed: bool
) -> None:
    resp = await local_gateway.get("/nope", headers={"X-Request-ID": incoming})
    got = resp.headers["X-Request-ID"]
    if echoed:
        assert got == incoming
    else:
        assert got != incoming and 1 <= len(got) <= 128


async def test_every_response_carries_a_request_id(local_gateway: TestClient) -> None:
    for resp in [
        await local_gateway.get("/healthz"),
        await local_gateway.delete(f"/api/systems/sys_c1/backups/{new_backup_id()}"),
        await local_gateway.put("/api/systems/sys_c1/backups/x"),
    ]:
        assert resp.headers.get("X-Request-ID")


async def test_header_beyond_parser_limit_keeps_aiohttp_plain_400(
    local_gateway: TestClient,
) -> None:
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{new_backup_id()}",
        headers={"Authorization": "Bearer " + "a" * 20000},
    )
    assert resp.status == 400
    assert resp.content_type != "application/json"
