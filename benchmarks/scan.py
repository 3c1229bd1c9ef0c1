"""Scan benchmark: a first scan, an unchanged full rescan and an incremental scan after 1% of the
rows changed, against the physical floor measured in the same run.

    .venv/bin/python benchmarks/scan.py [--rows 100000,1000000,10000000] [--pg URL]
        [--mysql URL] [--offsets -3d] [--chart docs/scan-benchmark.png] [--results FILE]

For each size builds a business DB of N prescriptions joined to their patients, with an
``updated_at`` cursor column (indexed, as a cursor column is), and an incremental rule
(``AND rx.updated_at >= :since``, ``incremental: {full_every: 1d, lookback: 10m}``). Then, each
in a child process so its peak RSS is its own:

- the first scan (a full one: the rule has never been scanned);
- ``scan --full`` with nothing changed (the unchanged full rescan);
- 1% of the rows get a new due date and ``updated_at``, and a plain ``scan``: an incremental one;
- the raw write path: the same number of reminder rows (the scan's columns and shapes of values)
  written into a fresh state DB in batches of the scan's size, each batch a transaction, through
  the DB-API alone: SQLite ``executemany``, PostgreSQL ``COPY``; only the writes are timed;
- a bare streaming read of the rule's query (``business_db.stream_rows``, ``:since`` at the
  epoch, as a full scan binds it);
- the raw move path: the reminders the incremental scan moved, moved once more (new planned and
  send time, data, digest, reason, updated_at) by id, in batches of the scan's size, each batch
  a transaction, through the DB-API alone (``executemany`` on both databases): the writes an
  incremental scan cannot do without, on the same state DB, at the same size.

SQLite always; PostgreSQL too when ``--pg`` names a server (a URL whose user may create
databases: throw-away databases are made there and dropped afterwards); MySQL or MariaDB when
``--mysql`` names one (``mysql://root@127.0.0.1/test``), once with each driver of
``--mysql-drivers`` (mysqlclient and PyMySQL by default; PyMySQL is no dependency of the package:
``pip install pymysql`` first), the state DB on SQLite and the rule without ``incremental``.

Targets: a first scan at least 0.5 times the raw write path's rows/s, an unchanged full rescan at
least 0.3 times the bare read's, an incremental scan after 1% changed at most 5% of the full
rescan's time, at 10M rows a time per row within 1.3 times that at 1M, peak RSS under 300 MB.
The incremental scan is also printed against the raw move path: the share of a rescan the
changed rows' writes alone take is where an incremental scan's time cannot go below.
``--chart`` draws time against rows (log-log) for every database measured (matplotlib: the
``bench`` extra); ``--results`` appends each measurement as a JSON line and the chart draws
every line of that file, so sizes measured in separate runs share one chart.
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
from typing import Any

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
      WHERE rx.refills_left > 0{since}
    occurrence: "{{{{ rx_id }}}}"
    due: runs_out_on
    offsets: [{offsets}]
    at: "10:00"
    channels: [sms, email]
    template: refill-due
"""
INCREMENTAL = """\
    incremental:
      full_every: 1d
      lookback: 10m
"""
SINCE = " AND rx.updated_at >= :since"
UPDATED = "2027-03-10 11:00:00+00:00"  # every row's updated_at: an hour before NOW
# The times of the steps: the full rescan a minute after the first scan, the change at 2
# minutes, the incremental scan at 3 (its :since is the rescan's start minus the lookback).
RESCAN_AT, CHANGED_AT, INCREMENTAL_AT = (
    "2027-03-10T12:01:00Z",
    "2027-03-10 12:02:00+00:00",
    "2027-03-10T12:03:00Z",
)


def rule_text(offsets: list[str], incremental: bool = True) -> str:
    text = RULE.format(offsets=", ".join(offsets), since=SINCE if incremental else "")
    return text + (INCREMENTAL if incremental else "")


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
            UPDATED,
        )


PATIENTS_DDL = (
    "CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, email TEXT, "
    "timezone TEXT)"
)


def prescriptions_ddl(updated_at: str | None) -> str:
    """The prescriptions table, with its ``updated_at`` cursor column of type ``updated_at``
    (None: without one, for a database the incremental rule is not measured on)."""
    cursor = f", updated_at {updated_at}" if updated_at else ""
    return (
        "CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER NOT NULL, "
        f"drug_name TEXT NOT NULL, runs_out_on DATE, refills_left INTEGER NOT NULL{cursor})"
    )


def build_sqlite(path: Path, rows: int) -> None:
    import sqlite3

    conn = sqlite3.connect(path)
    conn.executescript(
        f"PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; {PATIENTS_DDL}; "
        f"{prescriptions_ddl('TEXT')};"
    )
    patients = max(1, rows // 2)
    conn.executemany("INSERT INTO patients VALUES (?, ?, ?, ?, ?)", _patients(patients))
    conn.executemany(
        "INSERT INTO prescriptions VALUES (?, ?, ?, ?, ?, ?)",
        ((i, p, d, due.isoformat(), r, u) for i, p, d, due, r, u in _prescriptions(rows, patients)),
    )
    conn.execute("CREATE INDEX prescriptions_updated_at ON prescriptions (updated_at)")
    conn.execute("ANALYZE")
    conn.commit()
    conn.close()


def build_postgresql(url: str, rows: int) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.exec_driver_sql(PATIENTS_DDL)
        conn.exec_driver_sql(prescriptions_ddl("TIMESTAMP WITH TIME ZONE"))
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        patients = max(1, rows // 2)
        with cursor.copy("COPY patients FROM STDIN") as copy:
            for row in _patients(patients):
                copy.write_row(row)
        with cursor.copy("COPY prescriptions FROM STDIN") as copy:
            for row in _prescriptions(rows, patients):
                copy.write_row(row)
        conn.exec_driver_sql("CREATE INDEX prescriptions_updated_at ON prescriptions (updated_at)")
        conn.exec_driver_sql("ANALYZE patients")
        conn.exec_driver_sql("ANALYZE prescriptions")
    engine.dispose()


def build_mysql(url: str, rows: int) -> None:
    from reminders import mysql

    engine = sa.create_engine(mysql.engine_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql(PATIENTS_DDL)
        conn.exec_driver_sql(prescriptions_ddl(None))
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        patients = max(1, rows // 2)
        for table, made in (
            ("patients", _patients(patients)),
            ("prescriptions", (row[:5] for row in _prescriptions(rows, patients))),
        ):
            insert = f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s)"
            # The driver makes one multi-row INSERT a batch. Never the whole table in memory: a
            # measured child's peak RSS starts from this process's (Linux keeps it across exec).
            while batch := list(itertools.islice(made, 10_000)):
                cursor.executemany(insert, batch)
        conn.exec_driver_sql("ANALYZE TABLE patients, prescriptions")
    engine.dispose()


# --- measured children ----------------------------------------------------------------------------

# The command, timed whole (``seconds``, ``cpu``: its start included, as a cron job pays it) and
# its scan alone (``scan_seconds``, ``scan_cpu``: scan_all, what the scheduler pays a cycle, its
# process started once).
_CHILD = textwrap.dedent(
    """
    import json, resource, sys, time
    from reminders.cli import main

    started = time.perf_counter()
    cpu_started = time.process_time()
    from reminders import scan  # in the command's time: its start-up is the command's

    scanned = {}
    scan_all = scan.scan_all

    def timed_scan_all(*args, **kwargs):
        started, cpu_started = time.perf_counter(), time.process_time()
        try:
            return scan_all(*args, **kwargs)
        finally:
            scanned["scan_seconds"] = time.perf_counter() - started
            scanned["scan_cpu"] = time.process_time() - cpu_started

    scan.scan_all = timed_scan_all
    try:
        main(sys.argv[1:])
    except SystemExit as exc:
        code = exc.code
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = time.process_time() - cpu_started
    result = {"code": code, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu}
    print(json.dumps({**result, **scanned}), file=sys.stderr)
    """
)

_RAW_WRITE = textwrap.dedent(
    """
    import json, resource, sys, time
    from datetime import UTC, datetime, timedelta
    from reminders import codec, models, state_db

    url, rows, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    state_db.upgrade(url)
    state_db.dispose_engines(url)
    now = datetime(2027, 3, 10, 12, tzinfo=UTC)
    first = datetime(2027, 3, 11, 14, tzinfo=UTC)
    drugs = ("Lisinopril", "Metformin", "Atorvastatin", "Amlodipine", "Omeprazole")
    names = ("rule", "occurrence", "offset", "customer_id", "planned_at", "send_at", "status",
             "data", "row_hash", "created_at", "updated_at")
    sqlite = url.startswith("sqlite")

    def stamp(moment):  # as each database's driver takes it: SQLite's text, or the datetime
        return moment.replace(tzinfo=None).isoformat(" ", "microseconds") if sqlite else moment

    def row(i):
        planned = first + timedelta(days=i % 60)
        customer = 1 + i % (rows // 2 or 1)
        data = codec.dumps({
            "rx_id": i, "drug_name": drugs[i % 5], "runs_out_on": planned.date(),
            "customer_id": customer, "first_name": f"Patient{i}",
            "phone": f"+1500555{i % 10000:04d}", "email": f"patient{i}@example.com",
            "timezone": None,
        })
        return ("refill-due", str(i), "-3d", str(customer), stamp(planned), stamp(planned),
                "pending", data, f"{i:024x}", stamp(now), stamp(now))

    table = models.reminder.name
    columns = ", ".join(f'"{n}"' for n in names)
    if sqlite:
        import sqlite3
        conn = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):  # the state DB's own
            conn.execute(f"PRAGMA {pragma}")
        insert = f"INSERT INTO {table} ({columns}) VALUES ({', '.join('?' * len(names))})"

        def write(batch_rows):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(insert, batch_rows)
            conn.execute("COMMIT")
    else:
        import psycopg
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))

        def write(batch_rows):
            with conn.cursor() as cursor:
                with cursor.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
                    for r in batch_rows:
                        copy.write_row(r)
            conn.commit()

    seconds = 0.0
    cpu = 0.0
    for start in range(1, rows + 1, batch):
        made = [row(i) for i in range(start, min(start + batch, rows + 1))]
        began, cpu_began = time.perf_counter(), time.process_time()
        write(made)
        seconds += time.perf_counter() - began
        cpu += time.process_time() - cpu_began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"code": 0, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu}
    print(json.dumps(result), file=sys.stderr)
    """
)


_RAW_MOVE = textwrap.dedent(
    """
    import json, resource, sys, time
    from datetime import UTC, datetime, timedelta
    from reminders import models

    url, moved_at, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    sqlite = url.startswith("sqlite")
    table = models.reminder.name
    moved = datetime.fromisoformat(moved_at.replace("Z", "+00:00"))
    later = moved + timedelta(minutes=1)

    def stamp(moment):  # as each database's driver takes it: SQLite's text, or the datetime
        return moment.replace(tzinfo=None).isoformat(" ", "microseconds") if sqlite else moment

    mark = "?" if sqlite else "%s"
    update = (
        f"UPDATE {table} SET planned_at = {mark}, send_at = {mark}, data = {mark}, "
        f"row_hash = {mark}, reason = {mark}, updated_at = {mark} WHERE id = {mark}"
    )
    if sqlite:
        import sqlite3
        conn = sqlite3.connect(url.split("///", 1)[1], isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL"):  # the state DB's own
            conn.execute(f"PRAGMA {pragma}")
        found = conn.execute(
            f"SELECT id, planned_at, data FROM {table} WHERE updated_at = ? ORDER BY id",
            (stamp(moved),),
        ).fetchall()
        found = [(i, datetime.fromisoformat(p), d) for i, p, d in found]

        def write(rows):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany(update, rows)
            conn.execute("COMMIT")
    else:
        import psycopg
        conn = psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"))
        found = conn.execute(
            f"SELECT id, planned_at, data FROM {table} WHERE updated_at = %s ORDER BY id",
            (moved,),
        ).fetchall()
        conn.commit()

        def write(rows):
            with conn.cursor() as cursor:
                cursor.executemany(update, rows)
            conn.commit()

    rows = [
        (stamp(p + timedelta(days=1)), stamp(p + timedelta(days=1)), d, f"{i:024x}", "moved",
         stamp(later), i)
        for i, p, d in found
    ]
    began, cpu_began = time.perf_counter(), time.process_time()
    for start in range(0, len(rows), batch):
        write(rows[start : start + batch])
    seconds = time.perf_counter() - began
    cpu = time.process_time() - cpu_began
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result = {"code": 0, "seconds": seconds, "rss_mb": usage.ru_maxrss / 1024, "cpu": cpu,
              "moved": len(rows)}
    print(json.dumps(result), file=sys.stderr)
    """
)


_READ = textwrap.dedent(
    """
    import json, resource, sys, time
    from datetime import UTC, datetime
    from reminders import business_db

    url, sql = sys.argv[1], sys.argv[2]
    engine = business_db.create_engine(url)
    params = business_db.time_params(sql, datetime(2027, 3, 10, 12, tzinfo=UTC), UTC)
    started, cpu_started = time.perf_counter(), time.process_time()
    batches = business_db.stream_rows(engine, sql, params, what="rule t")
    rows = sum(len(batch) for _, batch in batches)
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
    text = (folder / "rules" / "refills.yaml").read_text()
    sql = text.split("query: |\n", 1)[1].split("    occurrence:", 1)[0]
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


def scan(folder: Path, *args: str, now: str = NOW) -> dict[str, float]:
    argv = [sys.executable, "-c", _CHILD, "-c", str(folder / "config.yaml"), "--now", now]
    return _measure([*argv, "scan", "--json", *args], folder)


def raw_write(folder: Path, url: str, rows: int) -> dict[str, float]:
    return _measure([sys.executable, "-c", _RAW_WRITE, url, str(rows), str(BATCH)], folder)


def raw_move(folder: Path, url: str) -> dict[str, float]:
    """Moving again, through the DB-API alone, what the incremental scan moved."""
    return _measure([sys.executable, "-c", _RAW_MOVE, url, INCREMENTAL_AT, str(BATCH)], folder)


def change_one_percent(business: str) -> int:
    """A new due date and updated_at for every 100th prescription; how many changed."""
    engine = sa.create_engine(business)
    moved = "date(runs_out_on, '+1 day')" if engine.dialect.name == "sqlite" else "runs_out_on + 1"
    with engine.begin() as conn:
        changed = conn.execute(
            sa.text(
                f"UPDATE prescriptions SET runs_out_on = {moved}, updated_at = :t "
                "WHERE id % 100 = 0"
            ),
            {"t": CHANGED_AT},
        ).rowcount
    engine.dispose()
    return int(changed)


# --- one run --------------------------------------------------------------------------------------


def _counts(measured: dict[str, float]) -> dict[str, Any]:
    return dict(json.loads(str(measured["stdout"]).splitlines()[0]))


def run(
    label: str,
    folder: Path,
    source: str,
    state: str,
    base: str,
    reminders: int,
    *,
    incremental: bool = True,
) -> dict[str, Any]:
    """Measure one database at one size; print it and return it as a result (see --results)."""
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
    state_db.dispose_engines(state)

    first = scan(folder)
    counts = _counts(first)
    assert counts["created"] == reminders and counts["kind"] == "full", counts
    again = scan(folder, "--full", now=RESCAN_AT)
    counts_again = _counts(again)
    assert counts_again["created"] == 0 and counts_again["unchanged"] == reminders, counts_again
    later: dict[str, float] | None = None
    if incremental:
        changed = change_one_percent(source)
        later = scan(folder, now=INCREMENTAL_AT)
        counts_later = _counts(later)
        assert counts_later["kind"] == "incremental", counts_later
        assert counts_later["rows"] == changed, counts_later
        assert counts_later["moved"] == changed * reminders // int(counts["rows"]), counts_later
        move = raw_move(folder, state)
        assert move["moved"] == counts_later["moved"], (move, counts_later)
    write = raw_write(folder, base, reminders)
    read = read_rows(folder, source)

    rows = int(counts["rows"])
    print(f"\n{label}: {rows:,} rows, {reminders:,} reminders")
    print(f"  {'':34}{'seconds':>9}{'CPU s':>8}{'rows/s':>11}{'peak RSS':>11}{'scan alone: s':>15}")
    measured: list[tuple[str, dict[str, float], int]] = [
        ("first scan", first, rows),
        ("unchanged full rescan", again, rows),
    ]
    if later is not None:
        measured.append(("incremental scan, 1% changed", later, rows))
    writer = "executemany" if base.startswith("sqlite") else "COPY"
    measured += [
        (f"raw write path ({writer})", write, reminders),
        ("bare streaming read", read, rows),
    ]
    if later is not None:
        measured.append(("raw move path (executemany)", move, int(move["moved"])))
    for name, m, n in measured:
        alone = f"{m['scan_seconds']:>9.2f} ({m['scan_cpu']:.2f})" if "scan_seconds" in m else ""
        print(
            f"  {name:34}{m['seconds']:>9.2f}{m['cpu']:>8.2f}{n / m['seconds']:>11,.0f}"
            f"{m['rss_mb']:>8.0f} MB{alone}"
        )
    # Each target twice: by the command's time (its start-up included, as a cron job runs it)
    # and by the scan's own (as the scheduler runs it, its process started once).
    result: dict[str, Any] = {
        "database": label,
        "rows": rows,
        "first": first["seconds"],
        "rescan": again["seconds"],
        "write": write["seconds"],
        "read": read["seconds"],
        "rss_first": first["rss_mb"],
        "rss_rescan": again["rss_mb"],
        "cpu_first": first["cpu"],
        "cpu_rescan": again["cpu"],
        "scan_first": first["scan_seconds"],
        "scan_rescan": again["scan_seconds"],
    }
    for key in ("seconds", "scan_seconds"):
        how = "command" if key == "seconds" else "scan alone"
        first_ratio = write["seconds"] / first[key]
        rescan_ratio = read["seconds"] / again[key]
        print(f"  {how}: first scan / raw write path, rows/s: {first_ratio:.2f} (target >= 0.5)")
        print(
            f"  {how}: unchanged full rescan / bare read, rows/s: {rescan_ratio:.2f} "
            "(target >= 0.3)"
        )
        if later is not None:
            share = later[key] / again[key]
            print(f"  {how}: incremental / unchanged full rescan, time: {share:.1%} (target <= 5%)")
    if later is not None:
        floor = move["seconds"] / again["scan_seconds"]
        print(
            f"  the raw move path alone is {floor:.1%} of the rescan (scan alone); the "
            f"incremental scan takes {later['scan_seconds'] / move['seconds']:.2f}x its time"
        )
        result.update(
            incremental=later["seconds"],
            scan_incremental=later["scan_seconds"],
            rss_incremental=later["rss_mb"],
            move=move["seconds"],
        )
    peak = max(m["rss_mb"] for _, m, _ in measured[:3])
    print(f"  peak RSS of the scans: {peak:.0f} MB (target < 300 MB)")
    return result


def summary(results: list[dict[str, Any]]) -> None:
    """Time per row at each size against the next smaller one measured (target at 10M: within
    1.3x of 1M's)."""
    by_database: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_database.setdefault(str(r["database"]), []).append(r)
    for database, found in by_database.items():
        found.sort(key=lambda r: int(r["rows"]))
        for small, big in itertools.pairwise(found):
            for step in ("first", "rescan"):
                per_small = float(small[step]) / int(small["rows"])
                per_big = float(big[step]) / int(big["rows"])
                print(
                    f"{database} {step}: {per_big * 1e6:.1f} us a row at {big['rows']:,} rows, "
                    f"{per_small * 1e6:.1f} at {small['rows']:,}: {per_big / per_small:.2f}x"
                )


def chart(results: list[dict[str, Any]], path: Path) -> None:
    """Time against rows, log-log, a panel a database one above the other (matplotlib, the
    ``bench`` extra): narrow enough to stay legible when a phone shrinks it to its width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 11})
    databases = list(dict.fromkeys(str(r["database"]) for r in results))
    height = 3.4 * len(databases) + 1.0  # inches: a panel a database, and the legend
    figure, axes = plt.subplots(
        len(databases), 1, figsize=(6.4, height), sharex=True, squeeze=False
    )
    lines = (
        ("first", "first scan", "o-"),
        ("rescan", "unchanged full rescan", "s-"),
        ("incremental", "incremental, 1% changed", "^-"),
        ("write", "raw write path", "o:"),
        ("read", "bare streaming read", "s:"),
        ("move", "raw move path, 1% changed", "^:"),
    )
    for (axis,), database in zip(axes, databases, strict=True):
        found = sorted(
            (r for r in results if r["database"] == database),
            key=lambda r: int(r["rows"]),
        )
        for key, name, style in lines:
            points = [(int(r["rows"]), float(r[key])) for r in found if key in r]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, style, label=name)
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_title(database)
        axis.set_ylabel("seconds")
        axis.grid(True, which="both", alpha=0.3)
    axes[-1][0].set_xlabel("rows")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=2, fontsize=10)
    figure.suptitle("reminders scan: time against rows")
    figure.tight_layout(rect=(0, 0.85 / height, 1, 1))
    figure.savefig(path, dpi=110)
    print(f"chart: {path}")


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
    parser.add_argument(
        "--rows", default="1000000", help="business rows, comma-separated sizes (100000,1000000)"
    )
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
    parser.add_argument("--chart", metavar="PNG", type=Path, help="draw time against rows here")
    parser.add_argument(
        "--results", metavar="FILE", type=Path, help="append each result here as a JSON line"
    )
    args = parser.parse_args()
    offsets = [o.strip() for o in args.offsets.split(",") if o.strip()]
    sizes = [int(n.replace("_", "")) for n in args.rows.split(",") if n.strip()]
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores, now {NOW}")
    results: list[dict[str, Any]] = []
    for size in sizes:
        measured = measure_size(args, size, offsets)
        results += measured
        if args.results:
            with args.results.open("a") as out:
                out.writelines(json.dumps(result) + "\n" for result in measured)
    everything = results
    if args.results and args.results.exists():
        everything = [json.loads(line) for line in args.results.read_text().splitlines() if line]
    print()
    summary(everything)
    if args.chart:
        chart(everything, args.chart)


def measure_size(args: argparse.Namespace, size: int, offsets: list[str]) -> list[dict[str, Any]]:
    """Every database asked for, at ``size`` business rows."""
    reminders = size * len(offsets)
    results: list[dict[str, Any]] = []
    if not args.skip_sqlite:
        with tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp:
            folder = Path(tmp)
            started = time.perf_counter()
            build_sqlite(folder / "business.db", size)
            print(f"\nbuilt the SQLite business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(rule_text(offsets))
            (folder / "config.yaml").write_text(
                CONFIG.format(source="sqlite:///business.db", state="sqlite:///reminders.db")
            )
            results.append(
                run(
                    "SQLite",
                    folder,
                    f"sqlite:///{folder / 'business.db'}",
                    f"sqlite:///{folder / 'reminders.db'}",
                    f"sqlite:///{folder / 'baseline.db'}",
                    reminders,
                )
            )

    if args.pg:
        with (
            tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp,
            pg_databases(args.pg, ["business", "state", "baseline"]) as (business, state, base),
        ):
            folder = Path(tmp)
            started = time.perf_counter()
            build_postgresql(business, size)
            print(f"\nbuilt the PostgreSQL business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(rule_text(offsets))
            (folder / "config.yaml").write_text(CONFIG.format(source=business, state=state))
            results.append(run("PostgreSQL", folder, business, state, base, reminders))

    if args.mysql:
        with (
            tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp,
            mysql_database(args.mysql) as business,
        ):
            folder = Path(tmp)
            started = time.perf_counter()
            build_mysql(business, size)
            print(f"\nbuilt the MySQL business DB in {time.perf_counter() - started:.1f} s")
            (folder / "rules").mkdir()
            (folder / "rules" / "refills.yaml").write_text(rule_text(offsets, incremental=False))
            plain = sa.engine.make_url(business)
            for driver in [d.strip() for d in args.mysql_drivers.split(",") if d.strip()]:
                source = plain.set(drivername=f"{plain.get_backend_name()}+{driver}")
                try:
                    source.get_dialect().import_dbapi()
                except ImportError as exc:
                    print(f"\n{driver}: not installed ({exc}); pip install it to measure it")
                    continue
                shown = source.render_as_string(hide_password=False)
                state_file = folder / f"state-{driver}.db"
                (folder / "config.yaml").write_text(
                    CONFIG.format(source=shown, state=f"sqlite:///{state_file}")
                )
                label = f"{plain.get_backend_name()}+{driver} (state DB: SQLite)"
                base = f"sqlite:///{folder / f'baseline-{driver}.db'}"
                results.append(
                    run(
                        label,
                        folder,
                        shown,
                        f"sqlite:///{state_file}",
                        base,
                        reminders,
                        incremental=False,
                    )
                )
    return results


if __name__ == "__main__":
    main()
