"""Prometheus metrics of one app: its own registry (never the process-wide one, so that
several apps, as in tests, never collide), request counts and latencies by route template,
and jobs by kind and status, counted from the database at each scrape."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.models import Job

log = logging.getLogger(__name__)

JOB_KINDS = ("synthesis", "training")
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")


class Metrics:
    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "aligndiff_http_requests",
            "HTTP requests answered, by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "aligndiff_http_request_duration_seconds",
            "Time to answer an HTTP request (to its last byte), by method and route template.",
            ["method", "route"],
            registry=self.registry,
        )
        self.registry.register(JobsCollector(session_factory))

    def observe_request(self, *, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format."""
        return generate_latest(self.registry)


class JobsCollector(Collector):
    """`aligndiff_jobs{kind, status}`: how many jobs are in each state, counted at scrape."""

    def __init__(self, session_factory: sessionmaker[Session]) -> None:
        self.session_factory = session_factory

    def describe(self) -> Iterator[Metric]:
        # Describing without collecting keeps registration from querying the database.
        yield self._family()

    def collect(self) -> Iterator[Metric]:
        counts = dict.fromkeys(((k, s) for k in JOB_KINDS for s in JOB_STATUSES), 0)
        try:
            with self.session_factory() as session:
                rows = session.execute(
                    select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status)
                )
                counts.update({(kind, status): count for kind, status, count in rows})
        except SQLAlchemyError as error:
            # A scrape must still answer (request metrics matter most when the database is
            # down); the gauge is left out rather than reported as zeros.
            log.warning("metrics: cannot count jobs: %s", error)
            return
        family = self._family()
        for (kind, status), count in sorted(counts.items()):
            family.add_metric([kind, status], count)
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "aligndiff_jobs", "Jobs by kind and status.", labels=["kind", "status"]
        )
