"""The directory file: loaded and validated at start-up; a broken one stops the server."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.directory import DirectoryError, parse_directory

from .support import DIRECTORY, SECRET


def broken(mutate: Any) -> dict[str, Any]:
    data = copy.deepcopy(DIRECTORY)
    mutate(data)
    return data


CASES = [
    (
        "duplicate organization id",
        lambda d: d["organizations"].append(
            {"id": "org_c1", "role": "customer", "parent": "org_r1"}
        ),
        "organization org_c1: duplicate id",
    ),
    (
        "duplicate system id",
        lambda d: d["systems"].append({"id": "sys_c1", "organization_id": "org_c1"}),
        "system sys_c1: duplicate id",
    ),
    (
        "shared system key",
        lambda d: d["systems"].append(
            {"id": "sys_x", "system_key": "KEY-C1", "organization_id": "org_c2"}
        ),
        "system sys_x: system_key also used by sys_c1",
    ),
    (
        "unknown parent",
        lambda d: d["organizations"].append(
            {"id": "org_x", "role": "customer", "parent": "org_no"}
        ),
        "organization org_x: parent 'org_no' is not defined",
    ),
    (
        "cycle",
        lambda d: d["organizations"].extend(
            [
                {"id": "org_a", "role": "reseller", "parent": "org_b"},
                {"id": "org_b", "role": "reseller", "parent": "org_a"},
            ]
        ),
        "parent chain has a cycle",
    ),
    (
        "self parent",
        lambda d: d["organizations"].append({"id": "org_s", "role": "reseller", "parent": "org_s"}),
        "organization org_s: parent chain has a cycle",
    ),
    (
        "customer parent of reseller",
        lambda d: d["organizations"].append(
            {"id": "org_x", "role": "reseller", "parent": "org_c1"}
        ),
        "organization org_x: a reseller cannot have a customer as parent",
    ),
    (
        "distributor under reseller",
        lambda d: d["organizations"].append(
            {"id": "org_x", "role": "distributor", "parent": "org_r1"}
        ),
        "a distributor cannot have a reseller as parent",
    ),
    (
        "owner with parent",
        lambda d: d["organizations"].append(
            {"id": "org_x", "role": "owner", "parent": "org_owner"}
        ),
        "an? owner cannot have",
    ),
    (
        "customer without parent",
        lambda d: d["organizations"].append({"id": "org_x", "role": "customer"}),
        "organization org_x: a customer needs a parent",
    ),
    (
        "unknown role",
        lambda d: d["organizations"].append(
            {"id": "org_x", "role": "admin", "parent": "org_owner"}
        ),
        r"organizations\[\d+\] \(org_x\): role 'admin' is not one of",
    ),
    (
        "traversal in org id",
        lambda d: d["organizations"].append({"id": "..", "role": "customer", "parent": "org_r1"}),
        r"id '\.\.' is not a safe id",
    ),
    (
        "slash in system key",
        lambda d: d["systems"].append(
            {"id": "sys_x", "system_key": "../etc", "organization_id": "org_c1"}
        ),
        r"system_key '\.\./etc' is not a safe id",
    ),
    (
        "NUL in system id",
        lambda d: d["systems"].append({"id": "sys\x00x", "organization_id": "org_c1"}),
        "is not a safe id",
    ),
    (
        "too long id",
        lambda d: d["systems"].append({"id": "s" * 129, "organization_id": "org_c1"}),
        "is not a safe id",
    ),
    (
        "system of unknown organization",
        lambda d: d["systems"].append({"id": "sys_x", "organization_id": "org_nowhere"}),
        "system sys_x: organization 'org_nowhere' is not defined",
    ),
    (
        "deleted as string",
        lambda d: d["organizations"][0].update(deleted="yes"),
        "deleted must be true or false",
    ),
    ("unknown key", lambda d: d["systems"][0].update(sytem_key="typo"), "unknown key 'sytem_key'"),
    # hostile input #6: on a case-insensitive disk these would share a tenant's folder
    (
        "system key differing only in case",
        lambda d: d["systems"].append(
            {"id": "sys_x", "system_key": "key-c1", "organization_id": "org_c2"}
        ),
        "system sys_x: system_key differs from KEY-C1 only in case",
    ),
    (
        "organization id differing only in case",
        lambda d: d["organizations"].append(
            {"id": "ORG_C1", "role": "customer", "parent": "org_r2"}
        ),
        "organization ORG_C1: id differs from org_c1 only in case",
    ),
]


@pytest.mark.parametrize(("name", "mutate", "message"), CASES, ids=[c[0] for c in CASES])
def test_broken_directory_is_refused_naming_the_entry(name: str, mutate: Any, message: str):
    with pytest.raises(DirectoryError, match=message):
        parse_directory(broken(mutate))


def test_valid_directory_loads() -> None:
    directory = parse_directory(DIRECTORY)
    assert {o.id for o in directory.organizations} == {o["id"] for o in DIRECTORY["organizations"]}
    assert next(s for s in directory.systems if s.id == "sys_unregistered").system_key is None


def test_roles_are_case_insensitive_in_the_file() -> None:
    data = broken(lambda d: d["organizations"][1].update(role="Distributor"))
    assert parse_directory(data).organizations[1].role == "distributor"


def test_serve_refuses_to_start_on_a_broken_directory(tmp_path: Path) -> None:
    data = broken(CASES[3][1])
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(data))
    backups = tmp_path / "backups"
    (tmp_path / "config.yaml").write_text(
        f"auth: {{secret: {SECRET}}}\n"
        f"storage: {{backend: local, local: {{root: {backups}}}}}\n"
        "server: {port: 0}\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "organization org_x: parent 'org_no' is not defined" in lines[0]
    assert not backups.exists()
