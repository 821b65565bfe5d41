"""Telemetry: JSON-lines logging and the Prometheus counters every other package reports to.

Owns logging's set-up, the fast path for per-request lines, and the `Metrics` object (and
its app key). The line format itself is `storage_backends.log_format`, shared with the local
I/O process. It may import only `gateway.config` and `storage_backends`; everything else may
import it.
"""
