"""API errors and the one table that maps storage errors to HTTP answers."""

from __future__ import annotations

from typing import Any

from storage_backends import (
    BackupNotFound,
    BackupProtected,
    ChecksumRefused,
    DeleteOutcomeUnknown,
    InsufficientStorage,
    StorageError,
    StorageNotConfigured,
    StorageUnavailable,
    UploadIncomplete,
)


class ApiError(Exception):
    """An answer other than success, in the envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        data: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.data = data if data is not None else {}
        self.headers = headers or {}


DELETE_OUTCOME_UNKNOWN = "delete outcome unknown"


def invalid_token() -> ApiError:
    # RFC 6750 §3: the challenge names the scheme (and why, when a token was presented).
    return ApiError(401, "invalid token", headers={"WWW-Authenticate": "Bearer"})


def validation_failed(key: str, value: str) -> ApiError:
    return ApiError(
        400,
        "validation failed",
        {
            "type": "validation_error",
            "errors": [{"key": key, "message": "invalid_format", "value": value[:256]}],
        },
    )


def directory_unavailable() -> ApiError:
    return ApiError(503, "directory unavailable", headers={"Retry-After": "1"})


def external_api_error(message: str) -> ApiError:
    return ApiError(502, message, {"type": "external_api_error", "errors": []})


def storage_error(exc: StorageError, operation: str) -> ApiError:
    """Storage error -> HTTP answer. `operation` names what failed in the 502 message."""
    if isinstance(exc, BackupNotFound):
        return ApiError(404, "backup not found")
    if isinstance(exc, BackupProtected):
        return ApiError(409, "backup is protected")
    if isinstance(exc, DeleteOutcomeUnknown):
        # removed, not known durable: never "failed" (a retry reads 404)
        return ApiError(504, DELETE_OUTCOME_UNKNOWN)
    if isinstance(exc, StorageNotConfigured):
        return ApiError(503, "backup storage not configured")
    if isinstance(exc, StorageUnavailable):
        return external_api_error(f"failed to {operation}")
    if isinstance(exc, InsufficientStorage):
        return ApiError(507, "insufficient storage")
    if isinstance(exc, UploadIncomplete):  # the client's body, not the store
        return ApiError(400, "upload length mismatch")
    if isinstance(exc, ChecksumRefused):  # the store's own check of the appliance's digest
        return ApiError(400, "checksum mismatch")
    raise TypeError(f"unmapped storage error {type(exc).__name__}")
