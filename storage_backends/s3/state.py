"""Reading and writing a backup's state on S3: the marks of `state_keys` under
`{prefix}.state/`, and, with `object_lock`, the S3 legal hold on the backup itself.

Reads are the hot path's signed ListObjectsV2 (a listing route reads a system's state with
each listing); writes are rare (a user's protection) and go through aiobotocore, which
adds the Content-MD5 that PutObjectLegalHold requires.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from ..base import BackupLocation, SystemFolder
from ..errors import BackupNotFound
from .errors import STORE_FAILURES, reason
from .listing import every_key
from .signed import SignedRequests
from .state_keys import (
    NO_STATE,
    VERIFIED,
    BackupState,
    backup_state_prefix,
    protected_key,
    states_from_keys,
    system_state_prefix,
    verified_key,
)

log = logging.getLogger(__name__)


class BackupStates:
    """The state side of the S3 store, on the store's own client and signed requests."""

    def __init__(
        self,
        prefix: str,
        bucket: str,
        client: Any,
        signed: SignedRequests,
        delete_key: Callable[[str], Awaitable[None]],
    ) -> None:
        self._prefix = prefix
        self._bucket = bucket
        self._client = client
        self._signed = signed
        self._delete_key = delete_key  # every version on a versioned bucket; BackupNotFound

    async def of_system(self, folder: SystemFolder) -> dict[str, BackupState]:
        """Every marked backup of the system: one paginated listing, no GET."""
        prefix = system_state_prefix(self._prefix, folder)
        return states_from_keys(prefix, await self._keys_under(prefix))

    async def of_backup(self, location: BackupLocation) -> BackupState:
        return self.state_in(location, await self.keys_of(location))

    def state_in(self, location: BackupLocation, keys: list[str]) -> BackupState:
        """The backup's state as its marks (`keys_of`) say."""
        prefix = system_state_prefix(
            self._prefix, SystemFolder(location.organization_id, location.system_key)
        )
        return states_from_keys(prefix, keys).get(location.backup_id, NO_STATE)

    async def keys_of(self, location: BackupLocation) -> list[str]:
        """Every mark of one backup, whatever it says (a delete takes them all)."""
        return await self._keys_under(backup_state_prefix(self._prefix, location))

    async def _keys_under(self, prefix: str) -> list[str]:
        listed = await every_key(self._signed, prefix, directly_under=False)
        return [key for key, _, _ in listed]

    async def mark_protected(self, location: BackupLocation, protected: bool) -> None:
        key = protected_key(self._prefix, location)
        if protected:
            await self._client.put_object(Bucket=self._bucket, Key=key, Body=b"")
        else:
            with contextlib.suppress(BackupNotFound):  # never marked: nothing to remove
                await self._delete_key(key)

    async def mark_verified(self, location: BackupLocation, integrity: str, at: datetime) -> None:
        """The verifier's word as a new mark, then the older ones of the backup removed."""
        key = verified_key(self._prefix, location, integrity, at)
        await self._client.put_object(Bucket=self._bucket, Key=key, Body=b"")
        older = [k for k in await self.keys_of(location) if "/" + VERIFIED in k and k != key]
        for stale in older:
            with contextlib.suppress(BackupNotFound):
                await self._delete_key(stale)

    async def hold(self, key: str, on: bool) -> None:
        """Put the S3 legal hold of the object's current version ON or OFF."""
        await self._client.put_object_legal_hold(
            Bucket=self._bucket, Key=key, LegalHold={"Status": "ON" if on else "OFF"}
        )

    async def drop(self, location: BackupLocation, keys: list[str]) -> None:
        """Remove a deleted backup's marks. Best effort: the backup is gone already, and a
        mark left behind makes nothing appear (it is read only for a listed backup)."""
        for key in keys:
            try:
                with contextlib.suppress(BackupNotFound):
                    await self._delete_key(key)
            except STORE_FAILURES as exc:
                log.warning(
                    "s3 state of a deleted backup %s not removed: %s",
                    location.backup_id,
                    reason(exc),
                )
                return
