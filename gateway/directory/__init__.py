"""The directory: where organizations and systems come from.

Owns one interface (`Directory`, in `base`), its implementations — the YAML file that
reloads itself (`file`) and the platform's PostgreSQL (`postgres`) — the cache in front of
the database (`cache`), and a registry by `directory.kind`. Authorization rules are not
here: they live with the routes that apply them (`gateway.backups.authorization`), one
module for every directory. It may import `gateway.config` and `gateway.telemetry`.
"""

from collections.abc import Callable

from ..config import DirectoryConfig
from .base import (
    DIRECTORY,
    ROLES,
    SAFE_COMPONENT,
    Directory,
    DirectoryError,
    DirectoryUnavailable,
    Organization,
    System,
    SystemInTree,
)
from .cache import CachedDirectory
from .file import FileDirectory, InMemoryDirectory, load_file_directory, parse_directory


def _postgres(config: DirectoryConfig) -> Directory:
    from .postgres import PostgresDirectory  # asyncpg is imported only when it is used

    return CachedDirectory(PostgresDirectory(config.postgres), config.postgres.cache_seconds)


DIRECTORIES: dict[str, Callable[[DirectoryConfig], Directory]] = {
    "file": lambda c: FileDirectory(c.path, c.reload_seconds),
    "postgres": _postgres,
}


def create_directory(config: DirectoryConfig) -> Directory:
    """The configured directory, not started: `start()` it on the loop that serves."""
    return DIRECTORIES[config.kind](config)


__all__ = [
    "DIRECTORIES",
    "DIRECTORY",
    "ROLES",
    "SAFE_COMPONENT",
    "CachedDirectory",
    "Directory",
    "DirectoryError",
    "DirectoryUnavailable",
    "FileDirectory",
    "InMemoryDirectory",
    "Organization",
    "System",
    "SystemInTree",
    "create_directory",
    "load_file_directory",
    "parse_directory",
]
