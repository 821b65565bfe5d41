"""Operations: the routes operators poll — liveness, readiness, metrics, the OpenAPI document.

Outside auth and cheap. It may import the lower packages (`gateway.config`, `telemetry`,
`http`, `directory`) and `gateway.backups` only for the store's app key.
"""
