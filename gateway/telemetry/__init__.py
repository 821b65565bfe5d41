"""Telemetry: JSON-lines logging and the Prometheus counters every other package reports to.

Owns the log format, the fast path for per-request lines, and the `Metrics` object (and its
app key). It may import only `gateway.config`; everything else may import it.
"""
