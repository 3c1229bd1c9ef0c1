"""Metrics that exist only inside one process: how long provider calls, renders and scan phases
take, as histograms.

The shared counts (reminders, messages, queues, scans) are read from the state DB and Redis by
``GET /metrics`` (:mod:`reminders.metrics`). These are timings only the process that spent the
time knows, so each process serves its own: ``reminders worker --metrics-port P`` and
``reminders scheduler --metrics-port P`` answer ``GET /metrics`` on ``127.0.0.1:P``
(``--metrics-host`` to bind another address); Prometheus scrapes each process. A worker runs
jobs in its own process (:class:`reminders.jobs.DeliveryWorker`), so one process's registry holds
all of its jobs' timings and the library's multiprocess mode is not needed. Without
``--metrics-port`` the histograms are kept in memory (a few kilobytes) and served by no one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Histogram, start_http_server

# Seconds: a provider answers in tens to hundreds of milliseconds; a stuck one hits the timeouts.
_CALL_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

SEND_SECONDS = Histogram(
    "reminders_send_seconds",
    "Seconds one provider call took to send one message (Twilio request, SMTP transaction)",
    ["channel"],
    buckets=_CALL_BUCKETS,
)
RENDER_SECONDS = Histogram(
    "reminders_render_seconds",
    "Seconds rendering one message's template took",
    ["channel"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
SCAN_PHASE_SECONDS = Histogram(
    "reminders_scan_phase_seconds",
    "Seconds a scan of a rule spent in a phase: load (its known reminders), query (reading the "
    "business DB), apply (creating and moving reminders), compare (a full scan: finding the "
    "vanished occurrences), cancel (canceling them)",
    ["rule", "phase"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)


@contextmanager
def timed(histogram: Histogram, *labels: str) -> Iterator[None]:
    """Observe the seconds the block took (also when it raises)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        histogram.labels(*labels).observe(time.perf_counter() - start)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Answer ``GET /metrics`` with this process's metrics on ``host:port``, in a thread."""
    start_http_server(port, addr=host)
