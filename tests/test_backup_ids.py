"""Backup ids: only the UUIDv7 grammar reaches storage; everything else is a 400."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import TestClient
from yarl import URL

from storage_backends.ids import normalize_backup_id

from .support import LocalHarness, bearer, location_for, token_for

GOOD = "01934fab-bc33-7890-a1b2-c3d4e5f6a7b8"

VALID = [GOOD] + [GOOD + s for s in (".tar.gz", ".tar.xz", ".tar.bz2", ".tar.zst", ".gpg", ".bin")]
INVALID = [
    GOOD + ".zip",
    GOOD + ".tar",
    GOOD + ".tar.gz.meta.json",
    GOOD + ".gpg.bin",
    GOOD + ".",
    GOOD[:-1],
    GOOD + "0",
    "01934fab-bc33-4890-a1b2-c3d4e5f6a7b8",  # UUIDv4
    "01934fab-bc33-7890-c1b2-c3d4e5f6a7b8",  # wrong variant
    "01934fabbc337890a1b2c3d4e5f6a7b8",
    "{01934fab-bc33-7890-a1b2-c3d4e5f6a7b8}",
    " " + GOOD,
    GOOD + "\n",
    GOOD + "\x00",
    GOOD + "\x00.tar.gz",
    "../" + GOOD,
    "..",
    ".",
    GOOD + "/../x",
    "０１934fab-bc33-7890-a1b2-c3d4e5f6a7b8",  # fullwidth digits
    "01934fab‐bc33-7890-a1b2-c3d4e5f6a7b8",  # unicode hyphen
    "x" * 5000,
]


@pytest.mark.parametrize("value", VALID)
def test_grammar_accepts(value: str) -> None:
    assert normalize_backup_id(value) == value
    assert normalize_backup_id(value.upper()) == value


@pytest.mark.parametrize("value", INVALID)
def test_grammar_refuses(value: str) -> None:
    assert normalize_backup_id(value) is None


# Raw request paths, percent-encoding included: never a 500, never a deletion.
HOSTILE_PATHS = [
    f"/api/systems/sys_c1/backups/..%2F..%2F{GOOD}",
    f"/api/systems/sys_c1/backups/{GOOD}%2F..%2F..%2Fx",
    f"/api/systems/sys_c1/backups/%2e%2e%2f{GOOD}",
    f"/api/systems/sys_c1/backups/{GOOD}%00",
    f"/api/systems/sys_c1/backups/{GOOD}%00.tar.gz",
    f"/api/systems/sys_c1/backups/{GOOD}%252F",
    f"/api/systems/sys_c1/backups/{GOOD}%5C..",
    "/api/systems/sys_c1/backups/%2e%2e",
    f"/api/systems/sys_c1/backups/{GOOD}.tar.gz%2Fdownload",
    f"/api/systems/sys_c1/backups/{GOOD}%20",
    f"/api/systems/sys_c1/backups/{'%41' * 300}",
]


@pytest.mark.parametrize("path", HOSTILE_PATHS)
async def test_hostile_paths_delete_nothing(
    local_gateway: TestClient, local_harness: LocalHarness, path: str
) -> None:
    loc = location_for("org_c1", GOOD)
    local_harness.put(loc)
    local_harness.put(location_for("org_c1", GOOD + ".tar.gz"))
    before = local_harness.keys()
    resp = await local_gateway.delete(URL(path, encoded=True), headers=bearer(token_for("org_c1")))
    assert resp.status in (400, 404), await resp.text()
    body = await resp.json()
    assert body["code"] == resp.status
    if resp.status == 400:
        assert body["data"]["errors"][0]["key"] == "backup_id"
    assert local_harness.keys() == before


async def test_traversal_through_system_id_deletes_nothing(
    local_gateway: TestClient, local_harness: LocalHarness
) -> None:
    local_harness.put(location_for("org_c1", GOOD))
    before = local_harness.keys()
    for sid in ["..%2Fsys_c1", "sys_c1%00", "%2e%2e", "sys_c1%2F..%2Fsys_c2"]:
        resp = await local_gateway.delete(
            URL(f"/api/systems/{sid}/backups/{GOOD}", encoded=True),
            headers=bearer(token_for("org_owner")),
        )
        assert resp.status == 404
        assert (await resp.json())["message"] in ("system not found", "not found")
    assert local_harness.keys() == before
