"""Prometheus metrics. Labels are bounded: route templates and fixed outcomes, never raw paths.

Counted in plain dicts and ints on the event loop and turned into metric families only
when scraped (a custom collector, as prometheus_client documents for "metrics from
elsewhere"). The library's labelled Counter/Histogram children take a lock and validate
labels on every update: five updates a request cost ~8 % of the gateway's CPU under load.
Everything here runs on one event loop, so no lock is needed.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Literal

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# a directory lookup is a single query: finer at the low end, where its 2 ms target lies
LOOKUP_BUCKETS = (
    *(0.00025, 0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075),
    *(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def _bound_labels(bounds: tuple[float, ...]) -> tuple[str, ...]:
    return (*map(floatToGoString, bounds), "+Inf")  # as the library writes them


_LATENCY_LABELS = _bound_labels(LATENCY_BUCKETS)
_LOOKUP_LABELS = _bound_labels(LOOKUP_BUCKETS)


class _Histogram:
    __slots__ = ("bounds", "counts", "labels", "sum")

    def __init__(
        self, bounds: tuple[float, ...] = LATENCY_BUCKETS, labels: tuple[str, ...] = _LATENCY_LABELS
    ) -> None:
        self.bounds, self.labels = bounds, labels
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # bucket bounds are inclusive
        self.sum += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.labels, self.counts, strict=True):
            total += count
            out.append((bound, total))
        return out


class Metrics:
    """One set per application (its own registry), so several apps in one process never mix."""

    def __init__(self) -> None:
        self.in_flight = 0
        # numbers other parts keep themselves, read at scrape time: (kind, name, help, read)
        self._readings: list[tuple[str, str, str, Callable[[], float]]] = []
        self._labeled: list[tuple[str, str, str, str, Callable[[], Mapping[str, float]]]] = []
        self._requests: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._request_latency: defaultdict[str, _Histogram] = defaultdict(_Histogram)
        self._storage: defaultdict[tuple[str, str, str], int] = defaultdict(int)
        self._storage_latency: defaultdict[tuple[str, str], _Histogram] = defaultdict(_Histogram)
        self._deletes: defaultdict[str, int] = defaultdict(int)
        self._lookups: defaultdict[tuple[str, str], int] = defaultdict(int)
        self._lookup_latency: defaultdict[str, _Histogram] = defaultdict(
            lambda: _Histogram(LOOKUP_BUCKETS, _LOOKUP_LABELS)
        )
        self._outcome_labels: dict[str, str] = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))

    def request_answered(self, route: str, method: str, status: int, seconds: float) -> None:
        self._requests[route, method, str(status)] += 1
        self._request_latency[route].observe(seconds)

    def storage_operation(self, backend: str, operation: str, outcome: str, seconds: float) -> None:
        self._storage[backend, operation, outcome] += 1
        self._storage_latency[backend, operation].observe(seconds)

    def directory_lookup(self, lookup: str, outcome: str, seconds: float) -> None:
        """A lookup the directory's server was asked (a cache miss), from ask to answer."""
        self._lookups[lookup, outcome] += 1
        self._lookup_latency[lookup].observe(seconds)

    def add_reading(
        self,
        kind: Literal["counter", "gauge"],
        name: str,
        documentation: str,
        read: Callable[[], float],
    ) -> None:
        """Export a number that its owner keeps (a counter without `_total`), read when
        scraped: the owner needs no reference to this object on its own hot path."""
        self._readings.append((kind, name, documentation, read))

    def add_labeled_reading(
        self,
        kind: Literal["counter", "gauge"],
        name: str,
        documentation: str,
        label: str,
        read: Callable[[], Mapping[str, float]],
    ) -> None:
        """`add_reading` for a number kept per value of one label (an outcome, a state)."""
        self._labeled.append((kind, name, documentation, label, read))

    def delete_decided(self, outcome: str) -> None:
        """Count a delete by its outcome message ("backup not found" -> backup_not_found)."""
        label = self._outcome_labels.get(outcome)
        if label is None:
            label = self._outcome_labels[outcome] = outcome.replace(" ", "_").replace(",", "")
        self._deletes[label] += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def families(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_http_requests", "HTTP requests answered", labels=["route", "method", "status"]
        )
        for labels, count in self._requests.items():
            requests.add_metric(labels, count)
        yield requests
        latency = HistogramMetricFamily(
            "gateway_http_request_duration_seconds", "Time to answer a request", labels=["route"]
        )
        for route, hist in self._request_latency.items():
            latency.add_metric([route], hist.buckets(), hist.sum)
        yield latency
        yield GaugeMetricFamily(
            "gateway_http_requests_in_flight", "Requests being handled", value=self.in_flight
        )
        for kind, name, documentation, read in self._readings:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, documentation, value=read())
        for kind, name, documentation, label, read_all in self._labeled:
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            labeled = family(name, documentation, labels=[label])
            for value, number in read_all().items():
                labeled.add_metric([value], number)
            yield labeled
        storage = CounterMetricFamily(
            "gateway_storage_operations",
            "Storage operations",
            labels=["backend", "operation", "outcome"],
        )
        for labels, count in self._storage.items():
            storage.add_metric(labels, count)
        yield storage
        storage_latency = HistogramMetricFamily(
            "gateway_storage_operation_duration_seconds",
            "Storage operation latency",
            labels=["backend", "operation"],
        )
        for pair, hist in self._storage_latency.items():
            storage_latency.add_metric(list(pair), hist.buckets(), hist.sum)
        yield storage_latency
        deletes = CounterMetricFamily(
            "gateway_backup_deletes",
            "Backup delete requests that reached authorization",
            labels=["outcome"],
        )
        for outcome, count in self._deletes.items():
            deletes.add_metric([outcome], count)
        yield deletes
        lookups = CounterMetricFamily(
            "gateway_directory_lookups",
            "Lookups the directory's database was asked (cache misses)",
            labels=["lookup", "outcome"],
        )
        for pair, count in self._lookups.items():
            lookups.add_metric(list(pair), count)
        yield lookups
        lookup_latency = HistogramMetricFamily(
            "gateway_directory_lookup_duration_seconds",
            "Time from asking the directory's database to its answer, the wait to join a "
            "query included",
            labels=["lookup"],
        )
        for lookup, hist in self._lookup_latency.items():
            lookup_latency.add_metric([lookup], hist.buckets(), hist.sum)
        yield lookup_latency


METRICS = web.AppKey("metrics", Metrics)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        return self._metrics.families()
