"""Typed keys for what the application and each request carry."""

from __future__ import annotations

from aiohttp import web

from storage_backends import BackupStore

from .backpressure import StorageGate
from .config import Config
from .deadlines import RequestDeadlines
from .directory import Directory
from .metrics import Metrics
from .principal import Principal
from .tokens import TokenVerifier

CONFIG = web.AppKey("config", Config)
DIRECTORY = web.AppKey("directory", Directory)
STORE = web.AppKey("store", BackupStore)
VERIFIER = web.AppKey("verifier", TokenVerifier)
STORAGE_GATE = web.AppKey("storage_gate", StorageGate)
METRICS = web.AppKey("metrics", Metrics)
DEADLINES = web.AppKey("deadlines", RequestDeadlines)
# route name -> permission the caller needs; routes not listed are public
PROTECTED_ROUTES = web.AppKey("protected_routes", dict[str, str])

REQUEST_ID = web.RequestKey("request_id", str)
PRINCIPAL = web.RequestKey("principal", Principal)
