"""Audit lines: every delete that reached authorization (who, what, decision, outcome),
every download URL or link issued (who, which backup, until when), every link served
(which backup, the link's expiry, the peer address). Never a link or a signature."""

from __future__ import annotations

from aiohttp import web

from ..http.middlewares import REQUEST_ID
from ..identity.principal import PRINCIPAL
from ..telemetry.logs import audit_log, log_info
from ..telemetry.metrics import METRICS
from .storage import STORE


def _caller(request: web.Request) -> dict[str, str]:
    principal = request[PRINCIPAL]
    return {
        "request_id": request[REQUEST_ID],
        "user_id": principal.user_id,
        "organization_id": principal.organization_id,
        "org_role": principal.org_role,
    }


def record_delete(
    request: web.Request, system_id: str, backup_id: str, decision: str, outcome: str
) -> None:
    request.app[METRICS].delete_decided(outcome)
    log_info(
        audit_log,
        "backup delete",
        {
            **_caller(request),
            "system_id": system_id,
            "backup_id": backup_id,
            "decision": decision,
            "outcome": outcome,
            "storage_backend": request.app[STORE].name,
        },
    )


def record_download_issued(
    request: web.Request, system_id: str, backup_id: str, kind: str, expires_at: int
) -> None:
    log_info(
        audit_log,
        "backup download issued",
        {
            **_caller(request),
            "system_id": system_id,
            "backup_id": backup_id,
            "kind": kind,  # presigned_url | link
            "expires_at": expires_at,
            "storage_backend": request.app[STORE].name,
        },
    )


def record_download_served(
    request: web.Request, system_id: str, backup_id: str, expires_at: int, outcome: str
) -> None:
    log_info(
        audit_log,
        "backup download served",
        {
            "request_id": request[REQUEST_ID],
            "system_id": system_id,
            "backup_id": backup_id,
            "link_expires_at": expires_at,
            "peer": request.remote,
            "method": request.method,
            "outcome": outcome,
        },
    )


def record_upload(
    request: web.Request,
    system_key: str,
    system_id: str | None,
    outcome: str,
    backup: dict[str, object] | None = None,
) -> None:
    """One line per upload that named a system (its credentials, right or wrong)."""
    log_info(
        audit_log,
        "backup upload",
        {
            "request_id": request[REQUEST_ID],
            "system_key": system_key,
            "system_id": system_id,
            "peer": request.remote,
            "outcome": outcome,
            **(backup or {}),
            "storage_backend": request.app[STORE].name,
        },
    )


def record_prune(
    request: web.Request, system_id: str, backup_id: str, size: int, outcome: str
) -> None:
    log_info(
        audit_log,
        "backup prune",
        {
            "request_id": request[REQUEST_ID],
            "system_id": system_id,
            "backup_id": backup_id,
            "size": size,
            "outcome": outcome,
            "storage_backend": request.app[STORE].name,
        },
    )
