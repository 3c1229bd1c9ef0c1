"""Benchmark: one ``GET /metrics`` scrape over a state DB of a million reminders on PostgreSQL.

    .venv/bin/python benchmarks/metrics.py [--reminders 1000000] [--pg postgresql+psycopg://...]
                                           [--redis redis://127.0.0.1:6379/15]

Creates a throw-away PostgreSQL database (dropped afterwards), migrates it, and fills it in the
database itself (``generate_series``): ``--reminders`` reminders over the 5 example rules, in the
proportions of a running engine (most delivered, sent or canceled; some pending for later; a
thousand due and not sent), a message row for each one sent (status as the provider reported,
30003/30005 on the undelivered), 20,000 opt-outs and 100,000 scan runs; then ``VACUUM ANALYZE``,
as autovacuum would. Scrapes with the engine's own collector (:func:`reminders.metrics.collect`,
Redis included) ``--repeat`` times after one warm-up, and prints the median and the slowest, with
a baseline from the same run: ``SELECT count(*)`` of the reminders. Target: under 250 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reminders import counts as kept_counts  # noqa: E402
from reminders import state_db  # noqa: E402
from reminders.app import App  # noqa: E402
from reminders.metrics import collect  # noqa: E402

RULES = ("bill-due", "duplicate-purchase", "order-follow-up", "refill-due", "renewal-due")
TARGET_MS = 250.0
FILL = [
    # reminders: the status by id % 100, a due-unsent one every 1,000th
    """
    INSERT INTO reminders_reminder (id, rule, occurrence, "offset", customer_id, planned_at,
        send_at, status, channel, channel_index, attempts, data, row_hash, created_at, updated_at)
    SELECT i, (ARRAY{rules})[1 + i % 5], i::text, '0d', (i % 200000)::text,
        ts, ts,
        CASE WHEN i % 1000 = 0 THEN 'pending'
             WHEN i % 100 < 40 THEN 'delivered' WHEN i % 100 < 55 THEN 'sent'
             WHEN i % 100 < 70 THEN 'canceled' WHEN i % 100 < 73 THEN 'undelivered'
             WHEN i % 100 < 75 THEN 'failed' ELSE 'pending' END,
        CASE WHEN i % 3 = 0 THEN 'email' ELSE 'sms' END, 0, 1, '{{}}', 'x', now(), now()
    FROM (
        SELECT i, CASE WHEN i % 1000 = 0 THEN now() - (i % 3600) * interval '1 second'
                       WHEN i % 100 >= 75 THEN now() + (i % 86400) * interval '1 second'
                       ELSE now() - (i % 8640000) * interval '1 second' END AS ts
        FROM generate_series(1, {n}) AS i
    ) AS g
    """,
    """
    INSERT INTO reminders_message (reminder_id, channel, to_address, provider_id, status,
        error_code, segments, created_at, updated_at)
    SELECT id, channel, '+1212555' || lpad((id % 10000)::text, 4, '0'), 'SM' || id, status,
        CASE WHEN status = 'undelivered' THEN (ARRAY['30003', '30005'])[1 + id % 2] END, 1,
        send_at, send_at
    FROM reminders_reminder WHERE status IN ('sent', 'delivered', 'undelivered')
    """,
    """
    INSERT INTO reminders_optout (channel, address, customer_id, source, reason, created_at)
    SELECT CASE WHEN i % 4 = 0 THEN 'email' ELSE 'sms' END, 'a' || i, i::text,
        (ARRAY['stop', '21610', '30005', 'unsubscribe'])[1 + i % 4], 'bench', now()
    FROM generate_series(1, 20000) AS i
    """,
    """
    INSERT INTO reminders_scan_run (rule, started_at, finished_at, status, rows)
    SELECT (ARRAY{rules})[1 + i % 5], now() - (100000 - i) * interval '5 minutes',
        now() - (100000 - i) * interval '5 minutes' + interval '3 seconds',
        CASE WHEN i % 50 = 0 THEN 'failed' ELSE 'done' END, 200000
    FROM generate_series(1, 100000) AS i
    """,
]


def project(folder: Path, state_url: str, redis_url: str) -> Path:
    """The repository's example config, rules, templates and digest, on the benchmark's state DB."""
    shutil.copytree(ROOT / "rules", folder / "rules")
    shutil.copytree(ROOT / "templates", folder / "templates")
    shutil.copytree(ROOT / "examples", folder / "examples")  # the config's daily digest
    text = (ROOT / "config.yaml").read_text()
    text = text.replace("url: sqlite:///reminders.db", f"url: {state_url}")
    text = text.replace(
        "# redis:\n#   url: redis://127.0.0.1:6379/0", f"redis:\n  url: {redis_url}"
    )
    config = folder / "config.yaml"
    config.write_text(text)
    return config


def timed(fn: object, repeat: int) -> list[float]:
    """Milliseconds of each of ``repeat`` calls of ``fn`` (after one warm-up call)."""
    assert callable(fn)
    fn()
    spent = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        spent.append((time.perf_counter() - start) * 1000)
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reminders", type=int, default=1_000_000)
    parser.add_argument(
        "--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres", metavar="URL"
    )
    parser.add_argument(
        "--redis",
        default=f"redis://127.0.0.1:{os.environ.get('REMINDERS_TEST_REDIS_PORT', '6379')}/15",
        metavar="URL",
    )
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument(
        "--keep", action="store_true", help="keep the filled database (its URL is printed)"
    )
    parser.add_argument("--reuse", metavar="URL", help="scrape a database a --keep run filled")
    args = parser.parse_args()
    if args.reuse:
        with tempfile.TemporaryDirectory() as tmp:
            scrape_and_report(Path(tmp), args.reuse, args)
        return

    name = f"reminders_bench_metrics_{uuid.uuid4().hex[:8]}"
    admin = sa.create_engine(args.pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = f"{args.pg.rsplit('/', 1)[0]}/{name}"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            run(Path(tmp), url, args)
    finally:
        state_db.dispose_engines(url)
        if args.keep:
            print(f"kept: {url}")
        else:
            with admin.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def run(folder: Path, url: str, args: argparse.Namespace) -> None:
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    rules = "[" + ", ".join(f"'{r}'" for r in RULES) + "]"
    start = time.perf_counter()
    with engine.begin() as conn:
        for statement in FILL:
            conn.exec_driver_sql(statement.format(rules=rules, n=args.reminders).replace("%", "%%"))
        # Written in SQL, not by the engine: counted as migration 0012 counts existing rows.
        kept_counts.rebuild(conn)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM ANALYZE")
        counts = {
            table: conn.exec_driver_sql(f"SELECT count(*) FROM reminders_{table}").scalar_one()
            for table in ("reminder", "message", "optout", "scan_run")
        }
    print(f"filled in {time.perf_counter() - start:.1f} s: {counts}")
    scrape_and_report(folder, url, args)


def scrape_and_report(folder: Path, url: str, args: argparse.Namespace) -> None:
    engine = state_db.engine_for(url)
    with engine.connect() as conn:
        reminders = conn.exec_driver_sql("SELECT count(*) FROM reminders_reminder").scalar_one()
    state_db.upgrade(url)
    app = App(project(folder, url, args.redis))

    def baseline() -> None:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT count(*) FROM reminders_reminder").scalar_one()

    def scrape() -> None:
        collect(app)

    base = timed(baseline, args.repeat)
    spent = timed(scrape, args.repeat)
    size = len(collect(app))
    print(
        f"baseline SELECT count(*) of {reminders:,} reminders: "
        f"median {statistics.median(base):.1f} ms, max {max(base):.1f} ms"
    )
    print(
        f"scrape ({size:,} bytes of exposition): median {statistics.median(spent):.1f} ms, "
        f"max {max(spent):.1f} ms over {args.repeat} scrapes "
        f"({statistics.median(spent) / statistics.median(base):.1f}x the baseline)"
    )
    verdict = "holds" if statistics.median(spent) < TARGET_MS else "MISSED"
    print(f"target: median scrape under {TARGET_MS:.0f} ms: {verdict}")


if __name__ == "__main__":
    main()
