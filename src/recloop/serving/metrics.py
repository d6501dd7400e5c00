"""Prometheus metrics of one service instance.

Each app gets its own registry (several apps in one test process never clash).  With
several worker processes, ``recloop serve`` sets ``PROMETHEUS_MULTIPROC_DIR`` before the
workers start; every worker then writes its values to files there and ``/metrics`` — answered
by whichever worker gets the scrape — adds up all of them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def multiprocess_enabled() -> bool:
    return bool(os.environ.get(MULTIPROC_ENV))


class ServiceMetrics:
    """Request counts by route and status, latency, fallbacks, batch sizes, model version."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        self.requests = Counter(
            "recloop_http_requests",
            "HTTP requests by route and status code.",
            ["route", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "recloop_http_request_duration_seconds",
            "Time from request start to the last response byte, by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=reg,
        )
        self.fallbacks = Counter(
            "recloop_fallbacks",
            "Answers that could not use the policy or the store, by reason.",
            ["reason"],
            registry=reg,
        )
        self.recommendations = Counter(
            "recloop_recommendations",
            "Recommendation lists returned, by source (policy or popular).",
            ["source"],
            registry=reg,
        )
        self.batch_size = Histogram(
            "recloop_inference_batch_size",
            "Users scored per inference call.",
            buckets=BATCH_BUCKETS,
            registry=reg,
        )
        self.reloads = Counter(
            "recloop_model_reloads", "Artifact reloads by outcome.", ["outcome"], registry=reg
        )
        self.model_info = Gauge(
            "recloop_model_info",
            "1 for the model version this process serves.",
            ["model_version"],
            registry=reg,
            multiprocess_mode="liveall",
        )
        self.served_lists = Counter(
            "recloop_served_lists",
            "Served lists by logging outcome: logged; dropped (the queue was full); rejected "
            "(the sink refused the list alone, or its document could not be built); lost "
            "(still queued when the service stopped).",
            ["outcome"],
            registry=reg,
        )
        self.arm_lists = Counter(
            "recloop_ab_lists",
            "Lists served per A/B arm and source (policy or popular): the settings' A/B arms, "
            "or current and canary while a registry canary runs (counts add up over "
            "successive canaries).  Their clicks and rewards: recloop_ab_settled_* (from the "
            "stream workers).",
            ["arm", "source"],
            registry=reg,
        )
        self.served_queue = Gauge(
            "recloop_served_queue",
            "Served lists waiting to be logged.",
            registry=reg,
            multiprocess_mode="livesum",
        )
        self._served: str | None = None
        # Children are cached per label value: .labels() costs a lock and a dict lookup.
        self._req_children: dict[tuple[str, int], Counter] = {}
        self._lat_children: dict[str, Histogram] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        key = (route, status)
        c = self._req_children.get(key)
        if c is None:
            c = self._req_children[key] = self.requests.labels(route=route, status=str(status))
        c.inc()
        h = self._lat_children.get(route)
        if h is None:
            h = self._lat_children[route] = self.latency.labels(route=route)
        h.observe(seconds)

    def set_model(self, version: str) -> None:
        if self._served is not None and self._served != version:
            self.model_info.labels(model_version=self._served).set(0)
        self.model_info.labels(model_version=version).set(1)
        self._served = version

    def render(self) -> bytes:
        """The Prometheus text exposition of this process, or of all workers."""
        if multiprocess_enabled():
            from prometheus_client import multiprocess

            reg = CollectorRegistry()
            multiprocess.MultiProcessCollector(reg)
            return generate_latest(reg)
        return generate_latest(self.registry)


ARM_FEEDBACK = (
    ("impressions", "recloop_ab_settled_impressions", "Impressions settled per A/B arm"),
    (
        "clicks",
        "recloop_ab_attributed_clicks",
        "Settled impressions an event with a positive reward was attributed to",
    ),
    ("reward", "recloop_ab_attributed_reward", "Sum of the attributed rewards"),
)


def arm_feedback(heartbeats: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Per-arm feedback counters of the stream workers, as Prometheus text.

    Each worker counts the impressions it settles (:meth:`BehaviorLog.settle_by_arm`: their
    attribution is final then, and each is settled by exactly one worker) with the
    arm their served list recorded, and its heartbeat carries the totals since it started;
    one series per (arm, worker), so a restarted worker is a counter reset, which
    ``rate()`` and ``increase()`` handle.  Workers whose heartbeat aged out are gone from
    the exposition."""
    from prometheus_client.core import CounterMetricFamily
    from prometheus_client.registry import Collector

    fams = {
        key: CounterMetricFamily(
            name,
            f"{doc} by the stream workers (their heartbeats), per worker since it started.",
            labels=["arm", "worker"],
        )
        for key, name, doc in ARM_FEEDBACK
    }
    for worker, beat in sorted(heartbeats.items()):
        for arm, counts in sorted((beat.get("arms") or {}).items()):
            for key, fam in fams.items():
                fam.add_metric([str(arm), worker], float(counts.get(key, 0.0)))

    class _Families(Collector):
        def collect(self) -> Any:
            return iter(fams.values())

    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families())
    return generate_latest(reg)
