"""``GET /healthz``: 200 when the state DB and Redis answer, 503 naming what failed; with the
age of the oldest reminder due and not sent.

The answer says which service failed, not why (it is public); the reason goes to the log. Without
``redis.url`` the embedded Redis is asked whether it runs, never started from here.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import redis
import sqlalchemy as sa
from flask import Blueprint, jsonify
from flask.typing import ResponseReturnValue

from reminders import dberrors
from reminders.config import Config
from reminders.metrics import oldest_due_unsent

from .context import engine

log = logging.getLogger(__name__)

blueprint = Blueprint("health", __name__)

TIMEOUT = 2.0  # seconds a service gets to answer
_clients: dict[tuple[int, str], redis.Redis] = {}


def _redis(url: str) -> redis.Redis:
    # One client per process (and per forked worker): a health probe every few seconds must
    # not open a new connection each time.
    key = (os.getpid(), url)
    client = _clients.get(key)
    if client is None:
        client = _clients[key] = redis.Redis.from_url(
            url, socket_connect_timeout=TIMEOUT, socket_timeout=TIMEOUT
        )
    return client


def check_redis(config: Config) -> None:
    """Raise when the config's Redis does not answer."""
    if config.redis.url:
        _redis(config.redis.url).ping()
        return
    from reminders import redis_conn

    if not redis_conn.embedded(config).running():
        raise ConnectionError("the embedded Redis is not running")


@blueprint.get("/healthz")
def healthz() -> ResponseReturnValue:
    """State DB and Redis, each ``ok`` or ``unreachable``."""
    app = engine()
    checks: dict[str, str] = {}
    lag: float | None = None
    try:
        with app.state.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
            checks["state_db"] = "ok"
            _by_rule, lag = oldest_due_unsent(conn, app.now())
    except Exception as exc:  # any failure is "not healthy"; the reason goes to the log
        log.warning("healthz: state DB: %s", _short(exc))
        # Reachable but not migrated (the lag's table missing): still up, without the lag.
        checks.setdefault("state_db", "unreachable")
    try:
        check_redis(app.config)
        checks["redis"] = "ok"
    except Exception as exc:
        log.warning("healthz: Redis: %s", _short(exc))
        checks["redis"] = "unreachable"
    healthy = all(v == "ok" for v in checks.values())
    body: dict[str, Any] = {"status": "ok" if healthy else "unhealthy", **checks}
    if lag is not None:
        # The age of the oldest reminder due and not sent (reminders_oldest_due_unsent_seconds):
        # a plain health check can alert on it; it does not make the answer a 503.
        body["oldest_due_unsent_seconds"] = lag
    return jsonify(body), 200 if healthy else 503


def _short(exc: Exception) -> str:
    return f"{type(exc).__name__}: {dberrors.message(exc)}"[:300]
