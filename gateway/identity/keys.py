"""Signing material: the HMAC secret, inline or in a 0600 file made on first run (the key
objects python-jose builds from it, and from public keys, are made in `tokens`)."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..config import MIN_SECRET_BYTES, AuthConfig
from ..config_loader import ConfigError


def ensure_secret_file(path: Path, field: str = "auth.secret_file") -> str:
    """Return the secret in `path`, creating it (mode 0600, random) when missing.

    Creation is atomic even when several workers start at once: the secret is
    written to a private temp file and hard-linked into place, so a reader never
    sees a half-written file and exactly one generated secret wins.
    """
    if not path.exists():
        try:
            _create_secret_file(path)
        except OSError as exc:
            raise ConfigError(field, f"cannot create {path}: {exc.strerror}") from None
    return read_secret_file(path, field)


def _create_secret_file(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (secrets.token_urlsafe(48) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass  # another process won the race; use its secret
    finally:
        tmp.unlink()


def read_secret_file(path: Path, field: str = "auth.secret_file") -> str:
    try:
        mode = path.stat().st_mode
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(field, f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(field, f"{path} is not UTF-8 text") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(field, f"{path} must not be readable by group or others")
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(field, f"secret must be at least {MIN_SECRET_BYTES} bytes")
    return value


def hmac_secret(auth: AuthConfig) -> str:
    if auth.secret is not None:
        return auth.secret
    assert auth.secret_file is not None
    return ensure_secret_file(auth.secret_file)
