"""Prometheus metrics of the rrhf service, registered in the server's own registry."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from services.rrhf.jobs import JobKind, JobState, JobStore


class JobsCollector(Collector):
    """`wombat_rrhf_jobs{kind,state}`: the job store's contents at scrape time (zeros included, so a
    rate or an alert on failed jobs has a series from the start)."""

    def __init__(self, store: JobStore):
        self.store = store

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = Counter((job.kind, job.state) for job in self.store.list())
        family = GaugeMetricFamily("wombat_rrhf_jobs", "Jobs known to the service", labels=["kind", "state"])
        for kind in JobKind:
            for state in JobState:
                family.add_metric([kind.value, state.value], counts.get((kind, state), 0))
        yield family


def register_metrics(registry: CollectorRegistry, servicer) -> None:
    registry.register(JobsCollector(servicer.store))
    in_progress = Gauge(
        "wombat_rrhf_score_requests_in_progress",
        "Score and Rank requests queued or being scored, all models (bounded per model by --max-pending-scores)",
        registry=registry,
    )
    in_progress.set_function(servicer.scores_in_progress)
