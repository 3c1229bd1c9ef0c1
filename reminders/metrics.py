"""Prometheus metrics computed at scrape time from the state DB and Redis.

Every series is read from shared state, not counted in one process, so one scrape of one console
counts the work of every worker and scheduler on every machine. The counters are counts of rows
the engine keeps (messages, opt-outs), so they only grow while those rows are kept; Prometheus'
``rate()`` treats a drop (rows deleted) as a counter reset.

Reminders by rule and status and messages by rule, channel, status and code are read from the
counts kept as the rows change (:mod:`reminders.counts`: a few dozen rows, however many reminders
and messages there are); the due and unsent reminders from the index of the reminders by status
and send time, one range a status, and the last scans with one indexed lookup a rule. The labels are
bounded: rules, statuses, channels, queues, provider error codes and opt-out sources; never a
customer, an address or a reminder.

Mount it with :func:`metrics_app` (a Flask blueprint, ``GET /metrics``) or print it with
``reminders metrics``; :func:`collect` returns the exposition as bytes.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import counts as reminder_counts
from . import lifecycle, models
from .pause import paused_rules

if TYPE_CHECKING:
    from flask import Blueprint
    from sqlalchemy.engine import Connection

    from .app import App

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Not sent yet although their send time has passed: waiting for a dispatch, in a queue, or with a
# worker. A reminder deferred (quiet hours, caps, a retry) has a later send_at and is not counted.
UNSENT = (lifecycle.PENDING, lifecycle.QUEUED, lifecycle.SENDING)
# The message statuses a provider reports (reminders_messages_total's outcome besides "sent").
REPORTED = ("delivered", "undelivered", "failed")
UNKNOWN_RULE = "unknown"  # a message whose rule was not kept (its reminder is gone)
# A label value read from a row must look like a code, or it is counted as "other": a provider
# that puts free text in its error code must not make a series a message.
_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")

r = models.reminder
m = models.message
o = models.optout
s = models.scan_run


def _code(value: str | None) -> str:
    if value is None:
        return "none"
    return value if _CODE.match(value) else "other"


def oldest_due_unsent(conn: Connection, now: datetime) -> tuple[dict[str, int], float]:
    """Reminders due and not sent, by rule, and the age in seconds of the oldest (0 when none).

    One query, on the index of the reminders by (status, send_at, rule), read alone: it reads
    the due ones of each unsent status only, however many are scheduled for later or done.
    """
    by_rule: dict[str, int] = {}
    oldest: datetime | None = None
    rows = conn.execute(
        sa.select(r.c.rule, sa.func.count(), sa.func.min(r.c.send_at))
        .where(r.c.status.in_([str(x) for x in UNSENT]), r.c.send_at <= now)
        .group_by(r.c.rule)
    )
    for rule, count, first in rows:
        by_rule[rule] = count
        if first is not None and (oldest is None or first < oldest):
            oldest = first
    age = 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())
    return by_rule, age


class StateCollector(Collector):
    """Every family, read when Prometheus scrapes."""

    def __init__(self, app: App) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        now = self.app.now()
        rules = self._rules()
        with self.app.state.connect() as conn:
            yield from self._reminders(conn, rules)
            yield from self._messages(conn)
            yield from self._lag(conn, rules, now)
            yield from self._scans(conn, rules)
            yield self._paused(conn, rules)
            yield self._opt_outs(conn)
            yield from self._outbox(conn, now)
        yield from self._redis()

    def _rules(self) -> list[str]:
        return sorted(rule.name for rule in self.app.ruleset.rules)

    def _reminders(self, conn: Connection, rules: list[str]) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "reminders_reminders", "Reminders by rule and status now", labels=["rule", "status"]
        )
        counts = {(rule, str(status)): 0 for rule in rules for status in lifecycle.STATUSES}
        counts.update(reminder_counts.reminders(conn))
        for (rule, status), n in sorted(counts.items()):
            family.add_metric([rule, status], n)
        yield family

    def _messages(self, conn: Connection) -> Iterator[Metric]:
        messages = CounterMetricFamily(
            "reminders_messages",
            "Messages by outcome: sent = accepted by the provider (every message), "
            "delivered/undelivered/failed = as the provider reported later",
            labels=["rule", "channel", "outcome"],
        )
        errors = CounterMetricFamily(
            "reminders_provider_errors",
            "Messages the provider reported with an error code, by channel and code",
            labels=["channel", "code"],
        )
        totals: dict[tuple[str, str, str], int] = {}
        codes: dict[tuple[str, str], int] = {}
        for (rule, channel, status, code), n in reminder_counts.messages(conn).items():
            rule = rule or UNKNOWN_RULE
            for outcome in ("sent", *REPORTED):
                totals.setdefault((rule, channel, outcome), 0)
            totals[(rule, channel, "sent")] += n
            if status in REPORTED:
                totals[(rule, channel, status)] += n
            if code is not None:
                key = (channel, _code(code))
                codes[key] = codes.get(key, 0) + n
        for labels, n in sorted(totals.items()):
            messages.add_metric(list(labels), n)
        for labels2, n in sorted(codes.items()):
            errors.add_metric(list(labels2), n)
        yield messages
        yield errors

    def _lag(self, conn: Connection, rules: list[str], now: datetime) -> Iterator[Metric]:
        by_rule, age = oldest_due_unsent(conn, now)
        due = GaugeMetricFamily(
            "reminders_due_unsent",
            "Reminders whose send time has passed and that are not sent (pending, queued, sending)",
            labels=["rule"],
        )
        for rule in sorted(set(rules) | set(by_rule)):
            due.add_metric([rule], by_rule.get(rule, 0))
        yield due
        yield GaugeMetricFamily(
            "reminders_oldest_due_unsent_seconds",
            "How long ago the send time of the oldest due and unsent reminder passed (0: none)",
            value=age,
        )

    def _scans(self, conn: Connection, rules: list[str]) -> Iterator[Metric]:
        last = GaugeMetricFamily(
            "reminders_scan_last_success_timestamp_seconds",
            "When the last successful scan of a rule finished (Unix time)",
            labels=["rule"],
        )
        duration = GaugeMetricFamily(
            "reminders_scan_duration_seconds",
            "How long the last successful scan of a rule took",
            labels=["rule"],
        )
        rows = GaugeMetricFamily(
            "reminders_scan_rows",
            "Rows the last successful scan of a rule read from the business DB",
            labels=["rule"],
        )
        # The latest successful run of each rule, found backwards on the (rule, started_at) index:
        # a few rows read, however many runs are kept.
        for rule in rules:
            run = conn.execute(
                sa.select(s.c.rule, s.c.started_at, s.c.finished_at, s.c.rows)
                .where(s.c.rule == rule, s.c.status == "done", s.c.finished_at.is_not(None))
                .order_by(s.c.started_at.desc(), s.c.id.desc())
                .limit(1)
            ).first()
            if run is None:
                continue
            last.add_metric([run.rule], run.finished_at.timestamp())
            duration.add_metric([run.rule], (run.finished_at - run.started_at).total_seconds())
            rows.add_metric([run.rule], run.rows)
        yield last
        yield duration
        yield rows

    def _paused(self, conn: Connection, rules: list[str]) -> Metric:
        family = GaugeMetricFamily(
            "reminders_rule_paused", "1 when a rule is paused, else 0", labels=["rule"]
        )
        paused = paused_rules(conn)
        for rule in sorted(set(rules) | paused):
            family.add_metric([rule], 1 if rule in paused else 0)
        return family

    def _opt_outs(self, conn: Connection) -> Metric:
        family = CounterMetricFamily(
            "reminders_opt_outs",
            "Addresses opted out or suppressed, by channel and source (stop, unsubscribe, a "
            "provider's code)",
            labels=["channel", "source"],
        )
        counts: dict[tuple[str, str], int] = {}
        for channel, source, n in conn.execute(
            sa.select(o.c.channel, o.c.source, sa.func.count()).group_by(o.c.channel, o.c.source)
        ):
            key = (channel, _code(source))
            counts[key] = counts.get(key, 0) + n
        for labels, n in sorted(counts.items()):
            family.add_metric(list(labels), n)
        return family

    def _outbox(self, conn: Connection, now: datetime) -> Iterator[Metric]:
        """Write-back and webhooks per destination (writeback:consent, writeback:<rule>,
        webhook:<key of its URL>): what waits, what was given up, and how long and how often
        the oldest waiting event has failed (a statement that keeps failing shows here)."""
        from . import outbox

        if not self.app.config.outbox_used:
            return
        names = ["destination"]
        pending = GaugeMetricFamily(
            "reminders_outbox_pending", "Events waiting to be delivered", labels=names
        )
        given_up = GaugeMetricFamily(
            "reminders_outbox_failed", "Webhook events given up (3 days of failures)", labels=names
        )
        age = GaugeMetricFamily(
            "reminders_outbox_oldest_pending_seconds",
            "Age of the oldest waiting event (0 when none)",
            labels=names,
        )
        attempts = GaugeMetricFamily(
            "reminders_outbox_oldest_attempts",
            "Failed attempts of the oldest waiting event (more than 0: it is being retried)",
            labels=names,
        )
        for entry in outbox.summary(conn, self.app.config):
            label = [entry["destination"]]
            pending.add_metric(label, entry[outbox.PENDING])
            given_up.add_metric(label, entry[outbox.FAILED])
            oldest = entry.get("oldest_created") if entry[outbox.PENDING] else None
            age.add_metric(label, max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
            attempts.add_metric(label, entry["attempts"] if entry[outbox.PENDING] else 0)
        yield from (pending, given_up, age, attempts)

    def _redis(self) -> Iterator[Metric]:
        from rq import Queue, Worker

        from . import redis_conn
        from .dispatch import queue_names

        config = self.app.config
        # A scrape never starts the embedded Redis: when it is not running, nothing is queued
        # and no worker is live.
        running = bool(config.redis.url) or redis_conn.embedded(config).running()
        connection = redis_conn.connect(config) if running else None
        queues = GaugeMetricFamily(
            "reminders_queue_jobs", "Jobs waiting in an RQ queue", labels=["queue"]
        )
        for name in queue_names(config):
            waiting = Queue(name, connection=connection).count if connection is not None else 0
            queues.add_metric([name], waiting)
        yield queues
        live = len(Worker.all(connection=connection)) if connection is not None else 0
        yield GaugeMetricFamily(
            "reminders_workers", "Live RQ workers (registered and not expired)", value=live
        )


def registry(app: App) -> CollectorRegistry:
    """A private registry holding only the state collector (no process metrics of the console)."""
    found = CollectorRegistry(auto_describe=False)
    found.register(StateCollector(app))
    return found


def collect(app: App) -> bytes:
    """The exposition in Prometheus' text format, read now."""
    return generate_latest(registry(app))


def metrics_app(app: App) -> Blueprint:
    """A Flask blueprint answering ``GET /metrics``: ``flask.register_blueprint(metrics_app(app))``.

    With ``console.metrics_key`` set, it answers only ``Authorization: Bearer <key>`` (401
    otherwise).
    """
    from flask import Blueprint, Response, request

    key = app.config.console.metrics_key
    blueprint = Blueprint("metrics", __name__)
    held = registry(app)

    @blueprint.get("/metrics")
    def metrics() -> Any:
        if key:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return Response(
                    "a bearer key is required\n",
                    401,
                    {"WWW-Authenticate": "Bearer", "Content-Type": "text/plain"},
                )
        return Response(generate_latest(held), 200, {"Content-Type": CONTENT_TYPE})

    return blueprint
