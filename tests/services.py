"""Real services for the tests: Redis, PostgreSQL, MariaDB, an SMTP server, Prism.

A test that needs a service skips with the reason when the service is absent, and fails when
``CI=true`` (CI must run everything).
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

REDIS_HOST = os.environ.get("REMINDERS_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("REMINDERS_TEST_REDIS_PORT", "6379"))
PG_DSN = os.environ.get(
    "REMINDERS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def unavailable(reason: str) -> None:
    """Skip the test locally, fail it in CI."""
    if IN_CI:
        pytest.fail(f"required service unavailable in CI: {reason}", pytrace=False)
    pytest.skip(reason)


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving(wsgi_app: Callable[..., Any]) -> Iterator[int]:
    """``wsgi_app`` served by werkzeug's threaded server on a free loopback port, in a thread;
    yields the port, and stops the server afterwards."""
    from werkzeug.serving import make_server

    port = free_port()
    server = make_server("127.0.0.1", port, wsgi_app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield port
    finally:
        server.shutdown()
        thread.join(10)


def redis_url(db: int) -> str:
    """A URL for Redis database ``db`` on the test server (skips/fails when Redis is absent)."""
    if not port_open(REDIS_HOST, REDIS_PORT):
        unavailable(f"Redis is not running on {REDIS_HOST}:{REDIS_PORT}")
    return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"


@contextmanager
def flushed_redis(db: int) -> Iterator[str]:
    """The URL of Redis database ``db``, flushed before and after (the body of a fixture)."""
    import redis

    url = redis_url(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@contextmanager
def postgres_database() -> Iterator[str]:
    """Create a throw-away PostgreSQL database and yield its SQLAlchemy URL; dropped afterwards."""
    import sqlalchemy as sa

    if not port_open("127.0.0.1", 5432):
        unavailable("PostgreSQL is not running on 127.0.0.1:5432")
    name = f"reminders_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(PG_DSN, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:  # pragma: no cover - depends on the machine
        admin.dispose()
        unavailable(f"PostgreSQL refused a test database: {exc}")
    base = PG_DSN.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


MARIADB_URL = os.environ.get("REMINDERS_TEST_MARIADB", "mysql://root@127.0.0.1:3306/test")


@contextmanager
def mariadb_database() -> Iterator[str]:
    """Create a throw-away MariaDB (or MySQL) database and yield its URL (``mysql://``, the
    engine's own driver); dropped afterwards."""
    import sqlalchemy as sa

    from reminders import mysql

    server = sa.engine.make_url(MARIADB_URL)
    try:
        mysql.engine_url(server).get_dialect().import_dbapi()
    except ImportError:
        unavailable("mysqlclient is not installed: pip install -e '.[mysql]' (make install-test)")
    if not port_open(server.host or "127.0.0.1", server.port or 3306):
        unavailable(f"MariaDB is not running on {server.host}:{server.port or 3306}")
    name = f"reminders_test_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(mysql.engine_url(server))
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
    except sa.exc.OperationalError as exc:  # pragma: no cover - depends on the machine
        admin.dispose()
        unavailable(f"MariaDB refused a test database: {exc}")
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f"DROP DATABASE IF EXISTS `{name}`")
        admin.dispose()


@contextmanager
def business_database(backend: str) -> Iterator[str]:
    """A throw-away server database on ``backend`` ("postgresql" or "mariadb")."""
    if backend == "mariadb":
        with mariadb_database() as url:
            yield url
    else:
        with postgres_database() as url:
            yield url
