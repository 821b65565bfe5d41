"""The directory: where organizations and systems come from.

Owns one interface (`Directory`, in `base`) and its implementations (the YAML file in
`file`). Authorization rules are not here: they live with the routes that apply them
(`gateway.backups.authorization`). It may import `gateway.config` and `gateway.telemetry`.
"""

from .base import (
    DIRECTORY,
    ROLES,
    SAFE_COMPONENT,
    Directory,
    DirectoryError,
    Organization,
    System,
)
from .file import InMemoryDirectory, load_file_directory, parse_directory

__all__ = [
    "DIRECTORY",
    "ROLES",
    "SAFE_COMPONENT",
    "Directory",
    "DirectoryError",
    "InMemoryDirectory",
    "Organization",
    "System",
    "load_file_directory",
    "parse_directory",
]
