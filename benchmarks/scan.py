"""Scan benchmark: how fast a first scan and an unchanged rescan are, against a plain insert.

    .venv/bin/python benchmarks/scan.py [--rows N] [--pg URL] [--mysql URL] [--offsets -3d,0d]

Builds a business DB of N prescriptions (default 1,000,000) joined to their patients, runs
``reminders scan`` on it twice (the second time nothing changed), each in a child process so its
peak RSS is the scan's own, and as the baseline inserts as many reminder rows (the same columns, the
same shape of values) into a fresh state DB with plain SQLAlchemy ``insert()`` executemany, in
batches of the scan's size, each batch its own transaction. SQLite always; PostgreSQL too when
``--pg`` names a server (a URL whose user may create databases: throw-away databases are made
there and dropped afterwards); MySQL or MariaDB too when ``--mysql`` names one
(``mysql://root@127.0.0.1/test``), once with each driver of ``--mysql-drivers`` (mysqlclient and
PyMySQL by default; PyMySQL is no dependency of the package: ``pip install pymysql`` first), the
state DB on SQLite (the engine's tables are not kept in MySQL). For each driver it also times
reading the rule's rows alone (``business_db.stream_rows``, no state DB), where the driver's
own cost shows.

Targets on a 2-core machine: the first scan at least half the baseline's speed, the unchanged
rescan at least 3 times faster than the first scan, peak RSS under 300 MB at 1M rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from pathlib import Path

import sqlalchemy as sa

NOW = "2027-03-10T12:00:00Z"
ZONES = (None, "America/Chicago", "Europe/Berlin", "America/Los_Angeles", None)
DRUGS = ("Lisinopril", "Metformin", "Atorvastatin", "Amlodipine", "Omeprazole")
BATCH = 2000  # the scan's own batch (business_db.stream)

RULE = """\
rules:
  - name: refill-due
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
      WHERE rx.refills_left > 0
    occurrence: "{{{{ rx_id }}}}"
    due: runs_out_on
    offsets: [{offsets}]
    at: "10:00"
    channels: [sms, email]
    template: refill-due
"""

CONFIG = """\
timezone: America/New_York
source:
  url: {source}
state:
  url: {state}
channels:
  sms:
    provider: outbox
  email:
    provider: outbox
"""


# --- the business DB ------------------------------------------------------------------------------


def _patients(n: int) -> Iterator[tuple[object, ...]]:
    for i in range(1, n + 1):
        yield (
            i,
            f"Patient{i}",
            f"+1500555{i % 10000:04d}",
            f"patient{i}@example.com",
            ZONES[i % len(ZONES)],
        )


def _prescriptions(n: int, patients: int) -> Iterator[tuple[object, ...]]:
    first = date(2027, 3, 14)
    for i in range(1, n + 1):
        yield (
            i,
            1 + i % patients,
            DRUGS[i % len(DRUGS)],
            first + timedelta(days=i % 60),
            1 + i % 3,
        )


def build_sqlite(path: Path, rows: int) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.executescript(
        """
        PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
        CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT,
                               timezone TEXT);
        CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL,
                                    drug_name TEXT NOT NULL, runs_out_on DATE,
                                    refills_left INTEGER NOT NULL);
        """
    )
    patients = max(1, rows // 2)
    conn.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)", _patients(patients))
    conn.executemany(
        "INSERT INTO prescriptions VALUES (?, ?, ?, ?, ?)",
        ((i, p, d, due.isoformat(), r) for i, p, d, due, r in _prescriptions(rows, patients)),
    )
    conn.commit()
    conn.close()


def build_postgresql(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, "
            "email TEXT, timezone TEXT)"
        )
        conn.exec_driver_sql(
            "CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL, "
            "drug_name TEXT NOT NULL, runs_out_on DATE, refills_left INTEGER NOT NULL)"
        )
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        patients = max(1, rows // 2)
        with cursor.copy("COPY patients FROM STDIN") as copy:
            for row in _patients(patients):
                copy.write_row(row)
        with cursor.copy("COPY prescriptions FROM STDIN") as copy:
            for row in _prescriptions(rows, patients):
                copy.write_row(row)
        conn.exec_driver_sql("ANALYZE patients")
        conn.exec_driver_sql("ANALYZE prescriptions")
    engine.dispose()


def build_mysql(url: str, rows: int) -> None:
    from reminders import mysql

    engine = sa.create_engine(mysql.engine_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, "
            "email TEXT, timezone TEXT)"
        )
        conn.exec_driver_sql(
            "CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL, "
            "drug_name TEXT NOT NULL, runs_out_on DATE, refills_left INTEGER NOT NULL)"
        )
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        patients = max(1, rows // 2)
        for table, made in (
            ("patients", _patients(patients)),
            ("prescriptions", _prescriptions(rows, patients)),
        ):
            insert = f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s)"
            # The driver makes one multi-row INSERT a batch. Never the whole table in memory: a
            # measured child's peak RSS starts from this process's (Linux keeps it across exec).
            while batch := list(itertools.islice(made, 10_000)):
                cursor.executemany(insert, batch)
        conn.exec_driver_sql("ANALYZE TABLE patients, prescriptions")
    engine.dispose()


# --- measured children ----------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from reminders.cli import main
    started = time.perf_counter()
    cpu_started = time.process_time()
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = time.process_time() - cpu_started
    result = {"code": code, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu}
    print(json.dumps(result), file=sys.stderr)
    """
)

_BASELINE = textwrap.dedent(
    """
    import json, resource, sys, time
    from datetime import UTC, datetime, timedelta
    import sqlalchemy as sa
    from reminders import codec, models, state_db

    url, rows, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    now = datetime(2027, 3, 10, 12, tzinfo=UTC)
    first = datetime(2027, 3, 11, 14, tzinfo=UTC)
    drugs = ("Lisinopril", "Metformin", "Atorvastatin", "Amlodipine", "Omeprazole")

    def row(i):
        planned = first + timedelta(days=i % 60)
        data = codec.dumps({
            "rx_id": i, "drug_name": drugs[i % 5], "runs_out_on": planned.date(),
            "customer_id": 1 + i % (rows // 2 or 1), "first_name": f"Patient{i}",
            "phone": f"+1500555{i % 10000:04d}", "email": f"patient{i}@example.com",
            "timezone": None,
        })
        return {
            "rule": "refill-due", "occurrence": str(i), "offset": "-3d",
            "customer_id": str(1 + i % (rows // 2 or 1)), "planned_at": planned,
            "send_at": planned, "status": "pending", "data": data,
            "row_hash": f"{i:024x}", "created_at": now, "updated_at": now,
        }

    started, cpu_started = time.perf_counter(), time.process_time()
    insert = models.reminder.insert()
    for start in range(1, rows + 1, batch):
        with engine.begin() as conn:
            conn.execute(insert, [row(i) for i in range(start, min(start + batch, rows + 1))])
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = time.process_time() - cpu_started
    result = {"code": 0, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu}
    print(json.dumps(result), file=sys.stderr)
    """
)


_READ = textwrap.dedent(
    """
    import json, resource, sys, time
    from reminders import business_db

    url, sql = sys.argv[1], sys.argv[2]
    engine = business_db.create_engine(url)
    started, cpu_started = time.perf_counter(), time.process_time()
    rows = sum(len(batch) for _, batch in business_db.stream_rows(engine, sql, {}, what="rule t"))
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = time.process_time() - cpu_started
    result = {"code": 0, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu,
              "rows": rows}
    print(json.dumps(result), file=sys.stderr)
    """
)


def read_rows(folder: Path, url: str) -> dict[str, float]:
    """Reading the rule's rows alone, in a child process."""
    sql = RULE.split("query: |\n", 1)[1].split("    occurrence:", 1)[0]
    return _measure([sys.executable, "-c", _READ, url, textwrap.dedent(sql)], folder)


def _measure(argv: list[str], cwd: Path) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("REMINDERS_NOW", "REMINDERS_CONFIG")}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    lines = done.stderr.strip().splitlines()
    result = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if done.returncode != 0 or result is None or result["code"] not in (0, None):
        sys.exit(f"failed: {' '.join(argv)}\n{done.stdout}\n{done.stderr}")
    result["stdout"] = done.stdout
    return result


def scan(folder: Path) -> dict[str, float]:
    argv = [sys.executable, "-c", _CHILD, "-c", str(folder / "config.yaml"), "--now", NOW]
    return _measure([*argv, "scan", "--json"], folder)


def baseline(folder: Path, url: str, rows: int) -> dict[str, float]:
    return _measure([sys.executable, "-c", _BASELINE, url, str(rows), str(BATCH)], folder)


# --- one run --------------------------------------------------------------------------------------


def run(
    label: str,
    folder: Path,
    source: str,
    state: str,
    base: str,
    reminders: int,
    read_alone: bool = False,
) -> None:
    from reminders import state_db

    rules = folder / "rules"
    templates = folder / "templates"
    rules.mkdir(exist_ok=True)
    templates.mkdir(exist_ok=True)
    (templates / "refill-due.sms.j2").write_text("Hi {{ first_name }}\n")
    (templates / "refill-due.email.j2").write_text(
        "{% block subject %}x{% endblock %}{% block text %}y{% endblock %}\n"
    )
    state_db.upgrade(state)

    first = scan(folder)
    counts = json.loads(first["stdout"].splitlines()[0])
    assert counts["created"] == reminders, counts
    again = scan(folder)
    counts_again = json.loads(again["stdout"].splitlines()[0])
    assert counts_again["created"] == 0 and counts_again["unchanged"] == reminders, counts_again
    plain = baseline(folder, base, reminders)

    rows = counts["rows"]
    print(f"\n{label}: {rows:,} rows, {reminders:,} reminders")
    print(f"  {'':20}{'seconds':>9}{'CPU s':>8}{'rows/s':>10}{'reminders/s':>13}{'peak RSS':>11}")
    for name, m in (
        ("first scan", first),
        ("unchanged rescan", again),
        ("baseline insert()", plain),
    ):
        per_row = f"{rows / m['seconds']:>10,.0f}" if name != "baseline insert()" else f"{'':>10}"
        print(
            f"  {name:20}{m['seconds']:>9.2f}{m['cpu']:>8.2f}{per_row}"
            f"{reminders / m['seconds']:>13,.0f}{m['rss_mb']:>8.0f} MB"
        )
    speed = plain["seconds"] / first["seconds"]
    faster = first["seconds"] / again["seconds"]
    print(
        f"  first scan speed / baseline speed: {speed:.2f} (target >= 0.5; "
        f"by this process's CPU time {plain['cpu'] / first['cpu']:.2f})"
    )
    print(
        f"  rescan speed-up over the first scan: {faster:.1f}x (target >= 3; "
        f"by CPU time {first['cpu'] / again['cpu']:.1f}x)"
    )
    print(f"  peak RSS of the first scan: {first['rss_mb']:.0f} MB (target < 300 MB at 1M rows)")
    if read_alone:
        read = read_rows(folder, source)
        print(
            f"  reading the rows alone: {read['seconds']:.2f} s, {read['cpu']:.2f} CPU s, "
            f"{rows / read['seconds']:,.0f} rows/s, peak RSS {read['rss_mb']:.0f} MB"
        )


@contextmanager
def pg_databases(server: str, names: list[str]) -> Iterator[list[str]]:
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    suffix = uuid.uuid4().hex[:8]
    made = [f"reminders_bench_{n}_{suffix}" for n in names]
    base = sa.engine.make_url(server)
    with admin.connect() as conn:
        for name in made:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield [base.set(database=n).render_as_string(hide_password=False) for n in made]
    finally:
        with admin.connect() as conn:
            for name in made:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


@contextmanager
def mysql_database(server: str) -> Iterator[str]:
    from reminders import mysql

    admin = sa.create_engine(mysql.engine_url(server))
    name = f"reminders_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    try:
        yield sa.engine.make_url(server).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--pg", metavar="URL", help="a PostgreSQL server to run on as well")
    parser.add_argument(
        "--mysql", metavar="URL", help="a MySQL or MariaDB server to run on as well"
    )
    parser.add_argument(
        "--mysql-drivers",
        default="mysqldb,pymysql",
        help="the drivers to run --mysql with (mysqldb is mysqlclient), comma-separated",
    )
    parser.add_argument("--offsets", default="-3d", help="the rule's offsets, comma-separated")
    parser.add_argument("--skip-sqlite", action="store_true")
    args = parser.parse_args()
    offsets = [o.strip() for o in args.offsets.split(",") if o.strip()]
    reminders = args.rows * len(offsets)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, now {NOW}")

    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            build_sqlite(folder / "business.db", args.rows)
            print(f"built the SQLite business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(RULE.format(offsets=", ".join(offsets)))
            (folder / "config.yaml").write_text(
                CONFIG.format(source="sqlite:///business.db", state="sqlite:///reminders.db")
            )
            run(
                "SQLite",
                folder,
                "sqlite:///business.db",
                f"sqlite:///{folder / 'reminders.db'}",
                f"sqlite:///{folder / 'baseline.db'}",
                reminders,
            )

    if args.pg:
        with (
            tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp,
            pg_databases(args.pg, ["business", "state", "baseline"]) as (business, state, base),
        ):
            folder = Path(tmp)
            started = time.perf_counter()
            build_postgresql(business, args.rows)
            print(f"built the PostgreSQL business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(RULE.format(offsets=", ".join(offsets)))
            (folder / "config.yaml").write_text(CONFIG.format(source=business, state=state))
            run("PostgreSQL", folder, business, state, base, reminders)

    if args.mysql:
        with (
            tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp,
            mysql_database(args.mysql) as business,
        ):
            folder = Path(tmp)
            started = time.perf_counter()
            build_mysql(business, args.rows)
            print(f"built the MySQL business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(RULE.format(offsets=", ".join(offsets)))
            plain = sa.engine.make_url(business)
            for driver in [d.strip() for d in args.mysql_drivers.split(",") if d.strip()]:
                source = plain.set(drivername=f"{plain.get_backend_name()}+{driver}")
                try:
                    source.get_dialect().import_dbapi()
                except ImportError as exc:
                    print(f"\n{driver}: not installed ({exc}); pip install it to measure it")
                    continue
                shown = source.render_as_string(hide_password=False)
                state = folder / f"state-{driver}.db"
                (folder / "config.yaml").write_text(
                    CONFIG.format(source=shown, state=f"sqlite:///{state}")
                )
                label = f"{plain.get_backend_name()}+{driver} (state DB: SQLite)"
                base = f"sqlite:///{folder / f'baseline-{driver}.db'}"
                run(label, folder, shown, f"sqlite:///{state}", base, reminders, read_alone=True)


if __name__ == "__main__":
    main()
