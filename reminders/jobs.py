"""The RQ side of delivery: the job function and the worker that runs it.

A job is ``deliver(channel, ids)``: a batch of reminders queued under the job's own id (see
:mod:`reminders.dispatch`). The worker is an in-process worker (RQ's ``SimpleWorker``), not RQ's
default fork-per-job ``Worker``, because:

- a fork per job costs ~18 ms and throws away what the previous job built: the loaded rules and
  compiled templates, the state DB's connection pool, the SMTP connection and Twilio's HTTP pool.
  Kept in the process, they are built once per worker, and a job costs its own work only;
- isolation buys nothing here: a job's effects are in the state DB, each guarded by a conditional
  update, so a worker that crashes mid-job leaves only ``sending`` rows for ops (and queued ones
  that dispatch enqueues again), whichever process it was.

A worker's liveness is RQ's own worker key (``rq:worker:<name>``), kept short: a
``DeliveryWorker`` renews it from a thread every ``LIVENESS_EVERY`` seconds with a TTL of
``LIVENESS_TTL`` (RQ's default is ``worker_ttl`` 420 s + 60), so a worker killed with SIGKILL is
gone from Redis within ``LIVENESS_TTL`` seconds, however long the batch it was sending; one that
is alive, however slow, never looks dead. Dispatch then enqueues its job's queued reminders again
and reconciles its ``sending`` ones (:mod:`reminders.reconcile`). A plain RQ ``Worker`` keeps
RQ's own heartbeats: its death is seen only after ~8 minutes.

Scale out by running more worker processes (``reminders worker`` on any number of machines).
Plain ``rq worker -c reminders.rq_settings -w reminders.jobs.DeliveryWorker`` runs the same jobs
(see ``workers/``); the job finds its config through ``REMINDERS_CONFIG``.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis
from rq import Queue, SimpleWorker, get_current_job
from rq.job import Job

from . import redis_conn
from .app import App
from .config import CONFIG_ENV, Config
from .delivery import Delivery
from .errors import ConfigError, Problem

log = logging.getLogger(__name__)

_app: App | None = None
_delivery: Delivery | None = None
_worker: DeliveryWorker | None = None


def use_app(app: App) -> None:
    """Make ``app`` the engine jobs in this process run against (``reminders worker`` does)."""
    global _app, _delivery
    if _delivery is not None and _app is not app:
        _delivery.close()
        _delivery = None
    _app = app


def current_app() -> App:
    """The engine of this process: the one given to :func:`use_app`, else ``$REMINDERS_CONFIG``."""
    global _app
    if _app is None:
        _app = App(os.environ.get(CONFIG_ENV))
    return _app


def get_delivery(connection: Any = None) -> Delivery:
    """The process' one :class:`Delivery` (channels and pools are opened once a process)."""
    global _delivery
    if _delivery is None:
        app = current_app()
        _delivery = Delivery(app, connection or redis_conn.connect(app.config))
    return _delivery


def deliver(channel: str, ids: Sequence[int]) -> dict[str, int]:
    """RQ job: deliver the reminders ``ids`` queued on ``channel`` under this job's id."""
    job = get_current_job()
    if job is None:
        raise RuntimeError("reminders.jobs.deliver runs inside an RQ job (it claims by job id)")
    deadline = None
    if job.timeout and job.timeout > 0:
        # Stop claiming well before RQ's hard timeout: a job killed mid-send strands `sending`.
        from .delivery import TIME_BUDGET

        deadline = time.monotonic() + job.timeout * TIME_BUDGET
    worker = job.worker_name or (_worker.name if _worker is not None else None)
    counts = get_delivery(job.connection).deliver(
        channel, list(ids), job.id, deadline=deadline, heartbeat=_heartbeat, worker=worker
    )
    return counts.as_dict()


def deliver_outbox(destination: str) -> dict[str, int]:
    """RQ job: apply the due outbox rows of ``destination`` (write-back statements, webhooks)."""
    from . import outbox

    job = get_current_job()
    return outbox.apply(current_app(), destination, job.connection if job else None).as_dict()


def noop() -> None:
    """RQ job that does nothing: the benchmark's baseline for RQ's own cost per job."""


def _heartbeat() -> None:
    """Tell RQ the worker running this job is alive (a long rate-limited batch)."""
    if _worker is not None:
        _worker.heartbeat()


def resolve_queues(config: Config, names: Sequence[str]) -> list[str]:
    """RQ queue names for ``--queue`` values (a channel or a queue name); none: every channel's."""
    from .dispatch import QUEUE_PREFIX, queue_name, queue_names

    if not names:
        return queue_names(config)
    known = queue_names(config)
    found = []
    for name in names:
        queue = name if name.startswith(QUEUE_PREFIX) else queue_name(name)
        if queue not in known:
            raise ConfigError(
                Problem(
                    f"--queue {name}: not a configured channel's queue "
                    f"(channels: {', '.join(config.channel_names) or 'none'})"
                )
            )
        found.append(queue)
    return found


def setup_logging(level: int = logging.INFO) -> None:
    """Log the engine's own lines (batch summaries, failures with masked addresses) to stderr, as
    text or JSON (:mod:`reminders.logs`)."""
    from . import logs

    logs.setup(level)


# How long the worker's pub/sub thread (RQ's command channel: stop, kill) blocks in one read. RQ
# asks 60 s; this bounds how long stopping the thread can ever take (see ``unsubscribe``).
PUBSUB_POLL = 1.0
PUBSUB_JOIN = 5.0  # seconds to wait for the pub/sub thread at teardown before going on without it
LIVENESS_TTL = 20  # seconds a worker's key outlives its last heartbeat
LIVENESS_EVERY = 5.0  # seconds between heartbeats of the liveness thread


class DeliveryWorker(SimpleWorker):
    """An RQ worker that runs jobs in its own process (see the module's note)."""

    stop_requested = False  # SIGTERM/SIGINT arrived: ``work()`` ended because it was asked to
    # RQ retries a dequeue that finds Redis gone, doubling its wait up to this (RQ: 60 s): a
    # worker notices a Redis that came back within this many seconds.
    max_connection_wait_time = 10.0

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat, its TTL capped at ``LIVENESS_TTL`` (see the module's note)."""
        super().heartbeat(min(timeout or LIVENESS_TTL, LIVENESS_TTL), pipeline=pipeline)

    def register_birth(self) -> None:
        super().register_birth()
        self.heartbeat()
        self._liveness_stop = threading.Event()
        self._liveness = threading.Thread(
            target=self._keep_alive, name="worker-liveness", daemon=True
        )
        self._liveness.start()

    def register_death(self) -> None:
        stop = getattr(self, "_liveness_stop", None)
        if stop is not None:
            stop.set()
            self._liveness.join(timeout=PUBSUB_JOIN)
        super().register_death()

    def _keep_alive(self) -> None:
        """Renew the worker's key every ``LIVENESS_EVERY`` seconds while the process lives."""
        while not self._liveness_stop.wait(LIVENESS_EVERY):
            try:
                self.heartbeat()
            except redis.RedisError as exc:
                self.log.warning("Worker %s: heartbeat failed: %s", self.name, exc)

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_requested = True
        super().request_stop(signum, frame)

    def subscribe(self) -> None:
        """Listen on RQ's command channel with a short poll instead of RQ's 60 s one."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]
            sleep_time=PUBSUB_POLL, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def unsubscribe(self) -> None:
        """Stop the pub/sub thread at once, whatever redis-py version runs it.

        RQ 2.12 sends UNSUBSCRIBE and only then stops the thread. When the thread reads the reply
        first, it is no longer subscribed and goes back to waiting up to ``sleep_time`` for a
        subscription; redis-py 8's ``PubSubWorkerThread.stop()`` joins it without a limit, so the
        worker took ~60 s to exit after ``--burst`` or SIGTERM (rq PR #2228). Here the thread is
        told to stop first, without waiting; the UNSUBSCRIBE reply then wakes its read and it
        exits; the join is bounded.
        """
        thread, pubsub = self.pubsub_thread, self.pubsub
        if thread is None or pubsub is None:
            return
        self.log.info("Worker %s: unsubscribing from %s", self.name, self.pubsub_channel_name)
        _stop_without_waiting(thread)
        try:
            pubsub.unsubscribe()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            # Redis is gone: the thread still ends within PUBSUB_POLL (or its handler's retry).
            self.log.debug("Worker %s: UNSUBSCRIBE failed: %s", self.name, exc)
        thread.join(timeout=PUBSUB_JOIN)
        pubsub.close()
        self.pubsub_thread = None

    def execute_job(self, job: Job, queue: Queue) -> None:
        global _worker
        _worker = self
        try:
            super().execute_job(job, queue)
        finally:
            _worker = None


def _stop_without_waiting(thread: Any) -> None:
    """Clear a ``PubSubWorkerThread``'s running flag without joining it.

    redis-py 8's ``stop(timeout)`` joins for at most ``timeout``; older versions' ``stop()`` only
    clears the flag.
    """
    if "timeout" in inspect.signature(thread.stop).parameters:
        thread.stop(timeout=0)
    else:
        thread.stop()


def run_worker(
    app: App,
    queues: Sequence[str],
    *,
    burst: bool = False,
    name: str | None = None,
    max_jobs: int | None = None,
    logging_level: str = "INFO",
) -> bool:
    """Serve ``queues`` until stopped (or, with ``burst``, until they are empty).

    Checks the secrets the configuration needs and opens the channels first, so a configuration
    mistake stops the worker at start instead of failing every job. Returns whether any job ran.
    """
    from .validate import secret_problems

    missing = secret_problems(app.config)
    if missing:
        raise ConfigError(missing)
    use_app(app)
    connection = redis_conn.connect(app.config)
    work = get_delivery(connection)
    work.open()
    app.ruleset  # noqa: B018 - load and validate the rules now, not in the first job
    worked = False
    wait = RECONNECT_FIRST
    try:
        while True:
            worker = DeliveryWorker(
                [Queue(q, connection=connection) for q in queues], connection=connection, name=name
            )
            started = time.monotonic()
            try:
                worked |= bool(
                    worker.work(burst=burst, max_jobs=max_jobs, logging_level=logging_level)
                )
            except redis.RedisError as exc:  # RQ's teardown itself needs Redis
                log.warning("worker %s: Redis failed while stopping: %s", worker.name, exc)
            if burst or max_jobs is not None or worker.stop_requested:
                return worked
            # A serving worker's loop ends unasked only on an error RQ does not retry (Redis
            # gone mid-command, a Redis timeout): wait for Redis and serve again, rather than
            # exit and leave the queues to whatever restarts processes.
            if time.monotonic() - started > RECONNECT_CAP:
                wait = RECONNECT_FIRST  # it served a while: start the backoff over
            log.warning("worker %s stopped unasked; serving again once Redis answers", worker.name)
            wait = _wait_for_redis(connection, wait)
    finally:
        work.close()


RECONNECT_FIRST = 1.0  # seconds before the first reconnection attempt
RECONNECT_CAP = DeliveryWorker.max_connection_wait_time  # the longest wait between attempts


def _wait_for_redis(connection: redis.Redis, wait: float) -> float:
    """Sleep ``wait`` seconds, then PING until Redis answers, doubling the wait up to
    ``RECONNECT_CAP`` (logged at each attempt); returns the next wait."""
    while True:
        time.sleep(wait)
        wait = min(wait * 2, RECONNECT_CAP)
        try:
            connection.ping()
        except redis.RedisError as exc:
            log.warning("Redis does not answer (%s); next attempt in %.0f s", exc, wait)
            continue
        log.info("Redis answers again")
        return wait
