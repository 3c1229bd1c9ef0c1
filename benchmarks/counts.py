"""Benchmark: keeping the counts by rule and status while several workers change reminders at once.

    .venv/bin/python benchmarks/counts.py [--pg postgresql+psycopg://postgres@127.0.0.1/postgres]
                                          [--workers 1 2 4] [--changes 2000]

Creates a throw-away PostgreSQL database, migrates it and inserts ``--changes`` pending reminders
of one rule per worker process. Each worker then moves its own reminders ``pending -> queued``,
one reminder a transaction (the worst case: a batch of 100 pays the counts once), the way claims
and sends commit, through :func:`reminders.lifecycle.move` (which adds its change to the counts,
:mod:`reminders.counts`: insert-only rows). Three runs per worker count, each on fresh reminders:

- ``none``: the same UPDATE and event insert with no counts kept (the baseline);
- ``kept``: as shipped, the counts' rows inserted in the same transaction;
- ``one row``: the alternative the design avoids, one ``UPDATE ... SET n = n + 1`` per
  (rule, status) row, on which concurrent workers wait for one another's commit.

Prints changes/s over all workers and the time transactions spent waiting on locks (sampled from
``pg_stat_activity``), and checks the kept counts against ``COUNT(*)`` at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
import uuid
from datetime import UTC, datetime

import sqlalchemy as sa

from reminders import counts, lifecycle, models, state_db

NOW = datetime(2027, 3, 10, 15, tzinfo=UTC)
RULE = "refill-due"


def _fill(url: str, n: int, tag: str) -> list[int]:
    engine = state_db.engine_for(url)
    rows = [
        {
            "rule": RULE,
            "occurrence": f"{tag}-{i}",
            "offset": "0d",
            "customer_id": str(i),
            "planned_at": NOW,
            "send_at": NOW,
            "status": "pending",
            "data": "{}",
            "row_hash": "0" * 32,
            "created_at": NOW,
            "updated_at": NOW,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        conn.execute(models.reminder.insert(), rows)
        counts.created(conn, RULE, "pending", n)
        found = conn.execute(
            sa.select(models.reminder.c.id).where(models.reminder.c.occurrence.like(f"{tag}-%"))
        )
        return sorted(row.id for row in found)


def _one_row_moved(
    conn: sa.Connection, left: dict[tuple[str, str], int], target: str, now: datetime
) -> None:
    """The design not taken: one row a (rule, status), updated in place."""
    t = sa.table("bench_one_row", sa.column("rule"), sa.column("status"), sa.column("n"))
    for (rule, status), n in sorted(left.items()):
        for key, delta in sorted({status: -n, target: n}.items()):
            conn.execute(
                sa.update(t).where(t.c.rule == rule, t.c.status == key).values(n=t.c.n + delta)
            )


def _worker(url: str, ids: list[int], mode: str, start: float) -> float:
    state_db.dispose_engines()
    engine = state_db.engine_for(url)
    original = counts.moved
    if mode == "none":
        counts.moved = lambda conn, left, target, now: None  # type: ignore[assignment]
    elif mode == "one row":
        counts.moved = _one_row_moved  # type: ignore[assignment]
    while time.time() < start:
        time.sleep(0.001)
    began = time.perf_counter()
    for rid in ids:
        with engine.begin() as conn:
            lifecycle.move(conn, [rid], source="pending", target="queued", now=NOW)
    counts.moved = original  # type: ignore[assignment]
    return time.perf_counter() - began


def _waits(url: str, stop: multiprocessing.synchronize.Event, out: multiprocessing.Queue) -> None:
    """Sample how many backends wait on a lock, every 5 ms."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    samples = []
    with engine.connect() as conn:
        while not stop.is_set():
            samples.append(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                ).scalar_one()
            )
            time.sleep(0.005)
    out.put(samples)


def run(url: str, workers: int, changes: int, mode: str) -> tuple[float, float]:
    tag = uuid.uuid4().hex[:6]
    batches = [_fill(url, changes, f"{tag}{k}") for k in range(workers)]
    stop = multiprocessing.Event()
    sampled: multiprocessing.Queue = multiprocessing.Queue()
    watcher = multiprocessing.Process(target=_waits, args=(url, stop, sampled))
    watcher.start()
    start = time.time() + 1.0
    with multiprocessing.Pool(workers) as pool:
        spent = pool.starmap(_worker, [(url, ids, mode, start) for ids in batches])
    stop.set()
    samples = sampled.get()
    watcher.join()
    if mode != "kept":  # the moves the kept counts did not see, added at once
        with state_db.engine_for(url).begin() as conn:
            counts.moved(conn, {(RULE, "pending"): workers * changes}, "queued", NOW)
    rate = workers * changes / max(spent)
    waiting = statistics.mean(samples) if samples else 0.0
    return rate, waiting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--changes", type=int, default=2000, help="moves per worker")
    args = parser.parse_args()
    name = f"reminders_bench_counts_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{args.pg.rsplit('/', 1)[0]}/{name}"
    try:
        state_db.upgrade(url)
        with state_db.engine_for(url).begin() as conn:
            conn.exec_driver_sql("CREATE TABLE bench_one_row (rule text, status text, n bigint)")
            conn.execute(
                sa.text("INSERT INTO bench_one_row VALUES (:r, :s, 0)"),
                [{"r": RULE, "s": str(s)} for s in lifecycle.STATUSES],
            )
        print(f"{'workers':>7} {'counts':>8} {'changes/s':>10} {'backends waiting on a lock':>27}")
        for workers in args.workers:
            for mode in ("none", "kept", "one row"):
                rate, waiting = run(url, workers, args.changes, mode)
                print(f"{workers:7d} {mode:>8} {rate:10,.0f} {waiting:27.2f}")
        with state_db.engine_for(url).connect() as conn:
            kept = counts.REMINDERS.totals(conn)
            assert kept == counts.REMINDERS.count_rows(conn), "the kept counts drifted"
        print(f"kept counts equal COUNT(*): {dict(kept)}")
    finally:
        state_db.dispose_engines()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
