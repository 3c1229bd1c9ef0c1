"""``reminders web``: the Flask app served by granian, embedded (no separate config file).

granian parses HTTP in Rust (hyper); its event loop receives each request whole (the ASGI front,
:mod:`reminders.web.front`, bounding the time a body may take) and hands it to the WSGI app on one
of ``threads`` Python threads a worker process, so a stalled client holds no thread. A Python HTTP
server (gunicorn's gthread workers) spent about 1 ms of CPU a request before the app ran, twice the
whole cost of a checkout's check; see the README's performance section for the figures.

The app is built and checked once in the master before the workers start (a bad config or a
missing secret stops the command with a clear error); forked workers reuse it, and the state DB's
pool is emptied first so no worker shares a parent's connection. Where workers are spawned rather
than forked they build it again from the config file. The access log masks the tokens of customer
links: they are credentials and name an address.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Callable
from typing import Any

from flask import Flask
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import MPServer

from reminders import state_db
from reminders.app import App
from reminders.errors import InputError, RuntimeFailure, ServiceUnavailable

from . import create_app
from .front import BODY_TIMEOUT, MAX_HEADER_BYTES, WSGIFront

log = logging.getLogger(__name__)

_TOKEN = re.compile(r"(/(?:unsubscribe|preferences)/)[^/?#\s\"]+")
ACCESS_FORMAT = '%(addr)s - "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).1fms'

# The app built by the master, reused by forked workers (keyed by config file).
_built: dict[str, Flask] = {}


class MaskTokens(logging.Filter):
    """Replaces the tokens of customer links in access-log lines by ``…``."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, dict) and isinstance(args.get("path"), str):
            record.args = {**args, "path": _TOKEN.sub(r"\1…", args["path"])}
        elif isinstance(record.msg, str):
            record.msg = _TOKEN.sub(r"\1…", record.msg)
        return True


def log_config() -> dict[str, Any]:
    """granian's logging: errors to stdout with a timestamp; access lines masked; one JSON object
    a line with ``--log-format json`` (``REMINDERS_LOG_FORMAT``)."""
    from reminders import logs

    stamp = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    if logs.chosen() == "json":
        as_json = {"()": logs.JsonFormatter}
        formatters: dict[str, Any] = {"generic": as_json, "access": as_json}
    else:
        formatters = {
            "generic": {"format": stamp},
            "access": {"format": "%(asctime)s [%(process)d] %(message)s"},
        }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"mask": {"()": MaskTokens}},
        "formatters": formatters,
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "generic",
                "stream": "ext://sys.stdout",
            },
            "access": {
                "class": "logging.StreamHandler",
                "formatter": "access",
                "filters": ["mask"],
                "stream": "ext://sys.stdout",
            },
        },
        "loggers": {
            "_granian": {"handlers": ["console"], "level": "INFO", "propagate": False},
            "granian.access": {
                "handlers": ["access"],
                "level": "INFO",  # written only with log_access (--access-log)
                "propagate": False,
            },
        },
        "root": {"handlers": ["console"], "level": "INFO"},
    }


def target(config_file: str, threads: int, body_timeout: float) -> str:
    """What granian hands each worker's :func:`load_app` (a text: spawned workers get it too)."""
    return f"{threads} {body_timeout!r} {config_file}"


def load_app(target: str) -> WSGIFront:
    """The app of a worker: the master's when forked, else built from the config file; behind
    the front that receives each request whole on ``threads`` threads."""
    return front(target, _built, create_app)


def front(target: str, built: dict[str, Flask], create: Callable[[App], Flask]) -> WSGIFront:
    """The Flask app ``create`` makes for the config of ``target`` (the one in ``built`` when
    the master made it before forking), behind the front, on the target's threads."""
    threads, body_timeout, config_file = target.split(" ", 2)
    made = built.get(config_file)
    if made is None:
        made = built[config_file] = create(App(config_file))
    return WSGIFront(made, int(threads), body_timeout=float(body_timeout))


def _request_like(name: str) -> bool:
    return name.startswith(_CGI_PREFIXES) or name in _CGI_NAMES


_CGI_PREFIXES = ("HTTP_", "CONTENT_", "REMOTE_", "SERVER_", "REQUEST_", "wsgi.")
_CGI_NAMES = frozenset({"PATH_INFO", "QUERY_STRING", "SCRIPT_NAME", "GATEWAY_INTERFACE"})


def _drop_request_like_variables() -> None:
    """Remove environment variables named like request data (``HTTP_AUTHORIZATION``...).

    A WSGI server that starts each request's environ from the environment (granian's WSGI
    interface, CGI) would let such a variable stand in for a header or a length the client did not
    send (``HTTP_PROXY`` is a common one); the front builds its own, and this keeps it so.
    """
    for name in [n for n in os.environ if _request_like(n)]:
        log.warning("ignoring the environment variable %s: it is named like request data", name)
        del os.environ[name]


def _reload(config_file: str) -> None:
    """On SIGHUP, before the workers are respawned: build the app again from ``config_file``.

    A config, rule or template that does not load keeps the running app (and says why): a
    reload never takes the endpoint down.
    """
    try:
        app = App(config_file)
        fresh = create_app(app)
        state_db.ensure_current(app.config.state_url)
    except (InputError, RuntimeFailure) as exc:
        log.error("reload refused, the running configuration stays: %s", exc)
        return
    _release(app)
    _built[config_file] = fresh
    log.info("reloaded %s", config_file)


def _start_embedded_redis(app: App) -> None:
    """Without ``redis.url``, start the embedded Redis (``/healthz`` asks it), or say why not.

    The pages and webhooks do not need it, so a Redis that cannot start is logged, not fatal.
    """
    if app.config.redis.url:
        return
    from reminders import redis_conn

    try:
        url = redis_conn.embedded(app.config).ensure()
    except ServiceUnavailable as exc:
        log.error("the embedded Redis did not start, so /healthz answers 503: %s", exc)
        return
    log.info("embedded Redis at %s", url)


def _release(app: App) -> None:
    """Close the master's connections: no forked worker may share a parent's connection."""
    app.state.dispose()
    if "business" in app.__dict__:
        app.business.dispose()


def server(
    config_file: str,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool = False,
    body_timeout: float = BODY_TIMEOUT,
) -> MPServer:
    """granian serving the app of ``config_file``; ``access_log=False`` writes no line a request
    (errors are still logged); a body not received within ``body_timeout`` seconds gets 408."""
    return MPServer(
        target(config_file, threads, body_timeout),  # handed to load_app in each worker
        address=host,
        port=port,
        interface=Interfaces.ASGINL,  # the front (no lifespan events), the app on its threads
        workers=workers,
        blocking_threads=1,  # granian's own, for ASGI: the event loop's
        runtime_threads=1,
        http1_settings=HTTP1Settings(
            header_read_timeout=30_000, keep_alive=True, max_buffer_size=MAX_HEADER_BYTES
        ),
        http=HTTPModes.http1,  # behind a proxy; HTTP/2 would answer header limits with a reset
        websockets=False,
        log_level=LogLevels.info,
        log_dictconfig=log_config(),
        log_access=access_log,
        log_access_format=ACCESS_FORMAT,
        respawn_failed_workers=True,
        workers_kill_timeout=20,
    )


def prepare(app: App, built: dict[str, Flask], create: Callable[[App], Flask]) -> str:
    """What the master does before granian starts: logging, a clean environment, the app built
    (and kept in ``built`` for forked workers) and the state DB checked; returns the config
    file workers are given."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _drop_request_like_variables()
    config_file = os.fspath(app.config.file)
    built[config_file] = create(app)
    state_db.ensure_current(app.config.state_url)
    return config_file


def serve(
    app: App,
    host: str,
    port: int,
    workers: int = 2,
    threads: int = 4,
    access_log: bool = False,
    body_timeout: float = BODY_TIMEOUT,
) -> None:
    """Check what the endpoint needs, then serve it until stopped (SIGTERM, Ctrl-C); a request
    body not received within ``body_timeout`` seconds gets 408.

    SIGHUP reloads the config, rules and templates and respawns the workers gracefully.
    """
    config_file = prepare(app, _built, create_app)
    _start_embedded_redis(app)
    _release(app)
    granian = server(config_file, host, port, workers, threads, access_log, body_timeout)
    granian.on_reload(functools.partial(_reload, config_file))
    granian.serve(target_loader=load_app)
