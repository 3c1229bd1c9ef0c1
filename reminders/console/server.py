"""``reminders console``: the console app served by granian, like ``reminders web`` (whose
logging, environment hygiene and connection release it reuses), on its own internal port."""

from __future__ import annotations

from flask import Flask

from reminders.app import App
from reminders.web.front import WSGIFront
from reminders.web.server import _release, front, prepare, server

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
    config_file = prepare(app, _built, create_console)
    _release(app)
    server(config_file, host, port, workers, threads, access_log).serve(target_loader=load_console)
