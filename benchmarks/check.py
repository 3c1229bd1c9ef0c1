"""Benchmark: the checkout's duplicate-purchase check, over HTTP and as a bare query.

    .venv/bin/python benchmarks/check.py [--orders 1000000] [--pg postgresql://...]
        [--mysql mysql://...]

Builds a business DB of ``--orders`` orders (SQLite in a temporary folder; with ``--pg URL`` also
the table ``reminders_bench_orders`` in that PostgreSQL database, with ``--mysql URL`` in that
MySQL or MariaDB database, each dropped afterwards) with the
index the README tells businesses to create, then, in the same run and with the same requests:

- the bare query with SQLAlchemy (an engine of its own, no timeout, no engine code): one client,
  then ``--clients`` processes at once;
- ``POST /v1/checks/already-owned`` over HTTP on loopback, the app served by the production
  server (``reminders.web.server``: granian, forked WSGI workers), ``--clients`` processes at once,
  each on a keep-alive connection.

Half the requests name an item the customer owns (a duplicate), half one they do not. The
``--clients`` measurements run ``--repeat`` times (3), bare and HTTP alternating. Prints p50, p99
and max latency of each run, and whether the targets hold on the median p99 of the runs: p99 over
HTTP under 10 ms, and within 2x the bare query's p99 plus 2 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import queue
import random
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

KEY = "bench-key-0123456789abcdef"
SECRET = "bench-link-signing-secret-0123456789abcdef"
PG_TABLE = "reminders_bench_orders"
QUERY = """\
SELECT o.id AS order_id, o.placed_at, o.title FROM {table} o
WHERE o.customer_id = :customer_id AND o.sku = :sku AND o.status = 'paid'
ORDER BY o.placed_at LIMIT 1"""
# The index the README tells businesses to create for this check.
INDEX = "CREATE INDEX {table}_customer_sku ON {table} (customer_id, sku, placed_at)"
CUSTOMERS = 100_000
SKUS = 5_000
START = datetime(2024, 1, 1, tzinfo=UTC)


# --- the business DB ------------------------------------------------------------------------------


def orders(count: int, seed: int = 7) -> Any:
    """``count`` orders: (id, customer_id, sku, title, status, placed_at), reproducibly."""
    rng = random.Random(seed)
    for order_id in range(1, count + 1):
        sku = rng.randrange(SKUS)
        placed = START + timedelta(seconds=rng.randrange(3 * 365 * 86400))
        status = "paid" if rng.random() < 0.95 else "refunded"
        yield (
            order_id,
            rng.randrange(1, CUSTOMERS + 1),
            f"SKU{sku:05d}",
            f"Item {sku}",
            status,
            placed,
        )


def build_sqlite(path: Path, count: int) -> float:
    """Write the orders to a SQLite file; returns seconds taken."""
    started = time.perf_counter()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(
        "CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
        "sku TEXT NOT NULL, title TEXT NOT NULL, status TEXT NOT NULL, placed_at TEXT NOT NULL)"
    )
    rows = (
        (i, c, s, t, st, p.strftime("%Y-%m-%d %H:%M:%S")) for i, c, s, t, st, p in orders(count)
    )
    with conn:
        conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)", rows)
    with conn:
        conn.execute(INDEX.format(table="orders"))
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - started


def build_pg(url: str, count: int) -> float:
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass(%s)", (PG_TABLE,)).fetchone()
        if exists and exists[0]:
            raise SystemExit(f"{PG_TABLE} already exists in {url}: drop it first")
        conn.execute(
            f"CREATE TABLE {PG_TABLE} (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
            "sku TEXT NOT NULL, title TEXT NOT NULL, status TEXT NOT NULL, "
            "placed_at TIMESTAMPTZ NOT NULL)"
        )
        with conn.cursor() as cur, cur.copy(f"COPY {PG_TABLE} FROM STDIN") as copy:
            for row in orders(count):
                copy.write_row(row)
        conn.execute(INDEX.format(table=PG_TABLE))
        conn.execute(f"VACUUM ANALYZE {PG_TABLE}")
        # Flush the load now, not in a checkpoint during the measurement (needs a superuser).
        with contextlib.suppress(psycopg.Error):
            conn.execute("CHECKPOINT")
    return time.perf_counter() - started


def build_mysql(url: str, count: int) -> float:
    import sqlalchemy as sa

    from reminders import mysql

    started = time.perf_counter()
    engine = sa.create_engine(mysql.engine_url(url))
    with engine.begin() as conn:
        if sa.inspect(conn).has_table(PG_TABLE):
            raise SystemExit(f"{PG_TABLE} already exists in {url}: drop it first")
        conn.exec_driver_sql("SET time_zone = '+00:00'")
        conn.exec_driver_sql(
            f"CREATE TABLE {PG_TABLE} (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL, "
            "sku VARCHAR(16) NOT NULL, title TEXT NOT NULL, status VARCHAR(16) NOT NULL, "
            "placed_at TIMESTAMP NOT NULL)"
        )
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        rows = ((*row[:5], row[5].replace(tzinfo=None)) for row in orders(count))
        insert = f"INSERT INTO {PG_TABLE} VALUES (%s, %s, %s, %s, %s, %s)"
        while batch := list(itertools.islice(rows, 10_000)):  # one multi-row INSERT a batch
            cursor.executemany(insert, batch)
        conn.exec_driver_sql(INDEX.format(table=PG_TABLE))
        conn.exec_driver_sql(f"ANALYZE TABLE {PG_TABLE}")
    engine.dispose()
    return time.perf_counter() - started


def drop_mysql(url: str) -> None:
    import sqlalchemy as sa

    from reminders import mysql

    engine = sa.create_engine(mysql.engine_url(url))
    with engine.begin() as conn:
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {PG_TABLE}")
    engine.dispose()


def drop_pg(url: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(f"DROP TABLE IF EXISTS {PG_TABLE}")


def _libpq(url: str) -> str:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url).set(drivername="postgresql")
    return parsed.render_as_string(hide_password=False)


def _sa_url(url: str) -> str:
    import sqlalchemy as sa

    parsed = sa.engine.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def requests_for(db: Any, count: int, seed: int = 11) -> list[dict[str, Any]]:
    """``count`` check parameters: even ones an owned (paid) item, odd ones a random pair."""
    rng = random.Random(seed)
    owned = db("SELECT customer_id, sku FROM {table} WHERE status = 'paid' AND id % 97 = 3")
    out = []
    for i in range(count):
        if i % 2 == 0:
            customer_id, sku = rng.choice(owned)
        else:
            customer_id, sku = rng.randrange(1, CUSTOMERS + 1), f"SKU{rng.randrange(SKUS):05d}"
        out.append({"customer_id": int(customer_id), "sku": str(sku)})
    return out


# --- the business's folder ------------------------------------------------------------------------


def write_business(folder: Path, source_url: str, table: str) -> Path:
    (folder / "rules").mkdir(exist_ok=True)
    (folder / "templates").mkdir(exist_ok=True)
    query = textwrap.indent(QUERY.format(table=table), "      ")
    (folder / "rules" / "checks.yaml").write_text(
        "checks:\n"
        "  - name: already-owned\n"
        "    query: |\n"
        f"{query}\n"
        "    params: {customer_id: int, sku: str}\n"
        "    message: already-owned\n"
        "    timeout: 200ms\n"
    )
    (folder / "templates" / "already-owned.check.j2").write_text(
        "You already bought {{ title }} on {{ placed_at|date }}. Buy it again?\n"
    )
    config = folder / "config.yaml"
    config.write_text(
        f"source:\n  url: {json.dumps(source_url)}\n"
        "state:\n  url: sqlite:///state.db\n"
        "rules: rules/\ntemplates: templates/\n"
        "web:\n  public_url: https://bench.example.com\n"
    )
    return config


# --- measuring ------------------------------------------------------------------------------------


@dataclass
class Stats:
    name: str
    latencies: list[float]  # seconds
    seconds: float
    errors: int = 0
    cpu_ms: float | None = None  # CPU time a request, of the process(es) that answered it

    def pct(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000

    @property
    def p50(self) -> float:
        return statistics.median(self.latencies) * 1000

    @property
    def p99(self) -> float:
        return self.pct(99)

    def line(self) -> str:
        rate = len(self.latencies) / self.seconds if self.seconds else 0
        return (
            f"  {self.name:44} p50 {self.p50:7.3f} ms  p99 {self.p99:7.3f} ms  "
            f"max {max(self.latencies) * 1000:7.2f} ms  {rate:8.0f}/s  n={len(self.latencies)}"
            + (f"  CPU {self.cpu_ms:.3f} ms/request" if self.cpu_ms is not None else "")
            + (f"  errors={self.errors}" if self.errors else "")
        )


def bare_client(url: str, sql: str, params: list[dict[str, Any]], barrier: Any, out: Any) -> None:
    """One process: the bare query with SQLAlchemy, one call a parameter set."""
    import sqlalchemy as sa

    from reminders import mysql

    engine = sa.create_engine(mysql.engine_url(url) if mysql.is_mysql(url) else url)
    query = sa.text(sql)
    if barrier is not None:
        barrier.wait()
    with engine.connect() as conn:
        for p in params[:50]:  # warm up: connection, statement cache, pages
            conn.execute(query, p).first()
    latencies = []
    started = time.perf_counter()
    cpu = time.process_time()
    for p in params:
        t0 = time.perf_counter()
        with engine.connect() as conn:
            conn.execute(query, p).first()
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    cpu_ms = (time.process_time() - cpu) / len(params) * 1000
    out.put((latencies, seconds, 0, cpu_ms))
    engine.dispose()


class Connection:
    """A keep-alive HTTP/1.1 client on a raw socket: as little client CPU as a request can take,
    so the 2 CPUs the server shares with 8 clients go to the server."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None
        self.buffer = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=30)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""
        return sock

    def ask(self, request: bytes) -> tuple[int, bytes]:
        for attempt in range(2):
            if self.sock is None:
                self.sock = self._connect()
            try:
                self.sock.sendall(request)
                return self._response()
            except (ConnectionError, EOFError):
                self.sock.close()
                self.sock = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _response(self) -> tuple[int, bytes]:
        assert self.sock is not None
        while b"\r\n\r\n" not in self.buffer:
            self._read()
        head, _, rest = self.buffer.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = 0
        close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        while len(rest) < length:
            rest += self._recv()
        body, self.buffer = rest[:length], rest[length:]
        if close:
            self.sock.close()
            self.sock = None
        return status, body

    def _read(self) -> None:
        self.buffer += self._recv()

    def _recv(self) -> bytes:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            raise EOFError("the server closed the connection")
        return data


def http_request(params: dict[str, Any]) -> bytes:
    body = json.dumps(params).encode()
    return (
        b"POST /v1/checks/already-owned HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {KEY}\r\n".encode()
        + b"Content-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def http_client(port: int, params: list[dict[str, Any]], barrier: Any, out: Any) -> None:
    """One process: the check over HTTP on a keep-alive connection."""
    requests = [http_request(p) for p in params]
    conn = Connection(port)
    # Every client starts (spawning takes seconds under load), then warms up and measures at
    # once: a connection idle too long may be closed by the server and reopened.
    barrier.wait()
    for request in requests[:50]:  # warm up
        conn.ask(request)
    latencies = []
    answers = []
    started = time.perf_counter()
    for request in requests:
        t0 = time.perf_counter()
        answers.append(conn.ask(request))
        latencies.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    errors = sum(
        1 for status, body in answers if status != 200 or json.loads(body)["duplicate"] is None
    )
    out.put((latencies, seconds, errors, None))


def run_clients(name: str, target: Any, args: list[tuple[Any, ...]]) -> Stats:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(len(args))
    out = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*a, barrier, out)) for a in args]
    for proc in procs:
        proc.start()
    results: list[tuple[list[float], float, int, float | None]] = []
    while len(results) < len(procs):
        try:
            results.append(out.get(timeout=1))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode not in (None, 0)]
            if dead:
                for proc in procs:
                    proc.kill()
                raise SystemExit(
                    f"{name}: a client process failed (exit {dead[0].exitcode})"
                ) from None
    for proc in procs:
        proc.join(60)
    latencies = [x for lat, _, _, _ in results for x in lat]
    cpus = [c for _, _, _, c in results if c is not None]
    return Stats(
        name,
        latencies,
        max(sec for _, sec, _, _ in results),
        sum(err for _, _, err, _ in results),
        statistics.mean(cpus) if cpus else None,
    )


def bare_single(url: str, sql: str, params: list[dict[str, Any]]) -> Stats:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    proc = ctx.Process(target=bare_client, args=(url, sql, params, None, out))
    proc.start()
    latencies, seconds, _, cpu_ms = out.get(timeout=600)
    proc.join(60)
    return Stats("bare query, 1 client", latencies, seconds, cpu_ms=cpu_ms)


def wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the web server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit("the web server did not start")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


SERVE = """\
import json, sys
from reminders import state_db
from reminders.app import App
from reminders.web import server

config, port, options = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
app = App(config)
state_db.upgrade(app.config.state_url)
server.serve(app, "127.0.0.1", port, **options)
"""


def start_server(config: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    """The production server (``reminders web``, as ops run it) in a child process."""
    env = dict(os.environ, REMINDERS_SECRET=SECRET, REMINDERS_API_KEYS=KEY)
    options = {"workers": args.workers, "threads": args.threads, "access_log": args.access_log}
    log = open(config.parent / "web.log", "wb")  # noqa: SIM115 - lives as long as the server
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE, str(config), str(port), json.dumps(options)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_for_port(port, proc)
    return proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def tree_cpu(pid: int) -> float | None:
    """CPU seconds used so far by process ``pid`` and its children (Linux /proc), or None."""
    try:
        pids = [pid]
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            pids.append(int(child))
        total = 0
        for p in pids:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
        return total / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def split(params: list[dict[str, Any]], parts: int) -> list[list[dict[str, Any]]]:
    return [params[i::parts] for i in range(parts)]


def bench(
    label: str,
    folder: Path,
    source_url: str,
    table: str,
    db: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    config = write_business(folder, source_url, table)
    sql = QUERY.format(table=table)
    params = requests_for(db, args.requests)
    single = bare_single(source_url, sql, params[: max(1000, args.requests // args.clients)])
    port = free_port()
    server = start_server(config, port, args)
    bares: list[Stats] = []
    https: list[Stats] = []
    try:
        http_single = run_clients(
            "HTTP /v1/checks, 1 client", http_client, [(port, params[: len(single.latencies)])]
        )
        # Bare and HTTP runs alternate, so a noisy moment of the machine hits both alike.
        for run in range(1, args.repeat + 1):
            bares.append(
                run_clients(
                    f"bare query, {args.clients} clients, run {run}",
                    bare_client,
                    [(source_url, sql, part) for part in split(params, args.clients)],
                )
            )
            before = tree_cpu(server.pid)
            stats = run_clients(
                f"HTTP /v1/checks, {args.clients} clients, run {run}",
                http_client,
                [(port, part) for part in split(params, args.clients)],
            )
            after = tree_cpu(server.pid)
            if before is not None and after is not None:
                # the server's CPU a request (warm-up requests included in the count)
                served = len(params) + 50 * args.clients
                stats.cpu_ms = (after - before) / served * 1000
            https.append(stats)
    finally:
        stop_server(server)
    print(f"\n{label} (load average {os.getloadavg()[0]:.1f} at the end)")
    for stats in (single, http_single, *bares, *https):
        print(stats.line())
    bare_p99 = statistics.median(b.p99 for b in bares)
    http_p99 = statistics.median(h.p99 for h in https)
    http_p50 = statistics.median(h.p50 for h in https)
    budget = 2 * bare_p99 + 2
    budget_single = 2 * single.p99 + 2
    print(
        f"  median of {args.repeat} runs, {args.clients} clients: bare p99 {bare_p99:.2f} ms, "
        f"HTTP p50 {http_p50:.2f} ms, p99 {http_p99:.2f} ms\n"
        f"  target p99 < 10 ms: {'met' if http_p99 < 10 else 'MISSED'} ({http_p99:.2f} ms)\n"
        f"  target p99 <= 2 x bare p99 + 2 ms: "
        f"{'met' if http_p99 <= budget else 'MISSED'} against {args.clients} bare clients "
        f"({http_p99:.2f} <= {budget:.2f} ms); "
        f"{'met' if http_p99 <= budget_single else 'MISSED'} against 1 bare client "
        f"({http_p99:.2f} <= {budget_single:.2f} ms)"
    )
    errors = sum(h.errors for h in https)
    if errors:
        print(f"  {errors} HTTP answers were not duplicate true/false (see web.log)")
    return {
        "backend": label,
        "bare_1": (single.p50, single.p99),
        "bare_n_p99": bare_p99,
        "http_1": (http_single.p50, http_single.p99),
        "http": (http_p50, http_p99),
        "errors": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=16_000, help="per backend, all clients")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the 8-client measurements")
    parser.add_argument("--workers", type=int, default=2, help="web worker processes")
    parser.add_argument("--threads", type=int, default=4, help="threads a web worker")
    parser.add_argument(
        "--access-log", action=argparse.BooleanOptionalAction, default=False, help="log requests"
    )
    parser.add_argument("--pg", metavar="URL", help="also benchmark PostgreSQL at URL")
    parser.add_argument("--mysql", metavar="URL", help="also benchmark MySQL or MariaDB at URL")
    parser.add_argument("--skip-sqlite", action="store_true")
    parser.add_argument("--keep", metavar="DIR", help="keep the SQLite business folder here")
    args = parser.parse_args()

    folder = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="reminders-bench-"))
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"{args.orders:,} orders, {args.requests:,} checks a backend (half duplicates), "
        f"{args.clients} concurrent clients, reminders web {args.workers} workers x "
        f"{args.threads} threads, access log {'on' if args.access_log else 'off'}, "
        f"{os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    try:
        sqlite_dir = folder / "sqlite"
        sqlite_dir.mkdir(exist_ok=True)
        db_path = sqlite_dir / "shop.db"
        if not args.skip_sqlite and not db_path.exists():
            print(f"building SQLite: {build_sqlite(db_path, args.orders):.1f} s")

        def sqlite_db(sql: str) -> list[tuple[Any, ...]]:
            with sqlite3.connect(db_path) as conn:
                return conn.execute(sql.format(table="orders")).fetchall()

        if not args.skip_sqlite:
            bench("SQLite", sqlite_dir, f"sqlite:///{db_path}", "orders", sqlite_db, args)
        if args.pg:
            url = _sa_url(args.pg)
            print(f"building PostgreSQL: {build_pg(url, args.orders):.1f} s")
            try:
                import sqlalchemy as sa

                engine = sa.create_engine(url)

                def pg_db(sql: str) -> list[tuple[Any, ...]]:
                    with engine.connect() as conn:
                        rows = conn.execute(sa.text(sql.format(table=PG_TABLE)))
                        return [tuple(r) for r in rows]

                pg_dir = folder / "postgresql"
                pg_dir.mkdir(exist_ok=True)
                bench("PostgreSQL", pg_dir, url, PG_TABLE, pg_db, args)
                engine.dispose()
            finally:
                drop_pg(url)
        if args.mysql:
            print(f"building MySQL: {build_mysql(args.mysql, args.orders):.1f} s")
            try:
                import sqlalchemy as sa

                from reminders import mysql

                engine = sa.create_engine(mysql.engine_url(args.mysql))
                with engine.connect():  # the dialect learns the server's kind
                    label = "MariaDB" if getattr(engine.dialect, "is_mariadb", False) else "MySQL"

                def mysql_db(sql: str) -> list[tuple[Any, ...]]:
                    with engine.connect() as conn:
                        rows = conn.execute(sa.text(sql.format(table=PG_TABLE)))
                        return [tuple(r) for r in rows]

                mysql_dir = folder / "mysql"
                mysql_dir.mkdir(exist_ok=True)
                bench(label, mysql_dir, args.mysql, PG_TABLE, mysql_db, args)
                engine.dispose()
            finally:
                drop_mysql(args.mysql)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
