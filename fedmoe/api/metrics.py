"""Prometheus metrics of one coordinator app, and the ASGI middleware that feeds them.

Each app has its own ``CollectorRegistry`` (several coordinators may share a process,
as in the tests). Request-level numbers (counts by route and status, bytes, the
acknowledgement latency, accepted and refused updates) are observed by
``MetricsMiddleware`` from the HTTP exchange itself, so the coordinator's core needs
no hooks; state (versions, active workers, federated evaluation losses) is read from
the coordinator when Prometheus scrapes.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from fastapi import FastAPI
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fedmoe import aggregate
from fedmoe.api.asgi import HttpMiddleware
from fedmoe.strategy import GatewayMerge

if TYPE_CHECKING:
    from fedmoe.coordinator.core import CentralCoordinator

UPDATE_PATH = re.compile(r"^/v1/experts/([^/]+)/updates$")
ACTIVE_WINDOW_S = 60.0
STALENESS_BUCKETS = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
WEIGHT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BUILD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RECENT_REJECTIONS = 200


class CoordinatorMetrics:
    """The metric objects of one app, plus the recent refused uploads for the dashboard."""

    def __init__(self, coordinator: CentralCoordinator) -> None:
        self.coordinator = coordinator
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "fedmoe_updates_accepted", "Updates applied to an expert.", ["expert"], registry=r
        )
        self.rejected = Counter(
            "fedmoe_updates_rejected",
            "Uploads refused, by the error code of the answer.",
            ["expert", "reason"],
            registry=r,
        )
        self.staleness = Histogram(
            "fedmoe_update_staleness",
            "Staleness τ of applied updates.",
            ["expert"],
            buckets=STALENESS_BUCKETS,
            registry=r,
        )
        self.weight = Histogram(
            "fedmoe_update_weight",
            "Weight η·s(τ)·clip applied to updates.",
            ["expert"],
            buckets=WEIGHT_BUCKETS,
            registry=r,
        )
        self.ack_latency = Histogram(
            "fedmoe_ack_latency_seconds",
            "Time from an upload's arrival to its durable acknowledgement.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.gateway_build = Histogram(
            "fedmoe_gateway_build_seconds",
            "Time to merge the experts into a gateway version.",
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.requests = Counter(
            "fedmoe_http_requests", "HTTP requests.", ["route", "method", "status"], registry=r
        )
        self.received = Counter(
            "fedmoe_received_bytes", "Request body bytes received.", ["route"], registry=r
        )
        self.served = Counter(
            "fedmoe_served_bytes", "Response body bytes sent.", ["route"], registry=r
        )
        r.register(StateCollector(coordinator))
        self.rejections: deque[dict[str, Any]] = deque(maxlen=RECENT_REJECTIONS)

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    def expert_label(self, name: str) -> str:
        """``name`` when it is one of our experts: a URL must not mint label values."""
        return name if name in self.coordinator.experts else "unknown"

    def observe_update(self, exchange: Exchange, seconds: float) -> None:
        """Count one upload's outcome from its answer."""
        expert = self.expert_label(exchange.update_expert or "")
        body = _json(exchange.response_body)
        if exchange.status == 200:
            self.accepted.labels(expert).inc()
            self.ack_latency.observe(seconds)
            if not body.get("replayed"):
                self.staleness.labels(expert).observe(float(body.get("staleness", 0)))
                self.weight.labels(expert).observe(float(body.get("weight", 0.0)))
            return
        reason = str(body.get("error") or f"http_{exchange.status}")[:40]
        self.rejected.labels(expert, reason).inc()
        self.rejections.appendleft(
            {
                "time": time.time(),
                "expert": expert,
                "worker_id": exchange.header("x-fedmoe-worker-id")[:128],
                "status": exchange.status,
                "reason": reason,
                "detail": str(body.get("detail", ""))[:500],
            }
        )


class StateCollector(Collector):
    """Gauges read from the coordinator at scrape time."""

    def __init__(self, coordinator: CentralCoordinator) -> None:
        self.coordinator = coordinator

    def collect(self) -> Iterator[Metric]:
        """Expert and gateway versions, active workers, the latest federated eval losses."""
        c = self.coordinator
        versions = GaugeMetricFamily(
            "fedmoe_expert_version", "Current version of each expert.", labels=["expert"]
        )
        for name, expert in c.experts.items():
            versions.add_metric([name], expert.version)
        yield versions
        yield GaugeMetricFamily(
            "fedmoe_gateway_version", "Current gateway version.", value=c.gateway.version
        )
        active = GaugeMetricFamily(
            "fedmoe_workers_active",
            f"Workers seen in the last {ACTIVE_WINDOW_S:.0f} s, per expert.",
            labels=["expert"],
        )
        cutoff = time.time() - ACTIVE_WINDOW_S
        counts = dict.fromkeys(c.experts, 0)
        for info in c.ledger.workers().values():
            if info.last_seen >= cutoff and info.specialty in counts:
                counts[info.specialty] += 1
        for name, count in counts.items():
            active.add_metric([name], count)
        yield active
        losses = GaugeMetricFamily(
            "fedmoe_eval_loss",
            "Latest federated validation loss (token-weighted over each worker's latest "
            "report) of a model (expert, gateway, routed) on an expert's domain.",
            labels=["domain", "model"],
        )
        for (domain, kind), loss in sorted(c.evaluations.federated_losses().items()):
            losses.add_metric([domain, kind], loss)
        yield losses


class TimedGatewayMerge(GatewayMerge):
    """A ``GatewayMerge`` that reports each merge's duration to a histogram."""

    def __init__(self, inner: GatewayMerge, histogram: Histogram) -> None:
        super().__init__(method=inner.method, lora=inner.lora)
        self._histogram = histogram

    def merge(
        self, experts: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]
    ) -> aggregate.AdapterState:
        """Merge as the wrapped strategy does, timed."""
        with self._histogram.time():
            return super().merge(experts, weights)


class Exchange:
    """What the middleware learns about one request and its answer."""

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.status = 500  # if the app raises before answering
        self.received = self.served = 0
        match = UPDATE_PATH.match(scope["path"]) if scope["method"] == "POST" else None
        self.update_expert = match.group(1) if match else None
        self.response_body = b""

    def header(self, name: str) -> str:
        """A request header (latin-1), or ''."""
        wanted = name.lower().encode()
        for key, value in self.scope["headers"]:
            if key.lower() == wanted:
                return bytes(value).decode("latin-1")
        return ""


class MetricsMiddleware(HttpMiddleware):
    """Observes every request; serves ``/metrics`` to loopback clients when allowed.

    It must be the outermost middleware, so that it also sees requests that the
    authentication middleware refuses.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: CoordinatorMetrics,
        loopback_open: bool,
    ) -> None:
        super().__init__(app)
        self.metrics = metrics
        self.loopback_open = loopback_open

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on, counting what goes in and out."""
        if scope["path"] == "/metrics" and self.loopback_open and _from_loopback(scope):
            await _send_metrics(send, self.metrics.exposition())
            return
        exchange, began = Exchange(scope), time.perf_counter()

        async def counted_receive() -> Message:
            message = await receive()
            exchange.received += len(message.get("body", b""))
            return message

        async def counted_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                exchange.served += len(chunk)
                if exchange.update_expert is not None and len(exchange.response_body) < 8192:
                    exchange.response_body += chunk
            await send(message)

        try:
            await self.app(scope, counted_receive, counted_send)
        finally:
            self._record(exchange, time.perf_counter() - began)

    def _record(self, exchange: Exchange, seconds: float) -> None:
        route = self._route_of(exchange.scope)
        m = self.metrics
        m.requests.labels(route, exchange.scope["method"], str(exchange.status)).inc()
        m.received.labels(route).inc(exchange.received)
        m.served.labels(route).inc(exchange.served)
        if exchange.update_expert is not None:
            m.observe_update(exchange, seconds)

    @staticmethod
    def _route_of(scope: Scope) -> str:
        """The path template of the route that served the request (bounded label values).

        The router leaves the matched route in the scope; a request that reached no
        route (refused by authentication, or an unknown path) is labelled 'other'.
        """
        route = scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "other"


def install_metrics(app: FastAPI, coordinator: CentralCoordinator | None) -> CoordinatorMetrics:
    """Give ``app`` its metrics: call last in ``create_app`` (the middleware is outermost).

    ``coordinator`` is None only for an app built for its OpenAPI document alone.
    """
    metrics = CoordinatorMetrics(coordinator)  # type: ignore[arg-type]
    app.state.metrics = metrics
    if coordinator is not None:
        coordinator.merger = TimedGatewayMerge(coordinator.merger, metrics.gateway_build)
    loopback_open = coordinator is not None and coordinator.settings.metrics_loopback_open
    app.add_middleware(MetricsMiddleware, metrics=metrics, loopback_open=loopback_open)
    return metrics


def _from_loopback(scope: Scope) -> bool:
    client = scope.get("client")
    if not client:
        return False
    try:
        return ipaddress.ip_address(client[0]).is_loopback
    except ValueError:
        return False


async def _send_metrics(send: Send, body: bytes) -> None:
    headers = [
        (b"content-type", CONTENT_TYPE_LATEST.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}
