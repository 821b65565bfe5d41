"""The command line as a user runs it: serve, token, seed-demo; clean stop on SIGTERM/SIGINT."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .support import DIRECTORY, KEEP_EVERYTHING, free_port, http, wait_for_port

REPO = Path(__file__).resolve().parent.parent
CONSOLE_SCRIPT = Path(sys.executable).parent / "backup-gateway"


def write_config(tmp_path: Path, port: int, **extra: Any) -> Path:
    (tmp_path / "directory.yaml").write_text(yaml.safe_dump(DIRECTORY))
    config = {
        "server": {"host": "127.0.0.1", "port": port, **extra.pop("server", {})},
        "auth": {"secret_file": "data/jwt.secret"},
        "storage": {
            "backend": "local",
            "local": {"root": "data/backups"},
            "retention": KEEP_EVERYTHING,  # what a test seeds stays
        },
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60
    )


class Server:
    def __init__(self, config: Path, port: int, *extra: str, program: list[str] | None = None):
        self.port = port
        self.proc = subprocess.Popen(
            [
                *(program or [sys.executable, "-m", "gateway"]),
                "serve",
                "--config",
                str(config),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_port(port, proc=self.proc)

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        self.proc.send_signal(sig)
        out, _ = self.proc.communicate(timeout=30)
        return self.proc.returncode, out


@pytest.mark.parametrize("program", ["module", "console-script"])
def test_serve_token_delete_and_clean_stop(tmp_path: Path, program: str) -> None:
    port = free_port()
    config = write_config(tmp_path, port)
    # token mints with the secret file it creates, 0600; the server reads the same one
    token = cli("token", "--config", str(config), "--org", "org_c1", "--role", "customer")
    assert token.returncode == 0, token.stderr
    secret = tmp_path / "data" / "jwt.secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    seeded = cli("seed-demo", "--config", str(config))
    assert seeded.returncode == 0, seeded.stderr
    system_id, backup_id = next(
        line.split("\t") for line in seeded.stdout.splitlines() if line.startswith("sys_c1\t")
    )
    target = next((tmp_path / "data" / "backups").rglob(backup_id))

    cmd = [str(CONSOLE_SCRIPT)] if program == "console-script" else None
    server = Server(config, port, program=cmd)
    try:
        status, body = http(
            "DELETE",
            f"http://127.0.0.1:{port}/api/systems/{system_id}/backups/{backup_id}",
            token.stdout.strip(),
        )
    finally:
        code, out = server.stop()
    assert status == 200 and body["message"] == "backup deleted"
    assert not target.exists()
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert any(r["msg"] == f"listening on http://127.0.0.1:{port}" for r in lines)
    assert lines[-1]["msg"] == "stopped"


def test_sigint_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    server = Server(write_config(tmp_path, port), port)
    code, _ = server.stop(signal.SIGINT)
    assert code == 0


def test_token_options(tmp_path: Path) -> None:
    from jose import jwt

    config = write_config(
        tmp_path, 0, auth={"secret_file": "data/jwt.secret", "issuer": "iss-x", "audience": "aud-y"}
    )
    result = cli(
        "token",
        "--config",
        str(config),
        "--org",
        "org_r1",
        "--role",
        "reseller",
        "--perm",
        "read:systems",
        "--ttl",
        "120",
    )
    assert result.returncode == 0, result.stderr
    secret = (tmp_path / "data" / "jwt.secret").read_text().strip()
    claims = jwt.decode(
        result.stdout.strip(), secret, algorithms=["HS256"], audience="aud-y", issuer="iss-x"
    )
    assert claims["token_type"] == "access"
    assert claims["exp"] - claims["iat"] == 120
    assert claims["user"]["organization_id"] == "org_r1"
    assert claims["user"]["org_role"] == "reseller"
    assert claims["user"]["org_permissions"] == ["read:systems"]


def test_token_refuses_asymmetric_configs(tmp_path: Path) -> None:
    (tmp_path / "k.pem").write_text("unused")
    config = write_config(tmp_path, 0, auth={"algorithms": ["RS256"], "public_key_file": "k.pem"})
    result = cli("token", "--config", str(config), "--org", "org_c1", "--role", "customer")
    assert result.returncode == 2
    assert "auth" in result.stderr


def test_start_up_never_contacts_storage(tmp_path: Path) -> None:
    port = free_port()
    dead = free_port()
    config = write_config(
        tmp_path,
        port,
        storage={
            "backend": "s3",
            "s3": {
                "bucket": "b",
                "endpoint_url": f"http://127.0.0.1:{dead}",
                "access_key_id": "k",
                "secret_access_key": "s",
            },
        },
    )
    server = Server(config, port)
    try:
        status, body = http("GET", f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and body["data"]["checks"]["storage"] == "unavailable"
        assert http("GET", f"http://127.0.0.1:{port}/healthz")[0] == 200
    finally:
        code, _ = server.stop()
    assert code == 0


def test_readme_quick_start_config_runs_from_a_copy(tmp_path: Path) -> None:
    """The embedded default works from any folder, with no environment variables."""
    for name in ("config.yaml", "directory.yaml"):
        shutil.copy(REPO / name, tmp_path / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    port = free_port()
    env["GATEWAY_PORT"] = str(port)
    seeded = subprocess.run(
        [sys.executable, "-m", "gateway", "seed-demo", "--config", str(tmp_path / "config.yaml")],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert seeded.returncode == 0, seeded.stderr
    assert "sys_123456789\t01934fab-bc33-7890-a1b2-c3d4e5f6a7b8.tar.gz" in seeded.stdout
    assert (
        tmp_path / "data/backups/org_c1/NETH-0000-1111/"
        "01934fab-bc33-7890-a1b2-c3d4e5f6a7b8.tar.gz.meta.json"
    ).exists()


def test_seed_fills_local_storage_for_a_load_test(tmp_path: Path) -> None:
    """`seed`: backups with sidecars in the real layout, a matching directory file, and an ids
    file that spreads over every system, newest first; the gateway then deletes them."""
    port = free_port()
    config = write_config(tmp_path, port)
    ids_file = tmp_path / "ids.txt"
    seeded = cli(
        "seed", "--config", str(config), "--systems", "3", "--backups", "4",
        "--size", "300", "--ids-out", str(ids_file),
    )  # fmt: skip
    assert seeded.returncode == 0, seeded.stderr
    pairs = [line.split(" ") for line in ids_file.read_text().splitlines()]
    assert len(pairs) == 12 and len({bid for _, bid in pairs}) == 12
    assert len({sid for sid, _ in pairs[:3]}) == 3  # each round of ids covers every system
    directory = yaml.safe_load((tmp_path / "directory.yaml").read_text())
    systems = {s["id"]: s for s in directory["systems"]}
    root = tmp_path / "data" / "backups"
    for sid in systems:
        mine = [bid for s, bid in pairs if s == sid]
        assert mine == sorted(mine, reverse=True)  # UUIDv7 order: newest first
    for sid, bid in pairs:
        folder = root / systems[sid]["organization_id"] / systems[sid]["system_key"]
        data = (folder / bid).read_bytes()
        assert len(data) == 300
        sidecar = json.loads((folder / (bid + ".meta.json")).read_text())
        assert sidecar["sha256"] == hashlib.sha256(data).hexdigest()
    assert (root / ".backup-gateway-root").is_file()  # seeded: a root in use
    assert sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")) == 24

    token = cli("token", "--config", str(config), "--org", "org_owner", "--role", "owner")
    assert token.returncode == 0, token.stderr
    server = Server(config, port)
    try:
        sid, bid = pairs[0]
        status, body = http(
            "DELETE",
            f"http://127.0.0.1:{port}/api/systems/{sid}/backups/{bid}",
            token.stdout.strip(),
        )
    finally:
        server.stop()
    assert status == 200 and body["data"] == {"system_id": sid, "backup_id": bid}
    assert not list(root.rglob(bid + "*"))
    assert sum(1 for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")) == 22


def test_check_config_reports_whether_the_database_and_redis_answer(
    tmp_path: Path, platform_db: Any, redis_server: Any
) -> None:
    def config_with(dsn: str, redis_url: str) -> Path:
        return write_config(
            tmp_path,
            0,
            directory={
                "kind": "postgres",
                "postgres": {"dsn": dsn, "owner_organization_id": "org_owner"},
            },
            redis={"url": redis_url},
            auth={"secret_file": "data/jwt.secret", "revocation": {"enabled": True}},
            storage={"backend": "none"},  # the database and Redis only
        )

    answered = cli(
        "check-config", "--probe", "--config", str(config_with(platform_db.dsn, redis_server.url))
    )
    assert answered.returncode == 0, answered.stderr
    assert "directory (postgres): answers" in answered.stdout
    assert "redis revocation (db 0): answers" in answered.stdout
    nobody = f"127.0.0.1:{free_port()}"
    silent = cli(
        "check-config",
        "--probe",
        "--config",
        str(config_with(f"postgresql://gateway_ro@{nobody}/platform", f"redis://{nobody}")),
    )
    assert silent.returncode == 1
    assert "directory (postgres): does not answer" in silent.stdout
    assert "redis revocation (db 0): does not answer" in silent.stdout


def test_an_uncreatable_secret_file_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """Hostile input 13: a secret_file whose folder cannot be made gave a traceback, exit 1."""
    (tmp_path / "a-file").write_text("not a folder")
    config = write_config(tmp_path, 0, auth={"secret_file": "a-file/jwt.secret"})
    result = cli("check-config", "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "auth.secret_file: cannot create" in result.stderr


def test_a_case_sensitive_root_is_served(tmp_path: Path) -> None:
    from storage_backends import StorageConfig, refused_at_start
    from storage_backends.local import LocalConfig

    root = tmp_path / "backups"
    root.mkdir()
    config = StorageConfig(backend="local", local=LocalConfig(root=root))
    assert refused_at_start(config) is None
    assert list(root.iterdir()) == []  # the probe leaves nothing behind


def test_a_root_that_folds_case_is_refused_with_one_line_and_exit_2(tmp_path: Path) -> None:
    """Needs a case-insensitive filesystem: a casefolded tmpfs (Linux >= 6.13 with
    CONFIG_UNICODE, as root). Where the machine has none, skipped with the reason."""
    from .support import mounted_tmpfs

    with mounted_tmpfs(tmp_path / "folding", "casefold,size=4m") as mount:
        root = mount / "backups"
        root.mkdir()
        if subprocess.run(["chattr", "+F", str(root)], check=False).returncode != 0:
            pytest.skip("this tmpfs does not fold case")
        config = write_config(
            tmp_path, 0, storage={"backend": "local", "local": {"root": str(root)}}
        )
        result = cli("check-config", "--config", str(config))
        assert result.returncode == 2
        assert result.stderr.strip().count("\n") == 0
        assert "storage.local.root" in result.stderr and "case-insensitively" in result.stderr
