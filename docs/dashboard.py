"""Draws docs/dashboard.png: the main panels of workers/grafana/reminders.json from real scrapes.

    .venv/bin/python docs/dashboard.py [--out docs/dashboard.png]

Grafana is not in Debian's packages, so the panels are drawn here instead, from the same series:
the demo business (``reminders demo``: outbox channels, an embedded Redis) runs through 36 hours
on the engine's clock (``REMINDERS_NOW``), one step an hour. Each hour: a scan, a dispatch and a
burst worker (none from 09:00 to 13:00 on the first day: a worker outage, while one worker stays
registered the rest of the time as a worker service would), delivery reports for the hour's text
messages through the webhook's own function (9 in 10 delivered, the rest undelivered with Twilio
30003 or 30005) and a STOP reply now and then; then one scrape with
:func:`reminders.metrics.collect`, parsed with ``prometheus_client.parser``. The series are drawn
as SVG in an HTML page and screenshotted by headless Chromium (Playwright), as the browser tests
do.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import random
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import sqlalchemy as sa  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from reminders import clock, consent, models, receipts  # noqa: E402
from reminders.app import App  # noqa: E402
from reminders.metrics import collect  # noqa: E402

START = datetime(2027, 3, 15, 0, tzinfo=UTC)  # a Monday, 00:00 UTC (20:00 in New York)
HOURS = 36
CUSTOMERS = 800  # more than the demo's 300 (its 555-01xx numbers run out near 1,000)
OUTAGE = range(13, 18)  # UTC hours with no worker: 09:00 to 13:00 in New York
CHROMIUM = "/usr/bin/chromium"
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]

Scrape = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(app: App) -> Scrape:
    found: Scrape = {}
    for family in text_string_to_metric_families(collect(app).decode()):
        for s in family.samples:
            found.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return found


def simulate(folder: Path) -> list[tuple[datetime, Scrape]]:
    from redis import Redis
    from rq import Queue, Worker

    from reminders import redis_conn
    from reminders.demo.run import run as run_demo
    from reminders.dispatch import dispatch, queue_names
    from reminders.jobs import resolve_queues, run_worker
    from reminders.scan import scan_all

    os.environ[clock.ENV] = clock.iso_utc(START)
    with contextlib.redirect_stdout(io.StringIO()):
        run_demo(folder, customers=CUSTOMERS)
    app = App(folder / "config.yaml")
    connection: Redis = redis_conn.connect(app.config)
    service = Worker(
        [Queue(q, connection=connection) for q in queue_names(app.config)],
        connection=connection,
        name="always-on",
    )
    logging.getLogger("reminders").addHandler(logging.NullHandler())
    logging.getLogger("reminders").propagate = False
    rng = random.Random(15)
    alive = False
    reported: set[int] = set()
    series = []
    for hour in range(HOURS + 1):
        now = START + timedelta(hours=hour)
        os.environ[clock.ENV] = clock.iso_utc(now)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            scan_all(app)
            dispatch(app, now)
            if hour in OUTAGE and alive:
                service.register_death()
                alive = False
            elif hour not in OUTAGE:
                if not alive:
                    service.register_birth()
                    alive = True
                queues = resolve_queues(app.config, ())
                run_worker(app, queues, burst=True, logging_level="ERROR")
        _reports(app, now, rng, reported)
        series.append((now, scrape(app)))
    service.register_death()
    redis_conn.embedded(app.config).stop(save=False)
    return series


def _reports(app: App, now: datetime, rng: random.Random, reported: set[int]) -> None:
    """The provider's delivery reports for the text messages sent since the last hour, and a
    STOP reply now and then, applied as the webhook applies them."""
    m = models.message
    with app.state.begin() as conn:
        rows = conn.execute(
            sa.select(m.c.id, m.c.provider_id, m.c.to_address).where(m.c.channel == "sms")
        ).all()
        for row in rows:
            if row.id in reported:
                continue
            reported.add(row.id)
            roll = rng.random()
            state, code = ("delivered", None)
            if roll > 0.9:
                state, code = ("undelivered", "30005" if roll > 0.97 else "30003")
            receipts.apply_report(conn, app.ruleset, row.provider_id, state, code, now)
            if rng.random() < 0.05:
                consent.opt_out(conn, "sms", row.to_address, consent.STOP, "replied STOP", now)


# --- drawing ----------------------------------------------------------------------------------


def values(series: list[tuple[datetime, Scrape]], name: str, key: str) -> dict[str, list[float]]:
    """A family's samples over time, summed by one label (``""``: the family's one series)."""
    found: dict[str, list[float]] = {}
    for index, (_at, got) in enumerate(series):
        for labels, value in got.get(name, {}).items():
            label = dict(labels).get(key, name) if key else name
            line = found.setdefault(label, [0.0] * len(series))
            line[index] += value
    return found


def increase(lines: dict[str, list[float]]) -> dict[str, list[float]]:
    """Per step, as PromQL's increase() over one step."""
    return {k: [0.0] + [max(0.0, b - a) for a, b in pairwise(v)] for k, v in lines.items()}


def chart(
    title: str,
    query: str,
    lines: dict[str, list[float]],
    hours: list[datetime],
    unit: str = "",
    threshold: float | None = None,
) -> str:
    width, height, left, right, bottom, top = 560, 230, 52, 28, 28, 10
    plot_w, plot_h = width - left - right, height - bottom - top
    peak = max([max(v) for v in lines.values()] + [threshold or 0, 1.0])
    peak *= 1.1

    def x(i: int) -> float:
        return left + plot_w * i / max(1, len(hours) - 1)

    def y(v: float) -> float:
        return top + plot_h * (1 - v / peak)

    def rule(v: float, style: str) -> str:
        return f'<line x1="{left}" x2="{width - right}" y1="{y(v):.1f}" y2="{y(v):.1f}" {style}/>'

    parts = [f'<svg width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">']
    for tick in range(5):
        v = peak * tick / 4
        parts.append(rule(v, 'stroke="#2a2e33"'))
        number = f"{v:.0f}" if peak >= 10 else f"{v:.1f}"
        text = f"{v / 60:.0f}m" if unit == "s" else number
        parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end">{text}</text>')
    for i, at in enumerate(hours):
        if at.hour % 6 == 0:
            parts.append(
                f'<text x="{x(i):.1f}" y="{height - 8}" text-anchor="middle">{at:%a %H:%M}</text>'
            )
    if threshold is not None:
        parts.append(rule(threshold, 'stroke="#d62728" stroke-dasharray="6 4"'))
    legend = []
    for n, (label, points) in enumerate(sorted(lines.items())):
        color = COLORS[n % len(COLORS)]
        path = " ".join(f"{x(i):.1f},{y(v):.1f}" for i, v in enumerate(points))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{path}"/>')
        legend.append(f'<span><i style="background:{color}"></i>{label}</span>')
    parts.append("</svg>")
    return (
        f'<div class="panel"><h2>{title}</h2><code>{query}</code>{"".join(parts)}'
        f'<div class="legend">{"".join(legend)}</div></div>'
    )


def page(series: list[tuple[datetime, Scrape]]) -> str:
    hours = [at for at, _ in series]
    panels = [
        chart(
            "Lateness of the oldest due reminder (alert at 15 min)",
            "reminders_oldest_due_unsent_seconds",
            values(series, "reminders_oldest_due_unsent_seconds", ""),
            hours,
            "s",
            900,
        ),
        chart(
            "Due and not sent, by rule",
            "reminders_due_unsent",
            values(series, "reminders_due_unsent", "rule"),
            hours,
        ),
        chart(
            "Reminders by status",
            "sum by (status) (reminders_reminders)",
            {
                k: v
                for k, v in values(series, "reminders_reminders", "status").items()
                if max(v) > 0
            },
            hours,
        ),
        chart(
            "Messages sent per hour, by channel",
            'sum by (channel) (increase(reminders_messages_total{outcome="sent"}[1h]))',
            increase(
                values(
                    _only(series, "reminders_messages_total", "outcome", "sent"),
                    "reminders_messages_total",
                    "channel",
                )
            ),
            hours,
        ),
        chart(
            "Delivery outcomes per hour",
            'sum by (outcome) (increase(reminders_messages_total{outcome!="sent"}[1h]))',
            increase(
                {
                    k: v
                    for k, v in values(series, "reminders_messages_total", "outcome").items()
                    if k != "sent"
                }
            ),
            hours,
        ),
        chart(
            "Live workers and queued jobs",
            "reminders_workers, reminders_queue_jobs",
            {
                "workers": values(series, "reminders_workers", "")["reminders_workers"],
                **values(series, "reminders_queue_jobs", "queue"),
            },
            hours,
        ),
        chart(
            "Provider errors per hour, by code",
            "sum by (code) (increase(reminders_provider_errors_total[1h]))",
            increase(values(series, "reminders_provider_errors_total", "code")),
            hours,
        ),
        chart(
            "Opt-outs, by source",
            "sum by (source) (reminders_opt_outs_total)",
            values(series, "reminders_opt_outs_total", "source"),
            hours,
        ),
    ]
    style = """
      body { background:#111217; color:#ccccdc; font:12px sans-serif; margin:16px; width:1160px; }
      h1 { font-size:18px; margin:0 0 4px } p { margin:0 0 12px; color:#8e8e9e }
      .grid { display:grid; grid-template-columns:repeat(2, 570px); gap:10px }
      .panel { background:#181b1f; border:1px solid #2a2e33; padding:6px 4px 4px }
      h2 { font-size:13px; margin:0 6px 2px } code { color:#6e9fff; margin:0 6px; font-size:10px }
      svg text { fill:#8e8e9e; font-size:10px }
      .legend span { margin:0 8px; white-space:nowrap } .legend i { display:inline-block;
        width:10px; height:3px; margin-right:4px; vertical-align:middle }
    """
    first, last = hours[0], hours[-1]
    return (
        f"<html><head><style>{style}</style></head><body><h1>reminders</h1>"
        f"<p>The demo business from {first:%a %d %b %H:%M} to {last:%a %d %b %H:%M} UTC, "
        "one scrape of GET /metrics an hour; no worker from 13:00 to 17:00 UTC on the first day. "
        "Drawn from the panels of workers/grafana/reminders.json (Grafana is not in Debian).</p>"
        f'<div class="grid">{"".join(panels)}</div></body></html>'
    )


def _only(
    series: list[tuple[datetime, Scrape]], name: str, key: str, value: str
) -> list[tuple[datetime, Scrape]]:
    return [
        (at, {name: {k: v for k, v in got.get(name, {}).items() if dict(k).get(key) == value}})
        for at, got in series
    ]


def shoot(html: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dashboard.html"
        path.write_text(html, encoding="utf-8")
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            tab = browser.new_page(viewport={"width": 1192, "height": 800})
            tab.goto(path.as_uri())
            tab.screenshot(path=str(out), full_page=True)
            browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        series = simulate(Path(tmp) / "demo")
    shoot(page(series), Path(args.out))
    print(f"wrote {args.out} ({len(series)} scrapes)")


if __name__ == "__main__":
    main()
