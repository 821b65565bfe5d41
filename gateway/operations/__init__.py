"""Operations: the routes operators poll — liveness, readiness, metrics, the OpenAPI document.

Outside auth and cheap. What /readyz probes is registered by the wiring (directory,
storage, Redis), so this package knows none of them. It may import `gateway.config`,
`gateway.telemetry` and `gateway.http`.
"""
