"""One audit line per delete that reached authorization: who, what, decision, outcome."""

from __future__ import annotations

from aiohttp import web

from ..http.middlewares import REQUEST_ID
from ..identity.principal import PRINCIPAL
from ..telemetry.logs import audit_log, log_info
from ..telemetry.metrics import METRICS
from .storage import STORE


def record_delete(
    request: web.Request, system_id: str, backup_id: str, decision: str, outcome: str
) -> None:
    request.app[METRICS].delete_decided(outcome)
    principal = request[PRINCIPAL]
    log_info(
        audit_log,
        "backup delete",
        {
            "request_id": request[REQUEST_ID],
            "user_id": principal.user_id,
            "organization_id": principal.organization_id,
            "org_role": principal.org_role,
            "system_id": system_id,
            "backup_id": backup_id,
            "decision": decision,
            "outcome": outcome,
            "storage_backend": request.app[STORE].name,
        },
    )
