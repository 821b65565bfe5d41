"""Prometheus metrics. Labels are bounded: route templates and fixed outcomes, never raw paths."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """One registry per application, so several apps in one process never collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "gateway_http_requests",
            "HTTP requests answered",
            ["route", "method", "status"],
            registry=r,
        )
        self.request_latency = Histogram(
            "gateway_http_request_duration_seconds",
            "Time to answer a request",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "gateway_http_requests_in_flight", "Requests being handled", registry=r
        )
        self.storage_operations = Counter(
            "gateway_storage_operations",
            "Storage operations",
            ["backend", "operation", "outcome"],
            registry=r,
        )
        self.storage_latency = Histogram(
            "gateway_storage_operation_duration_seconds",
            "Storage operation latency",
            ["backend", "operation"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.deletes = Counter(
            "gateway_backup_deletes",
            "Backup delete requests that reached authorization",
            ["outcome"],
            registry=r,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
