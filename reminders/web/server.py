"""``reminders web``: the Flask app served by gunicorn, embedded (no separate config file).

gthread workers: each worker process runs ``threads`` requests at once, which suits handlers that
wait on the state DB. The app is built once in the master before forking (a bad config or a
missing secret stops the command with a clear error), and the state DB's pool is emptied before
the fork so no worker shares a parent's connection. The access log masks the tokens of customer
links: they are credentials and name an address.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask
from gunicorn.app.base import BaseApplication
from gunicorn.glogging import Logger

from reminders import store
from reminders.app import App

from . import create_app

_TOKEN = re.compile(r"(/(?:unsubscribe|preferences)/)[^/?#\s\"]+")


class MaskingLogger(Logger):
    """gunicorn's logger, with customer-link tokens replaced by ``…`` in the access log."""

    def atoms(self, resp: Any, req: Any, environ: Any, request_time: Any) -> dict[str, Any]:
        atoms: dict[str, Any] = super().atoms(resp, req, environ, request_time)
        return {k: _TOKEN.sub(r"\1…", v) if isinstance(v, str) else v for k, v in atoms.items()}


class Server(BaseApplication):
    """gunicorn, configured from a dict, serving one already-built WSGI app."""

    def __init__(self, application: Flask, options: dict[str, Any]) -> None:
        self.application = application
        self.options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self.options.items():
            if key in self.cfg.settings:  # settings newer than the installed gunicorn are skipped
                self.cfg.set(key, value)

    def load(self) -> Flask:
        return self.application


def options(
    host: str, port: int, workers: int, threads: int, access_log: bool = True
) -> dict[str, Any]:
    """gunicorn settings for ``reminders web``; ``access_log=False`` writes no access log line
    (about a fifth of the CPU a check request costs), errors are still logged."""
    return {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": "gthread",
        "threads": threads,
        "timeout": 30,
        "graceful_timeout": 20,
        "keepalive": 5,
        # Request-line and header limits (the body's limit is the app's, 64 KiB).
        "limit_request_line": 4094,
        "limit_request_fields": 60,
        "limit_request_field_size": 8190,
        "accesslog": "-" if access_log else None,
        "errorlog": "-",
        "logger_class": MaskingLogger,
        "proc_name": "reminders-web",
        # gunicorn 25+ opens a control socket in the home folder by default: not wanted here.
        "control_socket_disable": True,
    }


def serve(
    app: App,
    host: str,
    port: int,
    workers: int = 2,
    threads: int = 8,
    access_log: bool = True,
) -> None:
    """Check what the endpoint needs, then serve it until stopped (SIGTERM, Ctrl-C)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    flask = create_app(app)
    store.ensure_current(app.config.state_url)
    app.state.dispose()  # the master keeps no connection a forked worker could share
    Server(flask, options(host, port, workers, threads, access_log)).run()
