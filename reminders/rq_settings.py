"""RQ settings for running the engine's workers with RQ's own command line, from the package:

    REMINDERS_CONFIG=/srv/reminders/config.yaml \
        rq worker -c reminders.rq_settings -w reminders.jobs.DeliveryWorker

``reminders worker`` does the same with less to type; this module is for setups that already run
``rq worker`` (supervisors, RQ's conventions). It ships in the package, so it needs no checkout
of the repository (``workers/rq_settings.py`` there only points here). The Redis URL and the queues
come from the engine's config, so the two can never disagree: ``redis.url``, or the embedded
server beside the config (started if needed). ``-w reminders.jobs.DeliveryWorker`` matters: RQ's
default worker forks a process per job, which works but runs each batch from a cold start (see
``reminders/jobs.py``); RQ reads the worker class only from ``-w`` or ``RQ_WORKER_CLASS``.
"""

from __future__ import annotations

import os

from reminders import redis_conn
from reminders.config import CONFIG_ENV, config_path, load_config
from reminders.dispatch import queue_names

# The jobs read the same config: they find it through REMINDERS_CONFIG (absolute, so a worker
# started elsewhere still finds it).
os.environ[CONFIG_ENV] = str(config_path().resolve())
_config = load_config(os.environ[CONFIG_ENV])

REDIS_URL = redis_conn.url_for(_config)
QUEUES = queue_names(_config)  # every channel's queue: a fallback to email runs here too
