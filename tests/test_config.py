"""Config loading: interpolation, types, strict keys, one-line errors, exit status 2."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.config import config_from_mapping, load_config
from gateway.config_loader import ConfigError

from .support import SECRET

BASE: dict[str, Any] = {"auth": {"secret": SECRET}}


def load(raw: dict[str, Any], env: dict[str, str] | None = None, base: Path = Path("/etc/gw")):
    return config_from_mapping({**BASE, **raw}, base, environ=env or {})


def test_interpolation_converts_to_the_field_type() -> None:
    config = load(
        {
            "server": {"port": "${PORT:-8080}", "host": "${HOST}"},
            "storage": {"operation_timeout_seconds": "${T}"},
            "metrics": {"enabled": "${M:-false}"},
        },
        env={"HOST": "0.0.0.0", "T": "2.5"},
    )
    assert config.server.port == 8080
    assert config.server.host == "0.0.0.0"
    assert config.storage.operation_timeout_seconds == 2.5
    assert config.metrics.enabled is False


def test_environment_wins_over_default_and_dollar_dollar_is_literal() -> None:
    config = load(
        {"server": {"port": "${PORT:-8080}"}, "storage": {"s3": {"prefix": "a$$b-${P}"}}},
        env={"PORT": "9999", "P": "x"},
    )
    assert config.server.port == 9999
    assert config.storage.s3.prefix == "a$b-x"


def test_unset_variable_without_default_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="server.host: environment variable GW_HOST is not set"):
        load({"server": {"host": "${GW_HOST}"}})


def test_empty_default_means_unset_for_optional_values() -> None:
    config = load({"redis": {"url": "${REDIS_URL:-}"}})
    assert config.redis.url is None


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"metrics": {"bearer_token": "${SCRAPE_TOKEN:-}"}}, "metrics.bearer_token"),
        ({"metrics": {"bearer_token": ""}}, "metrics.bearer_token"),
        ({"auth": {"audience": "${AUD:-}"}}, "auth.audience"),
        ({"auth": {"issuer": ""}}, "auth.issuer"),
    ],
)
def test_an_empty_security_setting_is_an_error_not_a_check_switched_off(
    raw: dict[str, Any], field: str
) -> None:
    """Hostile input 12: AUD="" once stopped the audience check, an empty scrape token made
    /metrics public."""
    with pytest.raises(ConfigError, match=f"{field}: is empty"):
        load(raw)


@pytest.mark.parametrize(
    "value", ["${GATEWAY_JWT_SECRET", "$GATEWAY_JWT_SECRET", "pre$fix", "${}", "${1X}", "$"]
)
def test_a_dollar_that_starts_no_reference_is_an_error(value: str) -> None:
    """Hostile input 5: `${GATEWAY_JWT_SECRET` without its brace became the signing key."""
    with pytest.raises(ConfigError, match=r"auth.secret: a \$ that starts no"):
        load({"auth": {"secret": value}})


def test_double_dollar_is_still_a_literal_dollar() -> None:
    assert load({"auth": {"secret": "$$" + "s" * 40}}).auth.secret == "$" + "s" * 40


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"server": {"port": "http"}}, "server.port: expected an integer, got string 'http'"),
        ({"server": {"port": True}}, "server.port: expected a number"),
        ({"server": {"prot": 1}}, "server.prot: unknown key"),
        ({"sever": {}}, "sever: unknown key"),
        ({"server": {"port": 70000}}, "server.port: must be between 0 and 65535"),
        ({"server": {"base_path": "api"}}, "server.base_path: must be / or /segment"),
        # a route variable in the base path passed check-config and then crashed serve
        ({"server": {"base_path": "/api/{id}"}}, "server.base_path: must be / or /segment"),
        ({"server": {"base_path": "/api/"}}, "server.base_path: must be / or /segment"),
        ({"storage": {"download": {"ttl_seconds": 901}}}, "storage.download.ttl_seconds"),
        ({"server": {"public_url": "https://x.example/"}}, "server.public_url"),
        ({"server": {"public_url": "javascript:alert(1)"}}, "server.public_url"),
        ({"server": {"keepalive_timeout_seconds": float("nan")}}, "server.keepalive_timeout"),
        # hostile input 13
        ({"storage": {"operation_timeout_seconds": float("nan")}}, "must be a finite number"),
        ({"storage": {"operation_timeout_seconds": float("inf")}}, "must be a finite number"),
        ({"limits": {"storage_queue_timeout_seconds": -1}}, "storage_queue_timeout_seconds"),
        ({"server": {"max_field_size": 0}}, "server.max_field_size: must be at least 1024"),
        ({"storage": {"backend": "ftp"}}, "storage.backend: must be one of local | s3 | none"),
        ({"storage": {"backend": "s3"}}, "storage.s3.bucket: required when storage.backend is s3"),
        ({"storage": {"s3": {"addressing_style": "sideways"}}}, "storage.s3.addressing_style"),
        ({"storage": {"local": "data"}}, "storage.local: expected a mapping"),
        ({"auth": {"secret": "short"}}, "auth.secret: must be at least 32 bytes"),
        ({"auth": {"secret": SECRET, "secret_file": "x"}}, "auth.secret: set exactly one"),
        ({"auth": {"secret": None}}, "auth.secret: set exactly one"),
        ({"auth": {"algorithms": ["none"], "secret": SECRET}}, "unsupported algorithm 'none'"),
        ({"auth": {"algorithms": ["HS256", "ES256"], "secret": SECRET}}, "mixes HMAC"),
        ({"auth": {"algorithms": ["RS256"], "secret": None}}, "auth.public_key_file: required"),
        ({"auth": {"algorithms": [], "secret": SECRET}}, "auth.algorithms: must list"),
        ({"auth": {"algorithms": "HS256", "secret": SECRET}}, "auth.algorithms: expected a list"),
        ({"logging": {"level": "LOUD"}}, "logging.level: must be one of"),
        # hostile input, round 3: a leeway of 10^12 s accepted a token ten years expired
        ({"auth": {"secret": SECRET, "leeway_seconds": 10**12}}, "auth.leeway_seconds: must be"),
        ({"auth": {"secret": SECRET, "leeway_seconds": 301}}, "auth.leeway_seconds: must be"),
        ({"server": {"trusted_proxies": ["lb.example"]}}, "server.trusted_proxies:"),
    ],
)
def test_bad_values_are_named(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(raw)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text(f"auth: {{secret: {SECRET}}}\n")
    config = load_config(tmp_path / "c.yaml", environ={})
    assert config.directory.path == tmp_path / "directory.yaml"
    assert config.storage.local.root == tmp_path / "data/backups"


def test_secrets_stay_out_of_repr() -> None:
    config = load(
        {
            "storage": {"s3": {"access_key_id": "AKIA1", "secret_access_key": "SSSS"}},
            "metrics": {"bearer_token": "scrape-secret"},
        }
    )
    text = repr(config)
    assert SECRET not in text and "SSSS" not in text and "AKIA1" not in text
    assert "scrape-secret" not in text


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {port: abc}\n", "server.port: expected an integer"),
        ("server: [1]\n", "server: expected a mapping"),
        ("server: {port: 1\n", "is not valid YAML"),
        ("storage: {backend: s3}\n", "storage.s3.bucket"),
        ("mystery: 1\n", "mystery: unknown key"),
    ],
)
def test_check_config_exits_2_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(f"auth: {{secret: {SECRET}}}\n" + text)
    for command in ("check-config", "serve"):
        result = run_cli(command, "--config", str(path))
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_check_config_accepts_the_embedded_default(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parent.parent
    for name in ("config.yaml", "directory.yaml"):
        shutil.copy(repo / name, tmp_path / name)
    config = str(tmp_path / "config.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    # a new checkout has no backup root yet: said, with the command that makes one
    fresh = run_cli("check-config", "--config", config, env=env)
    assert fresh.returncode == 1 and "init-root" in fresh.stdout, fresh.stdout
    assert run_cli("init-root", "--config", config, env=env).returncode == 0
    result = run_cli("check-config", "--config", config, env=env)
    assert result.returncode == 0, result.stdout + result.stderr


def test_deeply_nested_yaml_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    from gateway.config import load_config

    path = tmp_path / "config.yaml"
    path.write_text("a: " + "[" * 20000 + "]" * 20000)
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path)
