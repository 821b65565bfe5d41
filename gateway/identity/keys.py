"""Signing material: the HMAC secret (inline or a 0600 file made on first run) or a public key."""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from jose import jwk
from jose.backends.base import Key
from jose.exceptions import JOSEError

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


def verification_keys(auth: AuthConfig) -> dict[str, Key]:
    """One prepared key per allowed algorithm, so a token is only ever checked with its own."""
    if auth.is_hmac:
        material: str | bytes = hmac_secret(auth)
        field = "auth.secret"
    else:
        assert auth.public_key_file is not None
        field = "auth.public_key_file"
        try:
            material = auth.public_key_file.read_bytes()
        except OSError as exc:
            problem = f"cannot read {auth.public_key_file}: {exc.strerror}"
            raise ConfigError(field, problem) from None
        if b"PRIVATE KEY" in material:
            raise ConfigError(field, "holds a private key; give the gateway the public key only")
    keys: dict[str, Key] = {}
    for alg in auth.algorithms:
        try:
            keys[alg] = jwk.construct(material, alg)
        except (JOSEError, ValueError, TypeError) as exc:
            raise ConfigError(field, f"not a usable {alg} key ({type(exc).__name__})") from None
    return keys
