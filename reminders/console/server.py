"""``reminders console``: the console app served by granian, like ``reminders web`` (whose
logging, environment hygiene and connection release it reuses), on its own internal port."""

from __future__ import annotations

import logging
import os

from flask import Flask

from reminders import state_db
from reminders.app import App
from reminders.web.front import WSGIFront
from reminders.web.server import _drop_request_like_variables, _release, front, server

from . import create_console

# The app built by the master, reused by forked workers (keyed by config file).
_built: dict[str, Flask] = {}


def load_console(target: str) -> WSGIFront:
    """The console of a worker: the master's when forked, else built from the config file; behind
    the web endpoint's front, which receives each request whole on its threads."""
    return front(target, _built, create_console)


def serve(
    app: App, host: str, port: int, workers: int = 1, threads: int = 4, access_log: bool = False
) -> None:
    """Check what the console needs, then serve it until stopped (SIGTERM, Ctrl-C): granian
    exactly as ``reminders web`` runs it, with the console's app."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _drop_request_like_variables()
    config_file = os.fspath(app.config.file)
    _built[config_file] = create_console(app)
    state_db.ensure_current(app.config.state_url)
    _release(app)
    server(config_file, host, port, workers, threads, access_log).serve(target_loader=load_console)
