"""What a canary revision served, read from Knative's queue-proxy in each of its pods.

Every request to a Knative revision passes the pod's queue-proxy, which counts it on its request
metrics port (9091, Prometheus text) as `revision_app_request_count` by `response_code_class`, with
latencies in the `revision_app_request_latencies` histogram (milliseconds). Some Knative builds
leave out the `revision_` prefix, so both spellings are read. Reading the pods directly means the
canary can be judged without a Prometheus server. Two scrapes, at the start and at the end of the
hold, differ by what was served in between.
"""

from __future__ import annotations

import math
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

QUEUE_METRICS_PORT = 9091
_COUNT = ("revision_app_request_count", "app_request_count")
_LATENCY = ("revision_app_request_latencies", "app_request_latencies")


@dataclass
class Requests:
    """Request counts and the latency histogram (upper bound in seconds -> cumulative count)."""

    total: float = 0.0
    errors: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def __add__(self, other: Requests) -> Requests:
        keys = set(self.buckets) | set(other.buckets)
        return Requests(self.total + other.total, self.errors + other.errors,
                        {k: self.buckets.get(k, 0.0) + other.buckets.get(k, 0.0) for k in keys})

    def __sub__(self, other: Requests) -> Requests:
        return Requests(self.total - other.total, self.errors - other.errors,
                        {k: v - other.buckets.get(k, 0.0) for k, v in self.buckets.items()})

    def quantile(self, q: float) -> float:
        """The upper bound of the first bucket holding the q-quantile (inf if only +Inf does)."""
        count = self.buckets.get(math.inf, 0.0)
        if count <= 0:
            return 0.0
        for bound in sorted(self.buckets):
            if self.buckets[bound] >= q * count:
                return bound
        return math.inf


def parse(text: str) -> Requests:
    """The request counters of one queue-proxy metrics page."""
    out = Requests()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name = sample.name.removesuffix("_total")
            if name in _COUNT:
                out.total += sample.value
                out.errors += sample.value if sample.labels.get("response_code_class") == "5xx" else 0.0
            elif name.removesuffix("_bucket") in _LATENCY and name.endswith("_bucket"):
                bound = float(sample.labels["le"]) / 1000.0  # milliseconds
                out.buckets[bound] = out.buckets.get(bound, 0.0) + sample.value
    return out


def scrape(ip: str, port: int | None = None, timeout_s: float = 5.0) -> Requests:
    """One pod's counters; an unreachable page counts as no requests (the pod checks judge its health)."""
    url = f"http://{ip}:{port or QUEUE_METRICS_PORT}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - a pod IP we listed
            return parse(resp.read().decode())
    except OSError:
        return Requests()
