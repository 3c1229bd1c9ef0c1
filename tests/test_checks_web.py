"""``POST /v1/checks/<name>`` through real HTTP requests to the running web app.

The app is the production one (``reminders.web.create_app``), served on a free loopback port in a
thread, and once by the production server (``reminders web``); the shop (SQLite, PostgreSQL and
MariaDB) is the one of ``test_checks.py``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import checks
from reminders.app import App
from tests import services
from tests.test_checks import NOW, Shop, build_shop

KEY = "test-key-0123456789"
OTHER_KEY = "second-key-abcdef"
SECRET = "a-link-signing-secret-of-enough-length-0123456789"
OWNED = {"customer_id": 7, "sku": "B01"}


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: Any


@dataclass
class Server:
    port: int
    app: App

    def request(
        self,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        raw: bytes | None = None,
        authorization: str | None = None,
        method: str = "POST",
    ) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if authorization is not None:
            headers["Authorization"] = authorization
        elif key is not None:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else json.dumps(body).encode()
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            text = response.read().decode()
            found = {k.lower(): v for k, v in response.getheaders()}
        finally:
            conn.close()
        is_json = found.get("content-type", "").startswith("application/json")
        return Reply(response.status, found, json.loads(text) if is_json else text)

    def check(self, name: str, params: Any = None, **kwargs: Any) -> Reply:
        return self.request(f"/v1/checks/{name}", params, **kwargs)


def serve(shop: Shop) -> Iterator[Server]:
    """The production Flask app of ``shop``, served on a free loopback port in a thread."""
    from reminders.web import create_app

    app = App(shop.config_path)
    flask_app = create_app(app)
    try:
        with services.serving(flask_app) as port:
            yield Server(port, app)
    finally:
        checks.dispose_engines()


@pytest.fixture
def web_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_NOW", NOW)
    monkeypatch.setenv("REMINDERS_SECRET", SECRET)
    monkeypatch.setenv("REMINDERS_API_KEYS", f" {KEY} , {OTHER_KEY},")


@pytest.fixture(params=["sqlite", "postgresql", "mariadb"])
def server(request: pytest.FixtureRequest, tmp_path: Path, web_env: None) -> Iterator[Server]:
    """The shop's web app, on SQLite, PostgreSQL and MariaDB."""
    if request.param == "sqlite":
        yield from serve(build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}"))
        return
    with services.business_database(request.param) as url:
        yield from serve(build_shop(tmp_path, url))


@pytest.fixture
def sqlite_server(tmp_path: Path, web_env: None) -> Iterator[Server]:
    yield from serve(build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}"))


# --- the answers ----------------------------------------------------------------------------------


def test_duplicate(server: Server) -> None:
    reply = server.check("already-owned", OWNED)
    assert reply.status == 200
    assert reply.headers["content-type"] == "application/json"
    assert reply.body["duplicate"] is True
    assert reply.body["match"]["order_id"] == 101
    assert reply.body["match"]["title"] == "The Hobbit (e-book)"
    assert reply.body["match"]["placed_at"].replace("T", " ").startswith("2027-03-03 10:00:00")
    assert reply.body["message"] == (
        "You already bought The Hobbit (e-book) on Mar 3, 2027 (order 101). Buy it again?"
    )


def test_not_a_duplicate(server: Server) -> None:
    reply = server.check("already-owned", {"customer_id": 7, "sku": "B02"})
    assert (reply.status, reply.body) == (200, {"duplicate": False})
    refunded = server.check("already-owned", {"customer_id": 8, "sku": "B01"})
    assert (refunded.status, refunded.body) == (200, {"duplicate": False})


def test_the_answer_is_the_same_as_the_python_function_and_the_window_applies(
    server: Server,
) -> None:
    for params in ({"customer_id": 7, "sku": "P02"}, {"customer_id": 7, "sku": "P01"}):
        reply = server.check("recently-bought", params)
        assert reply.status == 200
        assert reply.body == checks.run_check(server.app, "recently-bought", params)
    assert server.check("recently-bought", {"customer_id": 7, "sku": "P01"}).body == {
        "duplicate": False
    }


def test_bad_parameters_are_a_422_naming_each(server: Server) -> None:
    reply = server.check("already-owned", {"customer_id": "7", "colour": "red"})
    assert reply.status == 422
    assert reply.body == {
        "error": "bad parameters for check already-owned",
        "params": {
            "customer_id": 'must be an integer, got the string "7"',
            "sku": "missing: a string is required",
            "colour": "not a parameter of this check (allowed: customer_id, sku)",
        },
        "allowed": {"customer_id": "int", "sku": "str"},
    }


def test_an_integer_beyond_64_bits_is_a_422_naming_it(server: Server) -> None:
    for value in (10**30, -(2**63) - 1, 2**63):
        reply = server.check("already-owned", {"customer_id": value, "sku": "B01"})
        assert reply.status == 422, reply.body
        assert reply.body["params"] == {
            "customer_id": "must be an integer from -9223372036854775808 to 9223372036854775807 "
            f"(64 bits), got the number {value}"
        }
    edge = server.check("already-owned", {"customer_id": 2**63 - 1, "sku": "B01"})
    assert edge.status == 200 and edge.body == {"duplicate": False}


def test_a_body_that_is_not_a_json_object(sqlite_server: Server) -> None:
    reply = sqlite_server.check("already-owned", raw=b'{"customer_id": 7,')
    assert reply.status == 400
    assert reply.body["error"].startswith("the body is not JSON: ")
    reply = sqlite_server.check("already-owned", [7, "B01"])
    assert reply.status == 422
    assert reply.body == {
        "error": "the body must be a JSON object of parameters",
        "allowed": {"customer_id": "int", "sku": "str"},
    }
    empty = sqlite_server.check("already-owned", raw=b"")
    assert empty.status == 422
    assert set(empty.body["params"]) == {"customer_id", "sku"}


def test_an_unknown_check_is_a_404_listing_the_checks(sqlite_server: Server) -> None:
    reply = sqlite_server.check("nope", OWNED)
    assert reply.status == 404
    assert reply.body["error"] == 'no check named "nope"'
    assert "already-owned" in reply.body["checks"]


def test_a_get_is_refused_with_json(sqlite_server: Server) -> None:
    reply = sqlite_server.check("already-owned", raw=b"", method="GET")
    assert reply.status == 405
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers["allow"] == "POST"
    assert reply.body == {"error": "Method Not Allowed"}


def test_answers_are_not_cached_nor_sniffed(sqlite_server: Server) -> None:
    for reply in (
        sqlite_server.check("already-owned", OWNED),
        sqlite_server.check("already-owned", OWNED, key="wrong"),
    ):
        assert reply.headers["cache-control"] == "no-store"
        assert reply.headers["x-content-type-options"] == "nosniff"
        assert reply.headers["content-length"] == str(
            len(json.dumps(reply.body, separators=(",", ":"), ensure_ascii=False).encode())
        )


@pytest.mark.parametrize("path", ["/v1/checks/", "/v1/checks/already-owned/extra"])
def test_paths_that_name_no_check_are_404(sqlite_server: Server, path: str) -> None:
    reply = sqlite_server.request(path, OWNED)
    assert reply.status == 404
    assert reply.body == {"error": "Not Found"}


def test_a_body_over_64_kib_is_refused_unread(sqlite_server: Server) -> None:
    padding = "x" * (64 * 1024)
    reply = sqlite_server.check("already-owned", {**OWNED, "padding": padding})
    assert reply.status == 413
    assert reply.body == {"error": "Request Entity Too Large"}


def test_a_chunked_body_is_read_up_to_the_limit(sqlite_server: Server) -> None:
    def chunked(body: bytes) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", sqlite_server.port, timeout=60)
        try:
            conn.putrequest("POST", "/v1/checks/already-owned")
            conn.putheader("Authorization", f"Bearer {KEY}")
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Transfer-Encoding", "chunked")
            conn.endheaders()
            for start in range(0, len(body), 8192):
                part = body[start : start + 8192]
                conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            conn.send(b"0\r\n\r\n")
            response = conn.getresponse()
            return Reply(response.status, {}, json.loads(response.read()))
        finally:
            conn.close()

    assert chunked(json.dumps(OWNED).encode()).body["duplicate"] is True
    huge = json.dumps({**OWNED, "padding": "x" * (64 * 1024)}).encode()
    assert chunked(huge).status == 413


def test_a_url_over_4_kib_is_refused(sqlite_server: Server) -> None:
    reply = sqlite_server.check("already-owned?" + "x" * 5000, OWNED)
    assert reply.status == 414
    assert reply.body == {"error": HTTPStatus(414).phrase}


# --- keys -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authorization",
    [f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer  ", f"Basic {KEY}", KEY, ""],
)
def test_bad_key(server: Server, authorization: str) -> None:
    reply = server.check("already-owned", OWNED, authorization=authorization)
    assert reply.status == 401
    assert "duplicate" not in reply.body
    assert reply.headers["www-authenticate"].startswith('Bearer realm="reminders"')


def test_no_key_is_a_401_and_an_unknown_check_does_not_leak(sqlite_server: Server) -> None:
    reply = sqlite_server.check("already-owned", OWNED, key=None)
    assert reply.status == 401
    assert reply.body == {
        "error": "an API key is required: send the header Authorization: Bearer <key>"
    }
    assert sqlite_server.check("nope", OWNED, key="wrong").status == 401


def test_every_configured_key_works(sqlite_server: Server) -> None:
    assert sqlite_server.check("already-owned", OWNED, key=OTHER_KEY).body["duplicate"] is True
    assert sqlite_server.check("already-owned", OWNED, key=KEY).body["duplicate"] is True


@pytest.mark.parametrize("keys", [None, "", " , "])
def test_no_keys_configured_refuses_every_request(
    sqlite_server: Server, monkeypatch: pytest.MonkeyPatch, keys: str | None
) -> None:
    if keys is None:
        monkeypatch.delenv("REMINDERS_API_KEYS")
    else:
        monkeypatch.setenv("REMINDERS_API_KEYS", keys)
    for key in (KEY, "", None):
        reply = sqlite_server.check("already-owned", OWNED, key=key)
        assert reply.status == 403
        assert reply.body == {
            "error": "checks are disabled: no API key is configured (set REMINDERS_API_KEYS)"
        }


# --- slow and failing databases -------------------------------------------------------------------


def test_timeout(server: Server) -> None:
    reply = server.check("slow", {"customer_id": 7})
    assert reply.status == 200
    assert reply.body == {
        "duplicate": None,
        "status": "unknown",
        "reason": "the query took longer than 100 ms",
    }
    assert server.check("already-owned", OWNED).body["duplicate"] is True


def _open_files(path: Path) -> int:
    found = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            if Path(os.readlink(fd)) == path:
                found += 1
        except OSError:
            continue
    return found


def test_fifty_timeouts_in_a_row_leave_the_pool_usable(server: Server) -> None:
    for _ in range(50):
        reply = server.check("slow", {"customer_id": 7})
        assert reply.body["status"] == "unknown"
    assert server.check("already-owned", OWNED).body["duplicate"] is True
    engine = checks.check_engine(
        server.app.config.source_url, server.app.ruleset.check("slow").timeout
    )
    pool: Any = engine.pool
    assert pool.checkedout() == 0
    if engine.dialect.name == "sqlite":
        # every timed-out connection went back to its pool and was used again
        database = sa.engine.make_url(server.app.config.source_url).database
        assert database is not None
        # at most one connection left open by each engine: one per timeout among the checks
        engines = len({check.timeout for check in server.app.ruleset.checks})
        assert 0 < _open_files(Path(database)) <= engines
    elif engine.dialect.name == "postgresql":
        url = server.app.config.source_url
        admin = sa.create_engine(url)
        try:
            with admin.connect() as conn:
                states = conn.execute(
                    sa.text(
                        "SELECT state, count(*) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "GROUP BY state"
                    )
                ).all()
        finally:
            admin.dispose()
        by_state = dict(states)
        assert set(by_state) <= {"idle"}, by_state  # nothing running, nothing left in a transaction
        assert sum(by_state.values()) <= pool.size() + pool._max_overflow
    else:
        admin = sa.create_engine(server.app.config.source_url)
        try:
            with admin.connect() as conn:
                connections = conn.execute(
                    sa.text(
                        "SELECT p.id, p.command, p.info, t.trx_id IS NOT NULL AS in_transaction "
                        "FROM information_schema.processlist p LEFT JOIN "
                        "information_schema.innodb_trx t ON t.trx_mysql_thread_id = p.id "
                        "WHERE p.db = database() AND p.id <> connection_id()"
                    )
                ).all()
        finally:
            admin.dispose()
        # No check's query still running (they all read the view owned; the server may still be
        # tidying up after the pool's last ROLLBACK, which it has already answered), and no idle
        # connection left in a transaction.
        assert [c for c in connections if "owned" in (c.info or "")] == []
        assert [c for c in connections if c.command == "Sleep" and c.in_transaction] == []
        assert len(connections) <= pool.size() + pool._max_overflow


LOCKS = {
    "postgresql": (("BEGIN", "LOCK TABLE orders IN ACCESS EXCLUSIVE MODE"), "ROLLBACK"),
    "mariadb": (("LOCK TABLES orders WRITE",), "UNLOCK TABLES"),
}


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_table_locked_by_a_writer_answers_unknown_then_recovers(
    tmp_path: Path, web_env: None, backend: str
) -> None:
    lock, unlock = LOCKS[backend]
    with services.business_database(backend) as url:
        shop = build_shop(tmp_path, url)
        for server in serve(shop):
            writer = sa.create_engine(url)
            try:
                with writer.connect() as conn:
                    for statement in lock:
                        conn.exec_driver_sql(statement)
                    reply = server.check("already-owned", OWNED)
                    assert reply.status == 200
                    assert reply.body == {
                        "duplicate": None,
                        "status": "unknown",
                        "reason": "the query took longer than 200 ms",
                    }
                    conn.exec_driver_sql(unlock)
                assert server.check("already-owned", OWNED).body["duplicate"] is True
            finally:
                writer.dispose()


def test_a_sqlite_database_locked_by_a_writer_answers_unknown(
    tmp_path: Path, web_env: None
) -> None:
    shop = build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}")
    for server in serve(shop):
        import sqlite3

        writer = sqlite3.connect(tmp_path / "shop.db", isolation_level=None)
        try:
            writer.execute("BEGIN EXCLUSIVE")  # rollback journal: readers must wait
            reply = server.check("already-owned", OWNED)
            assert reply.body == {
                "duplicate": None,
                "status": "unknown",
                "reason": "the business DB stayed locked for 200 ms",
            }
            writer.execute("ROLLBACK")
        finally:
            writer.close()
        assert server.check("already-owned", OWNED).body["duplicate"] is True


def test_a_broken_query_is_a_500_with_the_database_message(sqlite_server: Server) -> None:
    reply = sqlite_server.check("broken", {"customer_id": 7})
    assert reply.status == 500
    assert reply.body["duplicate"] is None
    assert reply.body["status"] == "error"
    assert "no_such_column" in reply.body["error"]


def test_many_concurrent_checkouts_get_their_own_answers(sqlite_server: Server) -> None:
    """More threads than a pool's size, at once (SQLite connections must not be shared)."""
    from concurrent.futures import ThreadPoolExecutor

    asks = [({"customer_id": 7, "sku": "B01"}, True), ({"customer_id": 7, "sku": "B02"}, False)]

    def client(i: int) -> list[bool]:
        wrong = []
        for n in range(20):
            params, duplicate = asks[(i + n) % 2]
            reply = sqlite_server.check("already-owned", params)
            wrong.append(reply.status != 200 or reply.body["duplicate"] is not duplicate)
        return wrong

    with ThreadPoolExecutor(12) as pool:
        results = [w for ws in pool.map(client, range(12)) for w in ws]
    assert len(results) == 240
    assert not any(results)


@contextmanager
def reminders_web(shop: Shop, log: Path, **env: str) -> Iterator[tuple[Server, subprocess.Popen]]:
    """``reminders web`` (granian, 2 forked workers of 2 threads) serving ``shop``; output to
    ``log``; stopped with SIGTERM to its process group."""
    command = str(Path(sys.executable).with_name("reminders"))
    config = ["-c", str(shop.config_path)]
    subprocess.run([command, *config, "db", "upgrade"], check=True, capture_output=True)
    port = services.free_port()
    with open(log, "wb") as sink:
        proc = subprocess.Popen(
            [command, *config, "web", "--port", str(port), "--workers", "2", "--threads", "2"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env},
        )
    try:
        deadline = time.monotonic() + 60
        while not services.port_open("127.0.0.1", port, 0.2):
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "reminders web did not start"
            time.sleep(0.1)
        yield Server(port, shop.app()), proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
        # `web` starts the embedded Redis (its own, daemonized, outliving it): stop it too.
        from reminders import redis_conn

        redis_conn.embedded(shop.app().config).stop(save=False)
    output = log.read_text()
    assert "SIGSEGV" not in output
    assert "Traceback" not in output


def test_served_by_reminders_web(tmp_path: Path, web_env: None) -> None:
    shop = build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}")
    # Named like a request header: it must not stand in for the header a request lacks.
    with reminders_web(shop, tmp_path / "web.log", HTTP_AUTHORIZATION=f"Bearer {KEY}") as (
        server,
        _proc,
    ):
        for _ in range(4):  # both workers, whichever takes the connection
            assert server.check("already-owned", OWNED).body["match"]["order_id"] == 101
            assert server.check("already-owned", {"customer_id": 7, "sku": "B02"}).body == {
                "duplicate": False
            }
            assert server.check("slow", {"customer_id": 7}).body["status"] == "unknown"
        assert server.check("already-owned", OWNED, key="wrong").status == 401
        assert server.check("already-owned", OWNED, key=None).status == 401
        assert server.check("already-owned", {"customer_id": 7}).status == 422
    assert (
        "ignoring the environment variable HTTP_AUTHORIZATION" in (tmp_path / "web.log").read_text()
    )


def _wait_for(what: Callable[[], bool], seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sighup_reloads_the_rules_and_a_broken_reload_keeps_serving(
    tmp_path: Path, web_env: None
) -> None:
    shop = build_shop(tmp_path, f"sqlite:///{tmp_path / 'shop.db'}")
    rules = shop.root / "rules" / "checks.yaml"
    log = tmp_path / "web.log"
    with reminders_web(shop, log) as (server, proc):

        def respawned(times: int) -> bool:  # granian replaces the workers one after another
            return log.read_text().count("Stopped old worker-2") >= times

        assert server.check("owned-again", OWNED).status == 404
        text = rules.read_text()
        rules.write_text(text.replace("  - name: slow\n", AGAIN + "  - name: slow\n"))
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: respawned(1))
        for _ in range(8):  # every worker has the new rules
            assert server.check("owned-again", OWNED).body["match"]["order_id"] == 101

        rules.write_text("checks: [this is not a check\n")
        proc.send_signal(signal.SIGHUP)
        _wait_for(lambda: respawned(2))
        for _ in range(8):  # respawned with the app that was running
            assert server.check("owned-again", OWNED).body["duplicate"] is True
            assert server.check("already-owned", OWNED).body["duplicate"] is True
    output = log.read_text()
    refused = "reload refused, the running configuration stays: rules/checks.yaml:2: not valid YAML"
    assert refused in output


AGAIN = """\
  - name: owned-again
    query: |
      SELECT order_id FROM owned WHERE customer_id = :customer_id AND sku = :sku LIMIT 1
    params: {customer_id: int, sku: str}
"""


def test_a_check_name_is_read_as_utf8(sqlite_server: Server) -> None:
    reply = sqlite_server.check("%C3%A9t%C3%A9", OWNED)
    assert reply.status == 404
    assert reply.body["error"] == 'no check named "été"'


def test_requests_do_not_carry_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from reminders.web.front import WSGIFront

    monkeypatch.setenv("REMINDERS_SECRET", "do-not-leak-this-secret-0123456789")
    seen: dict[str, Any] = {}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.update(environ)
        start_response("204 No Content", [])
        return [b""]

    scope = {
        "type": "http",
        "method": "GET",
        "path": "/healthz",
        "raw_path": b"/healthz",
        "query_string": b"",
        "headers": [(b"host", b"reminders.example.com")],
        "http_version": "1.1",
        "scheme": "http",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(WSGIFront(app, 1)(scope, receive, send))
    assert sent[0]["status"] == 204
    assert seen["PATH_INFO"] == "/healthz"
    assert seen["HTTP_HOST"] == "reminders.example.com"
    assert seen["wsgi.version"] == (1, 0)
    assert "REMINDERS_SECRET" not in seen
    assert not set(seen) & set(os.environ)
