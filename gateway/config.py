"""The gateway's configuration: frozen dataclasses whose fields are the config file's keys."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from aiohttp import web

from storage_backends import StorageConfig

from .config_loader import ConfigError, YamlFileError, build, interpolate, read_yaml_file

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"}
)
MIN_SECRET_BYTES = 32
# a clock-skew allowance, not a grace period: beyond five minutes an expired token lives on
MAX_LEEWAY_SECONDS = 300


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    base_path: str = "/api"
    # e.g. https://backups.example.com: makes local download links absolute. The only
    # source of a link's host: never the request's Host header.
    public_url: str = ""
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
    # load balancers whose X-Forwarded-For names the client (addresses or networks);
    # from any other peer the header is ignored
    trusted_proxies: tuple[str, ...] = ()
    # without Redis, the workers of this host share their limits (upload rate, failed
    # logins, reservations) through a file here; made 0700 when missing
    state_dir: Path = Path("data")


@dataclass(frozen=True)
class RevocationConfig:
    """The platform's token blacklists in Redis (DESIGN.md §7)."""

    enabled: bool = False
    db: int = 0
    # how stale a "not revoked" answer may be
    cache_seconds: float = 1.0
    # deny: 503 while Redis cannot answer; allow: let the token through
    on_error: Literal["deny", "allow"] = "deny"


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
    revocation: RevocationConfig = field(default_factory=RevocationConfig)

    @property
    def is_hmac(self) -> bool:
        return self.algorithms[0] in HMAC_ALGORITHMS


@dataclass(frozen=True)
class PostgresDirectoryConfig:
    # the platform's database; a read-only role is enough (the gateway never writes)
    dsn: str | None = field(default=None, repr=False)
    # the Owner organization is in no table: its logto_id
    owner_organization_id: str | None = None
    # the most an answer may lag the database
    cache_seconds: float = 5.0
    # connections per gateway process, readiness probes included
    pool_size: int = 4
    statement_timeout_seconds: float = 2.0
    # how often the names that differ only in case are looked for (a scan of the tables)
    case_scan_seconds: float = 60.0


@dataclass(frozen=True)
class DirectoryConfig:
    kind: Literal["file", "postgres"] = "file"
    path: Path = Path("directory.yaml")
    # file: how often a change is looked for (SIGHUP: at once)
    reload_seconds: float = 2.0
    postgres: PostgresDirectoryConfig = field(default_factory=PostgresDirectoryConfig)


@dataclass(frozen=True)
class RedisConfig:
    # the platform's Redis; empty: no Redis feature
    url: str | None = field(default=None, repr=False)


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
    # a listing returns at most this many backups, newest first, with truncated: true
    max_list_items: int = 1000


@dataclass(frozen=True)
class UsageCounterConfig:
    """Drop the platform's per-organization usage counter in Redis after a change (§7)."""

    enabled: bool = False
    db: int = 1


@dataclass(frozen=True)
class DownloadConfig:
    # download URLs (S3) and links (local disk) are valid this long; at most 900
    ttl_seconds: int = 300
    # the local links' HMAC key (not the token secret), created 0600 on first run
    link_secret_file: Path = Path("data/link.secret")
    # a local download gets request_timeout_seconds plus its size at this rate, then is cut
    min_rate_bytes_per_second: int = 65536
    # local downloads served at once per process, each holding an open backup file (a
    # descriptor beside its connection's); beyond it a 503 with Retry-After. The connection
    # cap is kept below the open-files limit minus these.
    max_open_backups: int = 256
    # of those, at most this many for one organization: one that never reads cannot hold
    # every other tenant's downloads off
    max_open_backups_per_organization: int = 32


@dataclass(frozen=True)
class RetentionConfig:
    """Uploads (DESIGN.md §9): limits refused before the body, and what retention keeps
    (§11). 0 = no limit; a keep rule at 0 is off, and with all four off nothing is pruned."""

    max_upload_bytes: int = 2 * 1024**3
    # the newest N backups; the newest of each of the newest N UTC days, ISO weeks, months
    keep_last: int = 3
    keep_daily: int = 7
    keep_weekly: int = 4
    keep_monthly: int = 6
    # the backups kept (with a new one) may never exceed it: an upload is refused instead
    max_bytes_per_system: int = 500 * 1024**2
    max_protected_per_system: int = 5
    max_bytes_per_organization: int = 100 * 1024**3
    uploads_per_minute: int = 6
    uploads_per_hour: int = 60
    # the Redis DB of the platform's rate keys and retention locks (redis.url set)
    redis_db: int = 1
    # a body must arrive within request_timeout_seconds plus its size at this rate
    min_rate_bytes_per_second: int = 65536
    # failed appliance logins per client address and system key, a minute, before a 429
    failed_logins_per_minute: int = 20
    # every system's backups are pruned this often too (and at start-up), catching up on
    # prunes that failed or were skipped after an upload
    sweep_seconds: float = 3600.0
    # one pruning run (after an upload, or one system's in a sweep) stops after this long;
    # what is left is pruned by the next run
    prune_seconds: float = 60.0
    # the platform lets appliances delete their backups; a stolen credential then can too
    appliance_can_delete: bool = False
    require_digest: bool = False
    # an upload whose digest equals a backup stored this recently is not stored again
    duplicate_window_seconds: float = 600.0


@dataclass(frozen=True)
class VerifyConfig:
    """The verifier (DESIGN.md §12): every backup re-read and its sha256 compared."""

    enabled: bool = False
    # every backup is re-read at least this often (fractions allowed)
    interval_days: float = 30.0
    # each backup counts as at least 1 MiB of it (its open, lock and state write)
    max_bytes_per_second: int = 20 * 1024 * 1024


@dataclass(frozen=True)
class StorageSection(StorageConfig):
    """The `storage:` section: the backend's own settings (`storage_backends.StorageConfig`,
    all `create_store` reads) and the gateway's settings about backups, which no backend
    reads: download links, uploads and retention, the platform's usage counter."""

    usage_counter: UsageCounterConfig = field(default_factory=UsageCounterConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)


@dataclass(frozen=True)
class FleetConfig:
    """The fleet's index of storage (DESIGN.md §13)."""

    # storage is scanned at start-up and this often (uploads, deletes and prunes of this
    # process update the index between scans)
    scan_seconds: float = 600.0
    # a system whose newest backup is older than this is stale
    stale_after_hours: float = 36.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    storage: StorageSection = field(default_factory=StorageSection)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)


CONFIG = web.AppKey("config", Config)


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, interpolate, type and validate a config file. Raises ConfigError."""
    path = Path(path)
    try:
        raw = read_yaml_file(path)
    except OSError as exc:
        raise ConfigError("", f"cannot read config file {path}: {exc.strerror}") from None
    except YamlFileError as exc:
        raise ConfigError("", str(exc)) from None
    return config_from_mapping(raw, path.resolve().parent, environ)


def config_from_mapping(
    raw: object, base_dir: Path, environ: Mapping[str, str] | None = None
) -> Config:
    data = interpolate(raw, os.environ if environ is None else environ)
    _refuse_replaced_keys(data)
    config = build(Config, data, base_dir)
    validate(config)
    return config


# Keys of an earlier contract whose meaning changed: named with what replaced them.
_REPLACED = {
    ("storage", "retention", "max_backups_per_system"): (
        "replaced by keep_last (with keep_daily, keep_weekly and keep_monthly): retention "
        "now keeps history instead of pruning the oldest"
    ),
}


def _refuse_replaced_keys(data: object) -> None:
    for path, why in _REPLACED.items():
        node = data
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and path[-1] in node:
            raise ConfigError(".".join(path), why)


def validate(config: Config) -> None:
    server, auth, storage = config.server, config.auth, config.storage
    if not 0 <= server.port <= 65535:
        raise ConfigError("server.port", f"must be between 0 and 65535, got {server.port}")
    if server.base_path != "/" and not re.fullmatch(r"(/[A-Za-z0-9._~-]+)+", server.base_path):
        # no braces (route variables), no trailing slash, nothing to escape
        raise ConfigError(
            "server.base_path", "must be / or /segment[/segment...] of A-Z a-z 0-9 . _ ~ -"
        )
    for name in ("max_line_size", "max_field_size"):
        if getattr(server, name) < 1024:
            # 0 made every request a 400
            raise ConfigError(f"server.{name}", "must be at least 1024")
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
    if not 0 <= auth.leeway_seconds <= MAX_LEEWAY_SECONDS:
        raise ConfigError(
            "auth.leeway_seconds", f"must be between 0 and {MAX_LEEWAY_SECONDS} seconds"
        )
    try:
        for entry in server.trusted_proxies:
            ipaddress.ip_network(entry.strip(), strict=False)
    except ValueError as exc:
        raise ConfigError("server.trusted_proxies", str(exc)) from None

    _validate_platform(config)

    if server.public_url:
        url = server.public_url
        if not re.fullmatch(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/-]*)?", url):
            raise ConfigError("server.public_url", "must be http(s)://host[:port][/path]")
        if url.endswith("/"):
            raise ConfigError("server.public_url", "must not end with /")
    download = storage.download
    if not 1 <= download.ttl_seconds <= 900:
        raise ConfigError("storage.download.ttl_seconds", "must be between 1 and 900")
    if download.min_rate_bytes_per_second < 1:
        raise ConfigError("storage.download.min_rate_bytes_per_second", "must be at least 1")
    if download.max_open_backups < 1:
        raise ConfigError("storage.download.max_open_backups", "must be at least 1")
    if not 1 <= download.max_open_backups_per_organization <= download.max_open_backups:
        raise ConfigError(
            "storage.download.max_open_backups_per_organization",
            "must be between 1 and storage.download.max_open_backups",
        )
    for name in ("scan_seconds", "stale_after_hours"):
        value = getattr(config.fleet, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"fleet.{name}", "must be a positive, finite number")
    if config.limits.max_list_items < 1:
        raise ConfigError("limits.max_list_items", "must be at least 1")

    if storage.operation_timeout_seconds <= 0:
        raise ConfigError("storage.operation_timeout_seconds", "must be positive")
    if config.limits.storage_queue_timeout_seconds <= 0:
        raise ConfigError("limits.storage_queue_timeout_seconds", "must be positive")
    for name in ("connect_timeout_seconds", "read_timeout_seconds"):
        if getattr(storage.s3, name) <= 0:
            raise ConfigError(f"storage.s3.{name}", "must be positive")
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
        if s3.object_lock and s3.versioning == "off":
            # Object Lock buckets are versioned: a plain DeleteObject there only hides a held
            # backup behind a delete marker, so the hold would not stop a delete
            raise ConfigError("storage.s3.versioning", "cannot be off with storage.s3.object_lock")
    _validate_uploads(config)
    if storage.backend == "s3" and server.workers > 1 and not config.redis.url:
        # workers share a local disk's folder locks, never a bucket's: one pruner per system
        # across processes needs Redis's lock (DESIGN.md §11)
        raise ConfigError(
            "server.workers", "above 1 with the s3 backend needs redis.url (the retention lock)"
        )
    if storage.backend == "local" and storage.local.threads < 1:
        raise ConfigError("storage.local.threads", "must be at least 1")
    if config.limits.max_concurrent_storage_operations < 1:
        raise ConfigError("limits.max_concurrent_storage_operations", "must be at least 1")


S3_SINGLE_REQUEST_MAX = 5 * 1024**3  # one PUT, one CopyObject, one part
S3_PART_MIN = 5 * 1024**2


def _validate_uploads(config: Config) -> None:
    retention, s3 = config.storage.retention, config.storage.s3
    for name in (
        "max_upload_bytes",
        "keep_last",
        "keep_daily",
        "keep_weekly",
        "keep_monthly",
        "max_bytes_per_system",
        "max_protected_per_system",
        "max_bytes_per_organization",
        "uploads_per_minute",
        "uploads_per_hour",
        "failed_logins_per_minute",
        "redis_db",
    ):
        if getattr(retention, name) < 0:
            raise ConfigError(f"storage.retention.{name}", "must not be negative (0 = no limit)")
    if retention.min_rate_bytes_per_second < 1:
        raise ConfigError("storage.retention.min_rate_bytes_per_second", "must be at least 1")
    verify = config.storage.verify
    if not math.isfinite(verify.interval_days) or verify.interval_days <= 0:
        raise ConfigError("storage.verify.interval_days", "must be a positive, finite number")
    if verify.max_bytes_per_second < 1:
        raise ConfigError("storage.verify.max_bytes_per_second", "must be at least 1")
    for name in ("sweep_seconds", "prune_seconds"):
        value = getattr(retention, name)
        if not math.isfinite(value) or value <= 0:
            raise ConfigError(f"storage.retention.{name}", "must be a positive, finite number")
    if not math.isfinite(retention.duplicate_window_seconds) or (
        retention.duplicate_window_seconds < 0
    ):
        raise ConfigError(
            "storage.retention.duplicate_window_seconds", "must be a finite number >= 0"
        )
    if config.storage.backend != "s3":
        return
    # an upload is staged, then copied into place with its metadata by one CopyObject
    if not 0 < retention.max_upload_bytes <= S3_SINGLE_REQUEST_MAX:
        raise ConfigError(
            "storage.retention.max_upload_bytes", "must be between 1 and 5 GiB with the s3 backend"
        )
    if not S3_PART_MIN <= s3.multipart_part_bytes <= S3_SINGLE_REQUEST_MAX:
        raise ConfigError("storage.s3.multipart_part_bytes", "must be between 5 MiB and 5 GiB")
    if not 0 < s3.multipart_threshold_bytes <= S3_SINGLE_REQUEST_MAX:
        raise ConfigError("storage.s3.multipart_threshold_bytes", "must be between 1 and 5 GiB")
    if retention.max_upload_bytes > s3.multipart_part_bytes * 10000:
        raise ConfigError("storage.s3.multipart_part_bytes", "too small: S3 takes 10,000 parts")


def _validate_platform(config: Config) -> None:
    directory, redis = config.directory, config.redis
    if not 0 < directory.reload_seconds < math.inf:
        raise ConfigError("directory.reload_seconds", "must be a positive, finite number")
    if directory.kind == "postgres":
        pg = directory.postgres
        if not pg.dsn:
            raise ConfigError("directory.postgres.dsn", "required when directory.kind is postgres")
        if not pg.owner_organization_id:
            raise ConfigError(
                "directory.postgres.owner_organization_id",
                "required when directory.kind is postgres (the Owner organization is in no table)",
            )
        if pg.pool_size < 1:
            raise ConfigError("directory.postgres.pool_size", "must be at least 1")
        for name in ("cache_seconds", "statement_timeout_seconds", "case_scan_seconds"):
            value = getattr(pg, name)
            if not 0 <= value < math.inf or (name != "cache_seconds" and value == 0):
                raise ConfigError(f"directory.postgres.{name}", "must be a finite number > 0")
    revocation = config.auth.revocation
    if revocation.enabled and not redis.url:
        raise ConfigError("auth.revocation.enabled", "needs redis.url")
    if not 0 <= revocation.cache_seconds < math.inf:
        raise ConfigError("auth.revocation.cache_seconds", "must be a finite number >= 0")
    if config.storage.usage_counter.enabled and not redis.url:
        raise ConfigError("storage.usage_counter.enabled", "needs redis.url")
    for name, db in (
        ("auth.revocation.db", revocation.db),
        ("storage.usage_counter.db", config.storage.usage_counter.db),
    ):
        if db < 0:
            raise ConfigError(name, "must not be negative")
