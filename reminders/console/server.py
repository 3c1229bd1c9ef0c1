"""``reminders console``: the console app served by granian, like ``reminders web`` (whose
logging, environment hygiene and connection release it reuses), on its own internal port."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from flask import Flask
from granian.constants import HTTPModes, Interfaces
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server import MPServer

from reminders import store
from reminders.app import App
from reminders.web.server import (
    ACCESS_FORMAT,
    MAX_HEADER_BYTES,
    WithoutProcessEnvironment,
    _drop_request_like_variables,
    _release,
    log_config,
)

from . import create_console

if TYPE_CHECKING:
    from _typeshed.wsgi import WSGIApplication

# The app built by the master, reused by forked workers (keyed by config file).
_built: dict[str, Flask] = {}


def load_console(config_file: str) -> WSGIApplication:
    """The WSGI app of a worker: the master's when forked, else built from ``config_file``."""
    built = _built.get(config_file)
    if built is None:
        built = _built[config_file] = create_console(App(config_file))
    return WithoutProcessEnvironment(built)


def serve(
    app: App, host: str, port: int, workers: int = 1, threads: int = 4, access_log: bool = False
) -> None:
    """Check what the console needs, then serve it until stopped (SIGTERM, Ctrl-C)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    _drop_request_like_variables()
    config_file = os.fspath(app.config.file)
    _built[config_file] = create_console(app)
    store.ensure_current(app.config.state_url)
    _release(app)
    MPServer(
        config_file,
        address=host,
        port=port,
        interface=Interfaces.WSGI,
        workers=workers,
        blocking_threads=threads,
        runtime_threads=1,
        http1_settings=HTTP1Settings(
            header_read_timeout=30_000, keep_alive=True, max_buffer_size=MAX_HEADER_BYTES
        ),
        http=HTTPModes.http1,
        websockets=False,
        log_level=LogLevels.info,
        log_dictconfig=log_config(),
        log_access=access_log,
        log_access_format=ACCESS_FORMAT,
        respawn_failed_workers=True,
        workers_kill_timeout=20,
    ).serve(target_loader=load_console)
