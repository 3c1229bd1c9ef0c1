"""Delivery benchmark: N reminders through dispatch and worker processes to a loopback Twilio stub.

    .venv/bin/python benchmarks/deliver.py                 # 15,000 reminders, 0 and 100 ms
    .venv/bin/python benchmarks/deliver.py -n 20000 --latency-ms 100 --workers 4

For each provider latency it builds a business DB of N patients whose prescriptions are all due
at one instant a few seconds ahead (UTC customers, quiet hours off), scans them into a fresh
state DB, starts the worker processes (``reminders worker``, waiting until RQ has registered
them), dispatches at the due instant and waits until the state DB says every reminder is sent.
It prints:

- messages/s: N over the time from the start of dispatch to the last ``sent`` row;
- lateness p50/p99: each message's ``sent_at`` minus its send time (the due instant);
- peak RSS per worker (``ru_maxrss`` of each worker process, read when it exits);
- the workers' CPU a message: all their CPU time (start-up included) over N, and apart the CPU
  they had spent before the dispatch (start-up, then waiting for the due instant) and the CPU a
  message after it; the provider stub's CPU a request;
- the baseline: the same number of no-op RQ jobs (``reminders.jobs.noop``, one job each, the
  way one-job-per-message delivery would run) drained by the same worker setup, in jobs/s.

The provider stub runs in a process of its own, so its parsing does not share a GIL with anything
measured. It shares the CPUs, though, where a real provider would not: by default it answers from
one asyncio thread (about 0.14 ms of CPU a request); ``--stub threaded`` uses the tests' stub
(``tests/twilio_stub.py``, a thread a connection, about 0.3 ms). Its CPU is printed. The workers
run as shipped (``channels.sms.concurrency`` 64, ``batch_size`` 100) unless told otherwise. Redis:
``--redis-url`` (default: database 5 of the local server, flushed first), or the embedded server
with ``--redis-url embedded``.
"""

from __future__ import annotations

import argparse
import fcntl
import multiprocessing
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reminders import lifecycle, models  # noqa: E402
from tests.twilio_stub import ACCOUNT_SID, AUTH_TOKEN  # noqa: E402

CONFIG = """\
timezone: UTC
source:
  url: sqlite:///business.db
state:
  url: {state}
{redis}rules: rules/
templates: templates/
batch_size: {batch_size}
channels:
  sms:
    provider: twilio
    account_sid: {sid}
    auth_token: {token}
    from: "+15005550006"
    api_url: {stub}
    concurrency: {concurrency}
    quiet_hours: null
"""

RULE = """\
rules:
  - name: refill-due
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_at,
             p.id AS customer_id, p.first_name, p.phone, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
    occurrence: "{{ rx_id }}"
    due: runs_out_at
    offsets: [0m]
    channels: [sms]
    template: refill-due
"""

WRITEBACK_RULE = """\
    writeback:
      sent: UPDATE prescriptions SET last_reminded_at = :at WHERE id = :rx_id
"""
WRITEBACK_CONFIG = "writeback:\n  url: sqlite:///business.db\n"

COMMAND = [sys.executable, "-c", "from reminders.cli import main; main()"]
TEMPLATE = (
    "Hi {{ first_name }}, your {{ drug_name }} runs out {{ runs_out_at|date }}. Reply DONE.\n"
)


# -- the stub, in its own process --------------------------------------------------------------


def _threaded_stub(latency_ms: float, conn: Any) -> None:
    """The tests' stub (``tests/twilio_stub.py``): a thread a connection, http.server parsing."""
    from tests.twilio_stub import TwilioStub

    with TwilioStub(latency_ms=latency_ms) as stub:
        stub._server.request_queue_size = 1024  # type: ignore[union-attr]
        conn.send(stub.url)
        conn.recv()  # until told to stop
        _report(conn, sum(stub.received.values()), len(stub.accepted))


def _report(conn: Any, received: int, accepted: int) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu = usage.ru_utime + usage.ru_stime
    conn.send({"received": received, "accepted": accepted, "cpu_s": round(cpu, 2)})


def _asyncio_stub(latency_ms: float, conn: Any) -> None:
    """Twilio's Messages API on one asyncio thread: each request answered 201 with the JSON
    Twilio sends (the tests' stub's), after ``latency_ms``, on keep-alive connections.

    The provider shares the 2 CPUs with the workers here (a real one does not): answering from
    one event loop costs it a fraction of what a thread a connection costs.
    """
    import asyncio
    import base64
    import json
    from urllib.parse import parse_qs

    from tests.twilio_stub import _message

    expected = "Basic " + base64.b64encode(f"{ACCOUNT_SID}:{AUTH_TOKEN}".encode()).decode()
    path = f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json".encode()
    counts = {"received": 0, "accepted": 0}

    def answer(status: str, body: bytes) -> bytes:
        return (
            f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    headers[name.strip().lower()] = value.strip().decode("latin-1")
                body = await reader.readexactly(int(headers.get(b"content-length", "0")))
                method, target = lines[0].split(b" ")[:2]
                if method != b"POST" or target != path:
                    writer.write(answer("404 Not Found", b'{"code": 20404, "status": 404}'))
                elif headers.get(b"authorization") != expected:
                    writer.write(answer("401 Unauthorized", b'{"code": 20003, "status": 401}'))
                else:
                    counts["received"] += 1
                    form = {k: v[0] for k, v in parse_qs(body.decode()).items()}
                    if latency_ms:
                        await asyncio.sleep(latency_ms / 1000)
                    reply = json.dumps(_message(ACCOUNT_SID, form)).encode()
                    writer.write(answer("201 Created", reply))
                    counts["accepted"] += 1
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
        port = server.sockets[0].getsockname()[1]
        conn.send(f"http://127.0.0.1:{port}")
        await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
        server.close()
        _report(conn, counts["received"], counts["accepted"])

    asyncio.run(main())


STUBS = {"asyncio": _asyncio_stub, "threaded": _threaded_stub}


class Stub:
    def __init__(self, latency_ms: float, kind: str = "asyncio") -> None:
        self.parent, child = multiprocessing.Pipe()
        self.process = multiprocessing.Process(
            target=STUBS[kind], args=(latency_ms, child), daemon=True
        )
        self.process.start()
        self.url: str = self.parent.recv()

    def stop(self) -> dict[str, int]:
        self.parent.send("stop")
        counts: dict[str, int] = self.parent.recv()
        self.process.join(timeout=10)
        return counts


# -- the project -------------------------------------------------------------------------------


def build(folder: Path, n: int, due: datetime, args: argparse.Namespace, stub_url: str) -> Path:
    """A business DB of ``n`` patients all due at ``due``, the config, rule and template."""
    (folder / "rules").mkdir(parents=True)
    (folder / "templates").mkdir()
    rule = RULE
    if args.writeback:  # every `sent` writes an outbox event (applied later, not measured)
        rule += WRITEBACK_RULE
    (folder / "rules" / "refills.yaml").write_text(rule)
    (folder / "templates" / "refill-due.sms.j2").write_text(TEMPLATE)
    redis_line = "" if args.redis_url == "embedded" else f"redis:\n  url: {args.redis_url}\n"
    (folder / "config.yaml").write_text(
        CONFIG.format(
            state=args.state_url or "sqlite:///reminders.db",
            redis=redis_line,
            batch_size=args.batch_size,
            sid=ACCOUNT_SID,
            token=AUTH_TOKEN,
            stub=stub_url,
            concurrency=args.concurrency,
        )
        + (WRITEBACK_CONFIG if args.writeback else "")
    )
    engine = sa.create_engine(f"sqlite:///{folder / 'business.db'}")
    naive = due.astimezone(UTC).replace(tzinfo=None)
    with engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TABLE patients (id INTEGER PRIMARY KEY, first_name TEXT, phone TEXT, "
            "timezone TEXT)"
        )
        conn.exec_driver_sql(
            "CREATE TABLE prescriptions (id INTEGER PRIMARY KEY, patient_id INTEGER, "
            "drug_name TEXT, runs_out_at TIMESTAMP, last_reminded_at TEXT)"
        )
        conn.execute(
            sa.text("INSERT INTO patients VALUES (:id, :name, :phone, 'UTC')"),
            [
                {"id": i, "name": f"P{i}", "phone": f"+1{212 + i // 10000}555{i % 10000:04d}"}
                for i in range(1, n + 1)
            ],
        )
        conn.execute(
            sa.text("INSERT INTO prescriptions VALUES (:id, :id, 'Lisinopril', :due, NULL)"),
            [{"id": i, "due": naive.isoformat(sep=" ")} for i in range(1, n + 1)],
        )
    engine.dispose()
    return folder / "config.yaml"


def reset_state(url: str) -> None:
    """Drop the engine's tables from a state DB given with --state-url (each run starts empty)."""
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    models.metadata.drop_all(engine)
    with engine.begin() as conn:
        conn.execute(sa.text(f"DROP TABLE IF EXISTS {models.VERSION_TABLE}"))
    engine.dispose()


def reminders(config: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [*COMMAND, "-c", str(config), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"reminders {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


# -- workers -----------------------------------------------------------------------------------


@dataclass
class Workers:
    processes: list[subprocess.Popen[bytes]]
    cpu: float = 0.0

    @classmethod
    def start(cls, config: Path, count: int, connection: redis.Redis, log: Path) -> Workers:
        from rq import Worker

        before = len(Worker.all(connection=connection))
        if before:
            # A stray worker (of an earlier, interrupted run) would take jobs it cannot serve.
            raise SystemExit(f"{before} RQ worker(s) already serve this Redis: stop them first")
        handle = log.open("ab")
        processes = [
            subprocess.Popen(
                [*COMMAND, "-c", str(config), "worker"],
                stdout=handle,
                stderr=subprocess.STDOUT,
            )
            for _ in range(count)
        ]
        deadline = time.monotonic() + 60
        while len(Worker.all(connection=connection)) < before + count:
            if time.monotonic() > deadline or any(p.poll() is not None for p in processes):
                raise SystemExit(f"workers did not start; see {log}")
            time.sleep(0.05)
        return cls(processes)

    def cpu_so_far(self) -> float:
        """The workers' CPU seconds until now (Linux: /proc), e.g. their start-up before a run."""
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for process in self.processes:
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
        return total

    def stop(self) -> list[float]:
        """SIGTERM (a warm shutdown), then each worker's peak RSS in MB (``cpu``: CPU seconds)."""
        for process in self.processes:
            process.send_signal(signal.SIGTERM)
        peaks = []
        self.cpu = 0.0
        for process in self.processes:
            _pid, _status, usage = os.wait4(process.pid, 0)
            process.returncode = 0
            peaks.append(usage.ru_maxrss / 1024)  # KB on Linux
            self.cpu += usage.ru_utime + usage.ru_stime
        return peaks


# -- the runs ----------------------------------------------------------------------------------


def baseline(config: Path, args: argparse.Namespace, connection: redis.Redis, log: Path) -> dict:
    """N no-op jobs, one each, drained by the same worker setup: RQ's own cost per job."""
    from rq import Queue
    from rq.registry import FinishedJobRegistry

    connection.flushdb()
    queue = Queue("reminders-sms", connection=connection)
    workers = Workers.start(config, args.workers, connection, log)
    try:
        started = time.monotonic()
        for start in range(0, args.n, 1000):
            with connection.pipeline() as pipe:
                datas = [
                    Queue.prepare_data("reminders.jobs.noop", result_ttl=600)
                    for _ in range(min(1000, args.n - start))
                ]
                queue.enqueue_many(datas, pipeline=pipe)
                pipe.execute()
        finished = FinishedJobRegistry(queue=queue)
        while finished.count < args.n:
            time.sleep(0.02)
        elapsed = time.monotonic() - started
    finally:
        rss = workers.stop()
    return {"jobs_per_s": args.n / elapsed, "seconds": elapsed, "rss": rss}


def deliveries(latency_ms: float, args: argparse.Namespace, log: Path, with_baseline: bool) -> dict:
    stub = Stub(latency_ms, args.stub)
    with tempfile.TemporaryDirectory(prefix="reminders-bench-") as tmp:
        folder = Path(tmp)
        lead = timedelta(seconds=args.lead)
        due = (datetime.now(UTC) + lead).replace(microsecond=0) + timedelta(seconds=1)
        config = build(folder, args.n, due, args, stub.url)
        env = {k: v for k, v in os.environ.items() if k != "REMINDERS_NOW"}
        if args.state_url:
            reset_state(args.state_url)
        reminders(config, "db", "upgrade", env=env)
        reminders(config, "scan", env=env)
        from reminders.app import App
        from reminders.dispatch import dispatch
        from reminders.redis_conn import url_for

        app = App(config)
        connection = redis.Redis.from_url(url_for(app.config))
        connection.flushdb()
        workers = Workers.start(config, args.workers, connection, log)
        r = models.reminder
        engine = app.state
        try:
            wait = (due - datetime.now(UTC)).total_seconds()
            if wait < 0:
                raise SystemExit(f"setup took {-wait:.1f} s more than --lead {args.lead}: raise it")
            time.sleep(wait)
            before = workers.cpu_so_far()  # start-up (and waiting for the due instant)
            started = time.monotonic()
            counts = dispatch(app)
            dispatched = time.monotonic() - started
            while True:
                with engine.connect() as conn:
                    sent = conn.execute(
                        sa.select(sa.func.count()).where(r.c.status == lifecycle.SENT)
                    ).scalar_one()
                if sent >= counts.enqueued:
                    break
                time.sleep(0.02)
            elapsed = time.monotonic() - started
        finally:
            rss = workers.stop()
        with engine.connect() as conn:
            rows = conn.execute(sa.select(r.c.send_at, r.c.sent_at, r.c.status)).all()
        stubbed = stub.stop()
        connection.flushdb()
        base = baseline(config, args, connection, log) if with_baseline else None
        lateness = sorted((row.sent_at - row.send_at).total_seconds() for row in rows)
        statuses: dict[str, int] = {}
        for row in rows:
            statuses[row.status] = statuses.get(row.status, 0) + 1
        result = {
            "latency_ms": latency_ms,
            "n": counts.enqueued,
            "jobs": counts.jobs,
            "dispatch_s": dispatched,
            "seconds": elapsed,
            "messages_per_s": counts.enqueued / elapsed,
            "p50": statistics.median(lateness),
            "p99": lateness[min(len(lateness) - 1, int(len(lateness) * 0.99))],
            "rss": rss,
            "cpu_ms": workers.cpu * 1000 / max(1, counts.enqueued),
            "startup_cpu_s": before,
            "sending_cpu_ms": (workers.cpu - before) * 1000 / max(1, counts.enqueued),
            "statuses": statuses,
            "provider": stubbed,
            "baseline": base,
        }
        connection.flushdb()
        app.state.dispose()
        return result


def report(result: dict) -> None:
    rss = ", ".join(f"{x:.0f}" for x in result["rss"])
    print(
        f"latency {result['latency_ms']:>5.0f} ms: {result['n']} messages in {result['jobs']} "
        f"jobs, {result['seconds']:.2f} s (dispatch {result['dispatch_s']:.2f} s) -> "
        f"{result['messages_per_s']:.0f} messages/s; lateness p50 {result['p50']:.2f} s, "
        f"p99 {result['p99']:.2f} s; peak RSS per worker {rss} MB"
    )
    provider = result["provider"]
    print(
        f"    statuses {result['statuses']}, provider {provider} "
        f"({provider['cpu_s'] * 1000 / max(1, provider['received']):.2f} ms of CPU a request)"
    )
    print(
        f"    workers' CPU {result['cpu_ms']:.2f} ms a message, start-up included "
        f"({result['startup_cpu_s']:.2f} s before the dispatch; "
        f"{result['sending_cpu_ms']:.2f} ms a message after it)"
    )
    base = result["baseline"]
    if base:
        ratio = result["messages_per_s"] / base["jobs_per_s"]
        brss = ", ".join(f"{x:.0f}" for x in base["rss"])
        print(
            f"    baseline: {result['n']} no-op RQ jobs in {base['seconds']:.2f} s -> "
            f"{base['jobs_per_s']:.0f} jobs/s (RSS {brss} MB); delivery is {ratio:.1f}x that"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=15000, help="reminders (default 15000)")
    parser.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 100.0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument(
        "--concurrency", type=int, default=64, help="requests in flight a worker (as shipped: 64)"
    )
    parser.add_argument(
        "--stub",
        choices=sorted(STUBS),
        default="asyncio",
        help="the provider stub: one asyncio thread (default) or the tests' thread a connection",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/5")
    parser.add_argument("--state-url", default=None, help="state DB (default: SQLite in the run)")
    parser.add_argument("--lead", type=float, default=45.0, help="seconds allowed for setup")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument(
        "--writeback",
        action="store_true",
        help="the rule writes `sent` back: each send also writes its outbox event",
    )
    args = parser.parse_args(argv)
    print(
        f"{args.n} reminders, {args.workers} workers, batch {args.batch_size}, "
        f"concurrency {args.concurrency}, {os.cpu_count()} CPUs"
    )
    log = Path(tempfile.gettempdir()) / "reminders-bench-workers.log"
    # The delivery tests take databases 3-5 under these locks: never flush one under a test.
    database = args.redis_url.rsplit("/", 1)[-1]
    lock = (Path(tempfile.gettempdir()) / f"reminders-test-redis-{database}.lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    for index, latency in enumerate(args.latency_ms):
        report(deliveries(latency, args, log, with_baseline=args.baseline and index == 0))


if __name__ == "__main__":
    main()
