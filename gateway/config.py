"""The gateway's configuration: frozen dataclasses whose fields are the config file's keys."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from aiohttp import web

from storage_backends import StorageConfig

from .config_loader import ConfigError, build, interpolate

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
MIN_SECRET_BYTES = 32


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/api"
    # aiohttp's parser answers a plain 400 beyond these (DESIGN.md §2)
    max_line_size: int = 8190
    max_field_size: int = 16384
    # a request that takes longer is answered 504 in the envelope
    request_timeout_seconds: float = 30.0
    # on SIGTERM, in-flight requests get this long to finish
    shutdown_grace_seconds: float = 10.0
    workers: int = 1
    # a connection's first request head must be complete this soon, or it is aborted
    request_head_timeout_seconds: float = 5.0
    # an idle keep-alive connection (or one part-way through its next head) is closed after
    keepalive_timeout_seconds: float = 15.0
    # connections open at once per process; beyond it new ones are reset at accept
    max_connections: int = 4096


@dataclass(frozen=True)
class AuthConfig:
    algorithms: tuple[str, ...] = ("HS256",)
    secret: str | None = field(default=None, repr=False)
    secret_file: Path | None = None
    public_key_file: Path | None = None
    issuer: str | None = None
    audience: str | None = None
    leeway_seconds: int = 30
    # verified tokens are remembered by hash until they expire, saving a signature check
    cache_size: int = 4096

    @property
    def is_hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True)
class DirectoryConfig:
    kind: Literal["file"] = "file"
    path: Path = Path("directory.yaml")


@dataclass(frozen=True)
class LoggingConfig:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["json", "text"] = "json"
    access_log: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    bearer_token: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LimitsConfig:
    # storage operations in flight per process; beyond it requests wait, then get a 503
    max_concurrent_storage_operations: int = 256
    storage_queue_timeout_seconds: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)


CONFIG = web.AppKey("config", Config)


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate, type and validate a config file. Raises ConfigError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError("", f"{path} is not valid YAML{where}") from None
    return config_from_mapping(raw, path.resolve().parent, environ)


def config_from_mapping(
    raw: object, base_dir: Path, environ: Mapping[str, str] | None = None
) -> Config:
    data = interpolate(raw, os.environ if environ is None else environ)
    config = build(Config, data, base_dir)
    validate(config)
    return config


def validate(config: Config) -> None:
    server, auth, storage = config.server, config.auth, config.storage
    if not 0 <= server.port <= 65535:
        raise ConfigError("server.port", f"must be between 0 and 65535, got {server.port}")
    if not server.base_path.startswith("/") or (
        server.base_path != "/" and server.base_path.endswith("/")
    ):
        raise ConfigError("server.base_path", "must start with / and not end with /")
    if server.workers < 1:
        raise ConfigError("server.workers", "must be at least 1")
    for name in (
        "request_timeout_seconds",
        "shutdown_grace_seconds",
        "request_head_timeout_seconds",
        "keepalive_timeout_seconds",
    ):
        if not 0 < getattr(server, name) < math.inf:
            raise ConfigError(f"server.{name}", "must be a positive, finite number")
    if server.max_connections < 1:
        raise ConfigError("server.max_connections", "must be at least 1")

    if not auth.algorithms:
        raise ConfigError("auth.algorithms", "must list at least one algorithm")
    for alg in auth.algorithms:
        if alg not in HMAC_ALGORITHMS | ASYMMETRIC_ALGORITHMS:
            raise ConfigError("auth.algorithms", f"unsupported algorithm {alg!r}")
    families = {alg in HMAC_ALGORITHMS for alg in auth.algorithms}
    if len(families) > 1:
        raise ConfigError("auth.algorithms", "mixes HMAC and public-key algorithms")
    if auth.is_hmac:
        if auth.public_key_file is not None:
            raise ConfigError("auth.public_key_file", "not used with HMAC algorithms")
        if (auth.secret is None) == (auth.secret_file is None):
            raise ConfigError("auth.secret", "set exactly one of secret and secret_file")
        if auth.secret is not None and len(auth.secret.encode()) < MIN_SECRET_BYTES:
            raise ConfigError("auth.secret", f"must be at least {MIN_SECRET_BYTES} bytes")
    else:
        if auth.public_key_file is None:
            raise ConfigError("auth.public_key_file", "required for public-key algorithms")
        if auth.secret is not None or auth.secret_file is not None:
            raise ConfigError("auth.secret", "not used with public-key algorithms")
    if auth.leeway_seconds < 0:
        raise ConfigError("auth.leeway_seconds", "must not be negative")

    if storage.operation_timeout_seconds <= 0:
        raise ConfigError("storage.operation_timeout_seconds", "must be positive")
    if storage.backend == "s3":
        s3 = storage.s3
        if not s3.bucket:
            raise ConfigError("storage.s3.bucket", "required when storage.backend is s3")
        if s3.max_attempts < 1:
            raise ConfigError("storage.s3.max_attempts", "must be at least 1")
        if bool(s3.access_key_id) != bool(s3.secret_access_key):
            raise ConfigError(
                "storage.s3.access_key_id",
                "set both access_key_id and secret_access_key, or neither",
            )
    if storage.backend == "local" and storage.local.threads < 1:
        raise ConfigError("storage.local.threads", "must be at least 1")
    if config.limits.max_concurrent_storage_operations < 1:
        raise ConfigError("limits.max_concurrent_storage_operations", "must be at least 1")
