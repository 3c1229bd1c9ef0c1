"""Retention benchmark: how fast ``prune`` deletes a million finished reminders, batch by batch.

    .venv/bin/python benchmarks/prune.py [--reminders 1000000] [--pg URL | --no-pg]
                                         [--batch-size 1000] [--no-baseline] [--no-sqlite]

Fills a fresh state DB (SQLite always; PostgreSQL too unless ``--no-pg``: a throw-away database
on the ``--pg`` server, dropped afterwards) in the database itself: ``--reminders`` delivered
reminders last changed a year before the benchmark's now, each with one message and three events
(pending to queued, queued to sending, sending to sent), and as many pending ones that must stay.
Then prunes with the engine's own :func:`reminders.prune.prune`, one batch a call (as the
scheduler's bounded share would), timing each batch, and prints reminders deleted per second,
rows (reminders, messages and events) per second, and the median and slowest batch: how long a
batch holds its locks. The baseline, from the same run on a second fill: the same rows deleted by
three bare ``DELETE`` statements in one transaction (what pruning avoids: one huge transaction).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reminders import prune, state_db  # noqa: E402

NOW = datetime(2027, 3, 10, 12, tzinfo=UTC)
OLD = NOW - timedelta(days=365)
RETENTION = timedelta(days=180)
GRACES = {"refill-due": timedelta(days=1)}

# SQLite and PostgreSQL: the numbers 1..n, then the rows made from them in the database itself.
SERIES = {
    "sqlite": "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < {n}) "
    "SELECT i FROM s",
    "postgresql": "SELECT i FROM generate_series(1, {n}) AS i",
}


def fill(engine: sa.Engine, n: int) -> None:
    """``n`` old delivered reminders (ids 1..n) with a message and three events each, and ``n``
    pending ones (ids n+1..2n) that must stay."""
    dialect = engine.dialect.name
    old = OLD.replace(tzinfo=None) if dialect == "sqlite" else OLD
    series = SERIES[dialect].format(n=2 * n)
    with engine.begin() as conn:
        conn.execute(
            sa.text(
                'INSERT INTO reminders_reminder (id, rule, occurrence, "offset", customer_id, '
                "planned_at, send_at, status, channel, channel_index, attempts, data, row_hash, "
                "created_at, updated_at) "
                "SELECT i, 'refill-due', CAST(i AS TEXT), '-3d', CAST(i % 200000 AS TEXT), "
                ":old, :old, CASE WHEN i <= :n THEN 'delivered' ELSE 'pending' END, 'sms', 0, 1, "
                f"'{{}}', 'x', :old, :old FROM ({series}) AS g"
            ),
            {"old": old, "n": n},
        )
        ids = SERIES[dialect].format(n=n)
        conn.execute(
            sa.text(
                "INSERT INTO reminders_message (reminder_id, channel, rule, to_address, "
                "provider_id, status, segments, created_at, updated_at) "
                "SELECT i, 'sms', 'refill-due', '+1212555' || CAST(i % 10000 AS TEXT), "
                f"'SM' || CAST(i AS TEXT), 'delivered', 1, :old, :old FROM ({ids}) AS g"
            ),
            {"old": old},
        )
        for source, target in (("pending", "queued"), ("queued", "sending"), ("sending", "sent")):
            conn.execute(
                sa.text(
                    "INSERT INTO reminders_event (reminder_id, at, from_status, to_status) "
                    f"SELECT i, :old, '{source}', '{target}' FROM ({ids}) AS g"
                ),
                {"old": old},
            )
    with engine.connect() as conn:
        conn = conn.execution_options(isolation_level="AUTOCOMMIT")
        conn.exec_driver_sql("ANALYZE" if dialect == "sqlite" else "VACUUM ANALYZE")


def pruned_in_batches(engine: sa.Engine, batch_size: int) -> tuple[float, list[float], int]:
    """Prune one batch a call until nothing is left: (seconds, each batch's seconds, rows)."""
    spans: list[float] = []
    rows = 0
    start = time.perf_counter()
    while True:
        began = time.perf_counter()
        done = prune.prune(engine, NOW, RETENTION, GRACES, batch_size=batch_size, max_batches=1)
        spans.append(time.perf_counter() - began)
        rows += done.reminders + done.messages + done.events
        if not done.more:
            break
    return time.perf_counter() - start, spans, rows


def baseline(engine: sa.Engine, n: int) -> float:
    """Seconds to delete the same rows with three statements in one transaction."""
    start = time.perf_counter()
    with engine.begin() as conn:
        for table in ("reminders_event", "reminders_message"):
            conn.execute(sa.text(f"DELETE FROM {table} WHERE reminder_id <= :n"), {"n": n})
        conn.execute(sa.text("DELETE FROM reminders_reminder WHERE id <= :n"), {"n": n})
    return time.perf_counter() - start


def measure(name: str, make_url: object, args: argparse.Namespace) -> None:
    assert callable(make_url)
    n = args.reminders
    url = make_url()
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    began = time.perf_counter()
    fill(engine, n)
    print(f"{name}: filled {n:,} delivered + {n:,} pending in {time.perf_counter() - began:.0f} s")
    counted = prune.count(engine, NOW, RETENTION, GRACES)
    assert (counted.reminders, counted.messages, counted.events) == (n, n, 3 * n), counted
    seconds, spans, rows = pruned_in_batches(engine, args.batch_size)
    with engine.connect() as conn:
        left = conn.execute(sa.text("SELECT count(*) FROM reminders_reminder")).scalar_one()
    assert left == n, f"{left} reminders left, expected the {n} pending ones"
    first, last = (statistics.median(s * 1000 for s in part) for part in (spans[:20], spans[-20:]))
    spans_ms = sorted(s * 1000 for s in spans)
    print(
        f"{name}: prune {n:,} reminders ({rows:,} rows) in {seconds:.1f} s: "
        f"{n / seconds:,.0f} reminders/s, {rows / seconds:,.0f} rows/s; "
        f"{len(spans)} batches of {args.batch_size}, median {statistics.median(spans_ms):.0f} ms, "
        f"slowest {spans_ms[-1]:.0f} ms (the first 20: median {first:.0f} ms, the last 20: "
        f"{last:.0f} ms)"
    )
    if not args.no_baseline:
        url = make_url()
        state_db.upgrade(url)
        engine = state_db.engine_for(url)
        fill(engine, n)
        plain = baseline(engine, n)
        print(
            f"{name}: baseline, one transaction of 3 DELETEs: {plain:.1f} s, "
            f"{n / plain:,.0f} reminders/s ({seconds / plain:.1f}x the batched prune's speed)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reminders", type=int, default=1_000_000)
    parser.add_argument("--batch-size", type=int, default=prune.BATCH)
    parser.add_argument(
        "--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", metavar="URL"
    )
    parser.add_argument("--no-pg", action="store_true")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--no-baseline", action="store_true")
    args = parser.parse_args()
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            made = iter(range(2))
            measure("sqlite", lambda: f"sqlite:///{tmp}/state{next(made)}.db", args)
    if args.no_pg:
        return
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def database() -> str:
        name = f"prune_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return f"{args.pg.rsplit('/', 1)[0]}/{name}"

    try:
        measure("postgresql", database, args)
    finally:
        state_db.dispose_engines()
        with admin.connect() as conn:
            for name in names:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
