"""``reminders web``: the Flask app served by granian, embedded (no separate config file).

granian parses HTTP in Rust (hyper) and hands each request to the WSGI app on one of ``threads``
Python threads a worker process. A Python HTTP server (gunicorn's gthread workers) spent about
1 ms of CPU a request before the app ran, twice the whole cost of a checkout's check; see the
README's performance section for the figures.

The app is built and checked once in the master before the workers start (a bad config or a
missing secret stops the command with a clear error); forked workers reuse it, and the state DB's
pool is emptied first so no worker shares a parent's connection. Where workers are spawned rather
than forked they build it again from the config file. The access log masks the tokens of customer
links: they are credentials and name an address.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from flask import Flask
from granian.constants import Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import MPServer

from reminders import store
from reminders.app import App

from . import create_app

_TOKEN = re.compile(r"(/(?:unsubscribe|preferences)/)[^/?#\s\"]+")
ACCESS_FORMAT = '%(addr)s - "%(method)s %(path)s %(protocol)s" %(status)d %(dt_ms).1fms'
# Request headers, request line included, are refused past this (hyper answers 431).
MAX_HEADER_BYTES = 64 * 1024

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


def log_config(access_log: bool) -> dict[str, Any]:
    """granian's logging: errors to stdout with a timestamp; access lines masked."""
    stamp = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {"mask": {"()": MaskTokens}},
        "formatters": {
            "generic": {"format": stamp},
            "access": {"format": "%(asctime)s [%(process)d] %(message)s"},
        },
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
                "level": "INFO" if access_log else "CRITICAL",
                "propagate": False,
            },
        },
        "root": {"handlers": ["console"], "level": "INFO"},
    }


def load_app(config_file: str) -> Flask:
    """The WSGI app of a worker: the master's when forked, else built from ``config_file``."""
    built = _built.get(config_file)
    if built is None:
        built = _built[config_file] = create_app(App(config_file))
    return built


def server(
    config_file: str,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool = False,
) -> MPServer:
    """granian serving the app of ``config_file``; ``access_log=False`` writes no line a request
    (errors are still logged)."""
    return MPServer(
        config_file,  # the target, handed to load_app in each worker
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        runtime_threads=1,
        http1_settings=HTTP1Settings(
            header_read_timeout=30_000, keep_alive=True, max_buffer_size=MAX_HEADER_BYTES
        ),
        websockets=False,
        log_level=LogLevels.info,
        log_dictconfig=log_config(access_log),
        log_access=access_log,
        log_access_format=ACCESS_FORMAT,
        respawn_failed_workers=True,
        workers_kill_timeout=20,
    )


def serve(
    app: App,
    host: str,
    port: int,
    workers: int = 2,
    threads: int = 2,
    access_log: bool = False,
) -> None:
    """Check what the endpoint needs, then serve it until stopped (SIGTERM, Ctrl-C)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config_file = os.fspath(app.config.file)
    _built[config_file] = create_app(app)
    store.ensure_current(app.config.state_url)
    # The master keeps no connection a forked worker could share.
    app.state.dispose()
    if "business" in app.__dict__:
        app.business.dispose()
    server(config_file, host, port, workers, threads, access_log).serve(target_loader=load_app)
