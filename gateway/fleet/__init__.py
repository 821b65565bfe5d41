"""The fleet (DESIGN.md §13): an index of storage — per system folder, how many backups,
their bytes and the newest one's time — built by a scan and kept up to date by this
process's uploads, deletes and prunes (`index`); which folders no system maps to, and
their purge (`orphans`). The routes that show them live with the other routes
(`gateway.backups.fleet`, `gateway.backups.orphans`). It may import `gateway.config`,
`gateway.telemetry`, `gateway.directory` and `storage_backends`.
"""

from .index import FLEET, STATES, ChangeTicket, FleetIndex, FolderStats
from .orphans import Orphan, PurgeOutcome, find_orphans, purge_orphans

__all__ = [
    "FLEET",
    "STATES",
    "ChangeTicket",
    "FleetIndex",
    "FolderStats",
    "Orphan",
    "PurgeOutcome",
    "find_orphans",
    "purge_orphans",
]
