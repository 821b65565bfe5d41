"""The hierarchy table of DESIGN.md §3 in full: every caller against every system.

Every test here runs over each directory: the YAML file and the platform's PostgreSQL,
holding the same organizations and systems; one authorization module decides for both.
"""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .conftest import StartGateway
from .support import (
    ORG_IDS,
    LocalHarness,
    bearer,
    location_for,
    new_backup_id,
    system_id_of,
    token_for,
)


@pytest.fixture
async def local_gateway(
    start_gateway: StartGateway, local_harness: LocalHarness, directory_section: dict[str, Any]
) -> TestClient:
    return await start_gateway(local_harness.storage(), directory=directory_section)


# Written from the table, by hand: which systems' owners each caller may act on.
ALLOWED: dict[str, set[str]] = {
    # owner: any organization, soft-deleted ones included
    "org_owner": set(ORG_IDS),
    # distributor: itself, resellers it created, customers it or its (live) resellers created
    "org_d1": {"org_d1", "org_r1", "org_c1", "org_c1b", "org_c_d1"},
    "org_d2": {"org_d2", "org_r2", "org_c2"},
    # reseller: itself and customers it created
    "org_r1": {"org_r1", "org_c1", "org_c1b"},
    "org_r2": {"org_r2", "org_c2"},
    "org_r_owner": {"org_r_owner"},
    # customer: itself only, even when its reseller or distributor was soft-deleted
    "org_c1": {"org_c1"},
    "org_c1b": {"org_c1b"},
    "org_c_d1": {"org_c_d1"},
    "org_c2": {"org_c2"},
    "org_c_orphan": {"org_c_orphan"},
    "org_c_owner": {"org_c_owner"},
    "org_c_under_d_gone": {"org_c_under_d_gone"},
    # a soft-deleted caller organization acts on nothing
    "org_d_gone": set(),
    "org_r_gone": set(),
    "org_c_gone": set(),
}


@pytest.mark.parametrize("caller", ORG_IDS)
async def test_caller_against_every_system(
    local_gateway: TestClient, local_harness: LocalHarness, caller: str
) -> None:
    token = token_for(caller)
    for target in ORG_IDS:
        bid = new_backup_id()
        loc = location_for(target, bid)
        local_harness.put(loc)
        resp = await local_gateway.delete(
            f"/api/systems/{system_id_of(target)}/backups/{bid}", headers=bearer(token)
        )
        allowed = target in ALLOWED[caller]
        body = await resp.json()
        assert resp.status == (200 if allowed else 403), (caller, target, body)
        if not allowed:
            assert body["message"] == "access denied to system"
        assert local_harness.exists(loc) == (not allowed), (caller, target)


@pytest.mark.parametrize(
    ("caller", "claimed_role"),
    [
        ("org_c1", "owner"),  # forged role claim
        ("org_c1", "reseller"),
        ("org_r1", "distributor"),
        ("org_d1", "owner"),
        ("org_owner", "customer"),  # stale claim: directory says owner
        ("org_c1", "admin"),
        ("org_c1", "superuser"),
        ("org_unknown", "owner"),  # caller organization not in the directory
    ],
)
async def test_role_claim_must_match_the_directory(
    local_gateway: TestClient, local_harness: LocalHarness, caller: str, claimed_role: str
) -> None:
    bid = new_backup_id()
    loc = location_for("org_c1", bid)
    local_harness.put(loc)
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{bid}", headers=bearer(token_for(caller, claimed_role))
    )
    assert resp.status == 403
    assert (await resp.json())["message"] == "access denied to system"
    assert local_harness.exists(loc)


@pytest.mark.parametrize("spelling", ["customer", "CUSTOMER", "Customer", "cUsToMeR"])
async def test_role_is_compared_case_insensitively(
    local_gateway: TestClient, local_harness: LocalHarness, spelling: str
) -> None:
    bid = new_backup_id()
    local_harness.put(location_for("org_c1", bid))
    from jose import jwt

    from .support import SECRET, claims_for

    claims = claims_for("org_c1")
    claims["user"]["org_role"] = spelling
    resp = await local_gateway.delete(
        f"/api/systems/sys_c1/backups/{bid}",
        headers=bearer(jwt.encode(claims, SECRET, algorithm="HS256")),
    )
    assert resp.status == 200
    assert not local_harness.exists(location_for("org_c1", bid))


def test_table_covers_every_caller() -> None:
    assert set(ALLOWED) == set(ORG_IDS)
