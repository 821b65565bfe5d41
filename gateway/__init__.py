"""backup-gateway: delete appliance configuration backups behind JWT auth and hierarchy RBAC."""

from .app import create_app

__all__ = ["create_app"]
