"""Signed download links for local disk (DESIGN.md §8): the link is the capability.

A link is one opaque path segment, `<payload>.<signature>`, both base64url. The payload
names the system id, the organization id and system key it resolved to when issued, the
backup id, the expiry (unix seconds) and the key id; the signature is HMAC-SHA256 over the
payload with the key in `storage.download.link_secret_file` — never the token secret —
and is compared in constant time. Links are never logged.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from storage_backends import BackupLocation
from storage_backends.ids import normalize_backup_id

from ..directory import SAFE_COMPONENT
from ..identity.keys import ensure_secret_file

VERSION = "1"
_SEPARATOR = "~"  # in no safe component, no backup id, no number
MAX_LINK_LENGTH = 1024
CLOCK_SKEW_SECONDS = 5  # between gateway processes that issue and serve


class InvalidLink(Exception):
    """Why a link was refused; for debug logs only."""


@dataclass(frozen=True, slots=True)
class Link:
    system_id: str
    location: BackupLocation
    expires_at: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise InvalidLink("not base64url") from None


class LinkSigner:
    def __init__(
        self, secret_file: Path, max_ttl: int, clock: Callable[[], float] = time.time
    ) -> None:
        self._key = ensure_secret_file(secret_file, "storage.download.link_secret_file").encode()
        self._key_id = hashlib.sha256(b"link-key-id" + self._key).hexdigest()[:8]
        self._max_ttl = max_ttl
        self._clock = clock

    def issue(self, system_id: str, location: BackupLocation, ttl: int) -> tuple[str, int]:
        """(the link's path segment, its expiry in unix seconds)."""
        expires_at = int(self._clock()) + ttl
        payload = _SEPARATOR.join(
            [
                VERSION,
                self._key_id,
                system_id,
                location.organization_id,
                location.system_key,
                location.backup_id,
                str(expires_at),
            ]
        ).encode("ascii")
        signature = hmac.new(self._key, payload, hashlib.sha256).digest()
        return f"{_b64(payload)}.{_b64(signature)}", expires_at

    def verify(self, token: str) -> Link:
        """The link's content when it is genuine and current; InvalidLink otherwise."""
        if len(token) > MAX_LINK_LENGTH or not token.isascii():
            raise InvalidLink("too long or not ASCII")
        encoded, dot, encoded_signature = token.partition(".")
        if not dot or not encoded or not encoded_signature:
            raise InvalidLink("not payload.signature")
        payload = _unb64(encoded)
        expected = hmac.new(self._key, payload, hashlib.sha256).digest()
        if not hmac.compare_digest(expected, _unb64(encoded_signature)):
            raise InvalidLink("bad signature")
        # Signed by us: what follows can only fail for a link of another version or key.
        fields = payload.decode("ascii", "replace").split(_SEPARATOR)
        if len(fields) != 7 or fields[0] != VERSION or fields[1] != self._key_id:
            raise InvalidLink("another version or key")
        _, _, system_id, org_id, system_key, backup_id, expiry = fields
        if not all(SAFE_COMPONENT.fullmatch(v) for v in (system_id, org_id, system_key)):
            raise InvalidLink("odd component")
        if normalize_backup_id(backup_id) != backup_id or not expiry.isdigit():
            raise InvalidLink("odd backup id or expiry")
        expires_at = int(expiry)
        now = self._clock()
        if now >= expires_at:
            raise InvalidLink("expired")
        if expires_at - now > self._max_ttl + CLOCK_SKEW_SECONDS:
            raise InvalidLink("expiry beyond the configured ttl")
        return Link(system_id, BackupLocation(org_id, system_key, backup_id), expires_at)


LINKS = web.AppKey("links", LinkSigner)
