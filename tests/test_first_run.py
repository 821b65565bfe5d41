"""The first run, as a new user meets it (issue #27, point 2): `make run`'s two steps on a
busy port, the demo seeded only into a new root, `check-config` on the root and, with
`--probe`, on the servers, `set-secret` on a commented file, `${VAR:-default}` on an
empty variable, the reason a token was refused, and /readyz on an unmarked root."""

from __future__ import annotations

import difflib
import functools
import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from jose import jwt

from .support import (
    OutputWatcher,
    claims_for,
    free_port,
    http,
    serve_gateway,
    stop_process,
    token_for,
    wait_for_port,
    write_config,
)
from .test_config import run_cli as run

REPO = Path(__file__).resolve().parent.parent


def embedded_default(folder: Path, port: int) -> tuple[Path, dict[str, str]]:
    """The repository's own config.yaml and directory.yaml, copied, and the environment
    `make run` gives them (GATEWAY_PORT only)."""
    for name in ("config.yaml", "directory.yaml"):
        shutil.copy(REPO / name, folder / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    env["GATEWAY_PORT"] = str(port)
    return folder / "config.yaml", env


def test_a_busy_port_stops_seed_demo_and_serve_before_anything_is_written(
    tmp_path: Path,
) -> None:
    """A second `make run` beside a running gateway re-seeded its data, then printed a
    traceback from the bind."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, env = embedded_default(tmp_path, port)
        for command in ("seed-demo", "serve"):
            result = run(command, "--config", str(config), env=env)
            assert result.returncode == 2, (command, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1, (command, result.stderr)
            assert f"127.0.0.1:{port} is in use" in lines[0] and "GATEWAY_PORT" in lines[0]
        # a config of one's own is told to change its server.port
        (tmp_path / "own").mkdir()
        own = write_config(tmp_path / "own", port, {"backend": "none"})
        result = run("serve", "--config", str(own))
        assert result.returncode == 2
        assert f"set server.port in {own}" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "directory.yaml", "own"]


def test_seed_demo_fills_only_a_new_root(tmp_path: Path) -> None:
    """`make run` seeds on every start: a demo backup deleted in the live instance came
    back at the next start."""
    config, env = embedded_default(tmp_path, free_port())
    first = run("seed-demo", "--config", str(config), env=env)
    assert first.returncode == 0, first.stderr
    root = tmp_path / "data" / "backups"
    deleted = next(root.rglob("01934fab-bc33-7890-a1b2-c3d4e5f6a7b8.tar.gz"))
    deleted.unlink()
    Path(f"{deleted}.meta.json").unlink()
    again = run("seed-demo", "--config", str(config), env=env)
    assert again.returncode == 0, again.stderr
    assert "in use; no demo backups written" in again.stdout
    assert not deleted.exists()
    # an empty folder made for it is new too
    empty = tmp_path / "fresh"
    empty.mkdir()
    text = config.read_text().replace("root: data/backups", f"root: {empty}")
    config.write_text(text)
    assert run("seed-demo", "--config", str(config), env=env).returncode == 0
    assert any(empty.rglob("*.tar.gz"))


def test_check_config_names_a_missing_or_unmarked_root_and_init_root(tmp_path: Path) -> None:
    """A new, empty or missing root passed check-config and was explained only in the
    server's log."""
    root = tmp_path / "volume"
    config = write_config(tmp_path, 0, {"backend": "local", "local": {"root": str(root)}})
    missing = run("check-config", "--config", str(config))
    assert missing.returncode == 1, missing.stdout
    assert f"{root}): does not exist" in missing.stdout
    assert f"backup-gateway init-root --config {config}" in missing.stdout
    root.mkdir()
    unmarked = run("check-config", "--config", str(config))
    assert unmarked.returncode == 1
    assert "is not marked (is its volume mounted?)" in unmarked.stdout
    assert "init-root" in unmarked.stdout
    assert run("init-root", "--config", str(config)).returncode == 0
    marked = run("check-config", "--config", str(config))
    assert marked.returncode == 0, marked.stdout
    assert f"storage (local root {root}): ok" in marked.stdout


def test_check_config_probe_names_each_failures_cause(tmp_path: Path) -> None:
    """Storage, the database and Redis are contacted only with --probe, and each failure
    says why: the endpoint, the missing file by its path, Redis's own text."""
    nobody = f"127.0.0.1:{free_port()}"
    missing_ca = tmp_path / "no-such" / "root.crt"
    config = write_config(
        tmp_path,
        0,
        {
            "backend": "s3",
            "s3": {
                "bucket": "b",
                "endpoint_url": f"http://{nobody}",
                "access_key_id": "k",
                "secret_access_key": "s",
            },
        },
        directory={
            "kind": "postgres",
            "postgres": {
                "dsn": f"postgresql://ro@{nobody}/platform?sslmode=verify-full"
                f"&sslrootcert={missing_ca}",
                "owner_organization_id": "org_owner",
            },
        },
        redis={"url": f"redis://{nobody}"},
        auth={"revocation": {"enabled": True}},
    )
    offline = run("check-config", "--config", str(config))
    assert (offline.returncode, offline.stdout) == (0, f"{config}: ok\n")
    probed = run("check-config", "--config", str(config), "--probe")
    assert probed.returncode == 1
    lines = dict(line.split(": ", 1) for line in probed.stdout.splitlines()[1:])
    assert f'Could not connect to the endpoint URL: "http://{nobody}/b"' in lines["storage (s3)"]
    assert f"the sslrootcert file {missing_ca}" in lines["directory (postgres)"]
    assert f"connecting to {nobody}" in lines["redis revocation (db 0)"]
    assert probed.stderr == ""  # the causes are the lines, said once


def test_an_empty_variable_takes_the_default_as_in_a_shell(tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path, 0, {"backend": "none"})
    text = config.read_text().replace("port: 0", f"port: ${{FIRST_RUN_PORT:-{port}}}")
    config.write_text(text)
    server = serve_gateway(config, env={"FIRST_RUN_PORT": ""})
    try:
        wait_for_port(port, proc=server)
    finally:
        stop_process(server)


COMMENTED_DIRECTORY = """\
# Our fleet: keep this list in the order of the contracts.
organizations:
    -   id: org_owner
        role: owner
    -   id: org_c1   # the first customer
        role: customer
        parent: org_owner

systems:
    # the firewall at the head office
    -   id: sys_fw
        system_key: "NETH-0000-1111"
        organization_id: org_c1
"""


def test_set_secret_keeps_the_directory_files_comments_and_layout(tmp_path: Path) -> None:
    config = write_config(tmp_path, 0, {"backend": "none"})
    directory = tmp_path / "directory.yaml"
    directory.write_text(COMMENTED_DIRECTORY)
    result = run("set-secret", "--config", str(config), "--system", "sys_fw")
    assert result.returncode == 0, result.stderr
    after = directory.read_text()
    changed = [
        line
        for line in difflib.ndiff(COMMENTED_DIRECTORY.splitlines(), after.splitlines())
        if line[:1] in "+-?"
    ]
    assert [line.split(":")[0] for line in changed] == [
        "+         system_secret_public",
        "+         system_secret_sha256",
    ], "\n".join(changed)
    secret = result.stdout.split("system_secret: ")[1].strip()
    public = yaml.safe_load(after)["systems"][0]["system_secret_public"]
    assert secret.startswith(f"my_{public}.")


def test_the_reason_a_token_was_refused_is_logged_never_answered(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "backups"
    config = write_config(tmp_path, port, {"backend": "local", "local": {"root": str(root)}})
    server = serve_gateway(config)
    output = OutputWatcher(server)
    later = int(time.time()) + 600
    tokens = {
        "expired": token_for("org_c1", ttl=-600),
        "not yet valid": token_for("org_c1", nbf=later),
        "signature": jwt.encode(claims_for("org_c1"), "another-secret-" + "y" * 40),
        "claims": token_for("org_c1", token_type="refresh"),
        "malformed": "garbage",
    }
    try:
        wait_for_port(port, proc=server)
        bodies = set()
        for reason, token in tokens.items():
            request_id = "rq-" + reason.replace(" ", "-")
            bodies.add(refused_body(port, token, request_id))
            record = output.wait_for(functools.partial(refusal_of, request_id=request_id))
            assert record["level"] == "info" and record["reason"] == reason, record
        # one answer for all: no reason, no detail
        assert len(bodies) == 1
        assert json.loads(bodies.pop())["message"] == "invalid token"
    finally:
        stop_process(server)


def refused_body(port: int, token: str, request_id: str) -> bytes:
    """The body of the 401 a listing with `token` answers."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/systems/sys_c1/backups",
        headers={"Authorization": f"Bearer {token}", "X-Request-ID": request_id},
    )
    try:
        urllib.request.urlopen(request, timeout=10)
    except urllib.error.HTTPError as err:
        assert err.code == 401
        return err.read()
    raise AssertionError("a refused token was answered")


def refusal_of(records: list[dict[str, Any]], request_id: str) -> dict[str, Any] | None:
    return next(
        (
            r
            for r in records
            if r["msg"].startswith("token refused") and r.get("request_id") == request_id
        ),
        None,
    )


def test_readyz_names_an_unmarked_root_and_the_command_that_marks_it(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "mount-point"
    root.mkdir()
    config = write_config(tmp_path, port, {"backend": "local", "local": {"root": str(root)}})
    server = serve_gateway(config)
    try:
        wait_for_port(port, proc=server)
        status, body = http("GET", f"http://127.0.0.1:{port}/readyz")
    finally:
        stop_process(server)
    assert status == 503
    assert body["data"]["checks"]["storage"] == "unavailable"
    hint = body["data"]["hints"]["storage"]
    assert "not marked" in hint and "backup-gateway init-root" in hint
    assert str(root) not in json.dumps(body)  # no path to anyone who asks
    assert "directory" not in body["data"]["hints"]
