"""`backup-gateway set-secret`: give a system of the file directory appliance credentials.

The secret is made here, printed once, and only its public part and salted hash are
written (the platform's format, DESIGN.md §9). The file is rewritten whole — checked by
the same parser the gateway loads it with, then swapped in by rename — and a running
gateway picks it up within `directory.reload_seconds`. Comments in the file are not kept.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from ..config import Config
from ..config_loader import ConfigError
from ..directory import DirectoryError, parse_directory
from ..identity.appliance import new_secret


def set_system_secret(config: Config, system_id: str) -> tuple[str, str]:
    """Store a new secret for `system_id`; return (system_key, my_<public>.<secret>)."""
    if config.directory.kind != "file":
        raise ConfigError(
            "directory.kind", "set-secret writes the file directory; the platform sets its own"
        )
    path = config.directory.path
    raw: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
    entries = raw.get("systems") if isinstance(raw, dict) else None
    entry = next(
        (e for e in entries or [] if isinstance(e, dict) and e.get("id") == system_id), None
    )
    if entry is None:
        raise DirectoryError(f"system {system_id}: not in {path}")
    if not entry.get("system_key"):
        raise DirectoryError(f"system {system_id}: has no system_key (not registered)")
    made = new_secret()
    entry["system_secret_public"] = made.public
    entry["system_secret_sha256"] = made.sha256
    parse_directory(raw)  # what the gateway will load: refuse to write what it would refuse
    text = yaml.safe_dump(raw, sort_keys=False, default_flow_style=None)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o640)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return str(entry["system_key"]), made.secret
