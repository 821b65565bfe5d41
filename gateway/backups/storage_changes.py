"""What this process changed in storage, told to the fleet's index (DESIGN.md §13): a backup
stored by an upload, deleted by a caller or an appliance. (Retention's prunes tell it
themselves: `Retention` holds the index.)"""

from __future__ import annotations

from aiohttp import web

from storage_backends import BackupLocation, SystemFolder

from ..fleet import FLEET, ChangeTicket


def backup_stored(app: web.Application, folder: SystemFolder, backup_id: str, size: int) -> None:
    app[FLEET].stored(folder, backup_id, size)


def delete_begins(app: web.Application) -> ChangeTicket:
    """Taken before the store is asked to delete: told with the delete (`backup_deleted`)."""
    return app[FLEET].ticket()


def backup_deleted(
    app: web.Application, location: BackupLocation, size: int | None, ticket: ChangeTicket
) -> None:
    """`size` None when the delete did not look at the backup first."""
    folder = SystemFolder(location.organization_id, location.system_key)
    app[FLEET].removed(folder, location.backup_id, size, ticket)
