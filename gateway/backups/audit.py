"""Audit lines: every delete that reached authorization (who, what, decision, outcome),
every download URL or link issued (who, which backup, until when), every link served
(which backup, the link's expiry, the peer address), every restore and delete by an
appliance that proved who it is (which system, which backup, what was sent). Never a link
or a signature."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..directory import System
from ..http.middlewares import REQUEST_ID
from ..identity.principal import PRINCIPAL
from ..telemetry.logs import audit_log, log_info
from ..telemetry.metrics import METRICS
from .storage import STORE

if TYPE_CHECKING:
    from .sending import Delivery


def _record(
    request: web.Request,
    message: str,
    fields: dict[str, object],
    *,
    caller: bool = False,
    backend: bool = True,
) -> None:
    """The one way an audit line is built: the request id, the caller (when a token named
    one), the record's own fields, then the storage backend that acted."""
    line: dict[str, object] = {"request_id": request[REQUEST_ID]}
    if caller:
        principal = request[PRINCIPAL]
        line["user_id"] = principal.user_id
        line["organization_id"] = principal.organization_id
        line["org_role"] = principal.org_role
    line.update(fields)
    if backend:
        line["storage_backend"] = request.app[STORE].name
    log_info(audit_log, message, line)


def record_delete(
    request: web.Request, system_id: str, backup_id: str, decision: str, outcome: str
) -> None:
    request.app[METRICS].delete_decided(outcome)
    _record(
        request,
        "backup delete",
        {"system_id": system_id, "backup_id": backup_id, "decision": decision, "outcome": outcome},
        caller=True,
    )


def record_protection(
    request: web.Request, system_id: str, backup_id: str, protected: bool, outcome: str
) -> None:
    _record(
        request,
        "backup protection",
        {
            "system_id": system_id,
            "backup_id": backup_id,
            "protected": protected,
            "outcome": outcome,
        },
        caller=True,
    )


def record_download_issued(
    request: web.Request, system_id: str, backup_id: str, kind: str, expires_at: int
) -> None:
    _record(
        request,
        "backup download issued",
        # kind: presigned_url | link
        {"system_id": system_id, "backup_id": backup_id, "kind": kind, "expires_at": expires_at},
        caller=True,
    )


def record_download_served(
    request: web.Request, system_id: str, backup_id: str, expires_at: int, outcome: str
) -> None:
    _record(
        request,
        "backup download served",
        {
            "system_id": system_id,
            "backup_id": backup_id,
            "link_expires_at": expires_at,
            "peer": request.remote,
            "method": request.method,
            "outcome": outcome,
        },
        backend=False,  # only local disk serves links
    )


def record_upload(
    request: web.Request,
    system_key: str,
    system_id: str | None,
    outcome: str,
    backup: dict[str, object] | None = None,
) -> None:
    """One line per upload that named a system (its credentials, right or wrong)."""
    _record(
        request,
        "backup upload",
        {
            "system_key": system_key,
            "system_id": system_id,
            "peer": request.remote,
            "outcome": outcome,
            **(backup or {}),
        },
    )


def record_prune(
    request: web.Request, system_id: str, backup_id: str, size: int, outcome: str
) -> None:
    _record(
        request,
        "backup prune",
        {"system_id": system_id, "backup_id": backup_id, "size": size, "outcome": outcome},
    )


def _appliance_fields(request: web.Request, system: System) -> dict[str, object]:
    """Who acted when an appliance did: its system (the credentials named it), from where."""
    return {
        "actor": "appliance",
        "system_id": system.id,
        "system_key": system.system_key,
        "organization_id": system.organization_id,
        "peer": request.remote,
    }


def record_restore(
    request: web.Request, system: System, backup_id: str, delivery: Delivery
) -> None:
    _record(
        request,
        "backup restored",
        {
            **_appliance_fields(request, system),
            "backup_id": backup_id,
            "method": request.method,
            "status": delivery.status,
            "bytes_sent": delivery.bytes_sent,
            "outcome": delivery.outcome,
        },
    )


def record_appliance_delete(
    request: web.Request, system: System, backup_id: str, decision: str, outcome: str
) -> None:
    request.app[METRICS].delete_decided(outcome)
    _record(
        request,
        "backup delete",
        {
            **_appliance_fields(request, system),
            "backup_id": backup_id,
            "decision": decision,
            "outcome": outcome,
        },
    )
