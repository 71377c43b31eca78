"""What the HTTP server shows its operators: Prometheus metrics (``GET /metrics``, with
prometheus_client), a request id for every request (``X-Request-ID``, taken from the request or
made, sent back, and ending every log line written for the request, in the HTTP process and in
the inference worker that answers it) and an access log of one line per request
(``serve.access_log=text``, or ``json``).

The HTTP counts live in the HTTP (API) process, which answers every request and ``/metrics``;
what the inference workers measure reaches it through shared memory (:class:`SharedHistogram`).
"""

from __future__ import annotations

import bisect
import contextvars
import http
import itertools
import json
import logging
import re
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import Info as InfoMetric
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.utils import floatToGoString
from starlette.datastructures import Headers, MutableHeaders

REQUEST_ID_HEADER = "X-Request-ID"
#: a request id taken as sent: what fits in a log line and a header (else one is made)
REQUEST_ID = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
#: the routes counted by name (labels stay few: any other path counts as ``other``)
ROUTES = ("/predict", "/health", "/livez", "/info", "/metrics", "/")
#: request durations, s: from a lone answer (ms) to ``serve.timeout``
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: requests per batch: up to serve.max_batch_size
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
#: windows per forward pass of the model: up to a batch of ``batch_size`` windows
WINDOW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
ACCESS_LOGS = ("text", "json", "off")
#: The request id (in an inference worker: the ids of the batch, comma-separated) that the code
#: running now works for; every log line made meanwhile ends with it (:func:`tag_log_records`).
REQUEST_IDS: contextvars.ContextVar[str] = contextvars.ContextVar("qa_request_ids", default="")


def tag_log_records() -> None:
    """From now on, in this process, a log record made while :data:`REQUEST_IDS` is set ends
    with ``[request ID]`` (its ``request_id`` attribute holds the id too). Ids hold no ``%``
    (:data:`REQUEST_ID`), so the message's own ``%`` formatting is untouched."""
    make = logging.getLogRecordFactory()
    if getattr(make, "tags_requests", False):
        return

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.request_id = REQUEST_IDS.get()
        if record.request_id and isinstance(record.msg, str):
            record.msg = f"{record.msg} [request {record.request_id}]"
        return record

    tagged.tags_requests = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(tagged)


class SharedHistogram:
    """A histogram the inference workers observe and the API process reports, in shared memory
    without a lock: each worker writes only its own row of bucket counts and its own sum (a
    worker stopped or killed mid-write holds up nobody), and a scrape adds the rows up."""

    def __init__(
        self, name: str, documentation: str, buckets: tuple[float, ...], workers: int
    ) -> None:
        import multiprocessing

        self.name, self.documentation, self.buckets = name, documentation, buckets
        context = multiprocessing.get_context("spawn")  # pickled into the spawned workers
        self.counts = context.RawArray("q", workers * (len(buckets) + 1))
        self.sums = context.RawArray("d", workers)

    def observe(self, worker: int, value: float) -> None:
        row = worker * (len(self.buckets) + 1)
        self.counts[row + bisect.bisect_left(self.buckets, value)] += 1
        self.sums[worker] += value

    def collect(self) -> list[HistogramMetricFamily]:
        """prometheus_client's collector protocol."""
        width = len(self.buckets) + 1
        per_bucket = [sum(self.counts[i::width]) for i in range(width)]
        cumulative = list(itertools.accumulate(per_bucket))
        bounds = [floatToGoString(bound) for bound in self.buckets] + [
            "+Inf"
        ]  # "1.0", as Histogram
        family = HistogramMetricFamily(self.name, self.documentation)
        family.add_metric([], list(zip(bounds, cumulative, strict=True)), sum(self.sums))
        return [family]


class WorkerMetrics:
    """What the inference workers measure (shared histograms, pickled into them
    with the API): how long each request waited in the queue, and the requests of each batch."""

    def __init__(self, workers: int) -> None:
        self.queue_wait = SharedHistogram(
            "qa_queue_wait_seconds",
            "Time a request waited in the queue before a worker took it",
            LATENCY_BUCKETS,
            workers,
        )
        self.batch_requests = SharedHistogram(
            "qa_batch_requests",
            "Requests answered together, in one answering call of a worker",
            BATCH_BUCKETS,
            workers,
        )
        self.forward_windows = SharedHistogram(
            "qa_forward_windows",
            "Windows the model ran on together, in one forward pass",
            WINDOW_BUCKETS,
            workers,
        )


class ServerMetrics:
    """The server's metrics in a registry of their own (names prefixed ``qa_``)."""

    def __init__(
        self,
        model: dict[str, Any],
        workers: int,
        answering: Callable[[], list[bool]],
        of_workers: WorkerMetrics | None = None,
    ) -> None:
        disable_created_metrics()  # no *_created series beside each counter and histogram
        self.registry = CollectorRegistry()
        if of_workers is not None:
            self.registry.register(of_workers.queue_wait)
            self.registry.register(of_workers.batch_requests)
            self.registry.register(of_workers.forward_windows)
        self.requests = Counter(
            "qa_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "qa_http_request_duration_seconds",
            "Time from a request's arrival to its response, by route",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        Gauge("qa_workers", "Inference workers started", registry=self.registry).set(workers)
        alive = Gauge(
            "qa_workers_answering",
            "Inference workers that can answer now (model loaded, process running)",
            registry=self.registry,
        )
        alive.set_function(lambda: sum(answering()))
        InfoMetric("qa_model", "The model served", registry=self.registry).info(
            {key: str(model.get(key)) for key in ("model", "backend", "precision")}
        )

    def observe(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def scrape(self) -> tuple[bytes, str]:
        """The text format of every metric, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


def access_logger() -> logging.Logger:
    """The access log: one line per request on standard output, nothing else on those lines."""
    logger = logging.getLogger("qa_lightning.serving.access")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    return logger


class Observed:
    """ASGI middleware (the outermost): a request id for each request, sent back in its
    ``X-Request-ID`` header and set in :data:`REQUEST_IDS` while the request is handled; the
    request counted and timed in ``metrics``; with ``access_log`` ``text`` or ``json`` one
    access-log line per request (:func:`access_text`, :func:`access_line`)."""

    def __init__(self, app: Any, metrics: ServerMetrics, access_log: str) -> None:
        self.app = app
        self.metrics = metrics
        self.access_log = access_log
        self.log = access_logger() if access_log != "off" else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        given = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        request_id = given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        token = REQUEST_IDS.set(request_id)
        status = 500  # an exception that escapes every handler

        async def send_with_id(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            REQUEST_IDS.reset(token)
            seconds = time.perf_counter() - started
            self.metrics.observe(scope["path"], status, seconds)
            if self.log is not None:
                fields = access_line(scope, status, seconds, request_id)
                text = json.dumps(fields) if self.access_log == "json" else access_text(fields)
                self.log.info(text)


def access_line(scope: Any, status: int, seconds: float, request_id: str) -> dict[str, Any]:
    """The access log's fields of one request."""
    client = scope.get("client") or ("", 0)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "request_id": request_id,
        "client": client[0],
        "method": scope["method"],
        "path": scope["path"],
        "status": status,
        "duration_ms": round(seconds * 1000, 2),
    }


def access_text(fields: dict[str, Any]) -> str:
    """An access-log line as people read them: ``TIME CLIENT "METHOD PATH" STATUS PHRASE
    DURATION [request ID]``."""
    try:
        phrase = http.HTTPStatus(fields["status"]).phrase
    except ValueError:
        phrase = ""
    return (
        f'{fields["time"]} {fields["client"]} "{fields["method"]} {fields["path"]}" '
        f"{fields['status']} {phrase} {fields['duration_ms']} ms [request {fields['request_id']}]"
    )
