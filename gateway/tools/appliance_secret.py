"""`backup-gateway set-secret`: give a system of the file directory appliance credentials.

The secret is made here, printed once, and only its public part and salted hash are
written (the platform's format, DESIGN.md §9). The file is edited round-trip (ruamel.yaml):
its comments, order, flow or block style and indentation stay as they were, so the
tracked `directory.yaml` changes by the two lines of the secret. The result is checked by
the same parser the gateway loads it with, then swapped in by rename, and a running
gateway picks it up within `directory.reload_seconds`.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError
from ruamel.yaml.util import load_yaml_guess_indent

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
    text = path.read_text(encoding="utf-8")
    editor = YAML()  # round-trip: comments, order, styles and quotes as they were read
    editor.preserve_quotes = True
    editor.width = 4096  # a flow mapping that grew by the secret stays on its line
    try:
        raw: Any = editor.load(text)
        # the file's own indentation, so the lines not changed are written as they were
        _, indent, offset = load_yaml_guess_indent(text)
    except YAMLError as exc:
        raise DirectoryError(f"{path}: not valid YAML ({exc.__class__.__name__})") from None
    if indent is not None:
        editor.indent(mapping=indent, sequence=indent, offset=offset or 0)
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
    buffer = io.StringIO()
    editor.dump(raw, buffer)
    text = buffer.getvalue()
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
