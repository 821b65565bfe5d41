"""HTTP plumbing: what every request passes through before and after a handler.

Owns the envelope and `ApiError` (with the one table mapping storage errors to statuses),
the middlewares (request id and access log, error envelope, deadline, authentication), the
request deadlines and the storage backpressure gate. It may import `gateway.config`,
`gateway.telemetry`, `gateway.identity` and `storage_backends`; never the route packages.
"""
