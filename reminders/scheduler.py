"""The scheduler: scan and dispatch on intervals, one active at a time.

Any number of schedulers may run (one per machine, for fail-over); a Redis lock elects the one
that acts. The leader renews its lock from a background thread while it works, so a long scan
does not lose it; a standby checks the lock every few seconds and takes over when the leader
stops (it releases the lock on SIGTERM) or dies (its lock expires after ``LOCK_TTL`` seconds).
Two leaders at once, after a Redis failover or a paused process, are harmless: scans are
idempotent and safe concurrently, and a reminder is claimed once whoever enqueued it.

Intervals (``scheduler.scan_every``, ``scheduler.dispatch_every``) are real time; what is due
is decided by the engine clock (``REMINDERS_NOW`` in tests). Rules and templates are read at
start: restart the scheduler (and workers) after editing them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

import redis
import sqlalchemy as sa

from . import redis_conn
from .errors import RuntimeFailure

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger(__name__)

LOCK_KEY = "reminders:scheduler:leader"
LOCK_TTL = 30.0  # seconds a dead leader's lock outlives it
STANDBY_POLL = 2.0  # seconds between a standby's attempts to take the lock
# Retention's share of one cycle: at most this many delete transactions (of prune.BATCH rows),
# stopping between them once this many seconds have passed.
PRUNE_BATCHES = 5
PRUNE_SECONDS = 1.0

# Renew the lock only while this process holds it; release only its own.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeaderLock:
    """A Redis lock naming one leader; ``token`` says which process holds it."""

    def __init__(self, connection: redis.Redis, ttl: float = LOCK_TTL) -> None:
        self.connection = connection
        self.ttl_ms = int(ttl * 1000)
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._renew = connection.register_script(_RENEW)
        self._release = connection.register_script(_RELEASE)

    def acquire(self) -> bool:
        """Take the lock if it is free, or keep it if this process holds it."""
        if self._renew(keys=[LOCK_KEY], args=[self.token, self.ttl_ms]):
            return True
        return bool(self.connection.set(LOCK_KEY, self.token, nx=True, px=self.ttl_ms))

    def release(self) -> None:
        self._release(keys=[LOCK_KEY], args=[self.token])

    def holder(self) -> str | None:
        value = self.connection.get(LOCK_KEY)
        return value.decode() if isinstance(value, bytes) else value


class _Renewer(threading.Thread):
    """Keeps the lock alive while the leader works (every third of its TTL)."""

    def __init__(self, lock: LeaderLock) -> None:
        super().__init__(name="scheduler-lock", daemon=True)
        self.lock = lock
        self.held = True
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.lock.ttl_ms / 3000):
            try:
                self.held = self.lock.acquire()
            except redis.RedisError as exc:
                log.warning("scheduler: could not renew the leader lock: %s", exc)
                self.held = False

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


@dataclass
class Cycle:
    """What one pass did: scan counts per rule (or None when no scan was due) and dispatch."""

    scans: list[dict[str, Any]] | None = None
    dispatch: dict[str, int] | None = None
    outbox_jobs: int = 0  # destinations of write-back and webhooks given a job
    pruned: dict[str, Any] | None = None  # what retention deleted (None when not due)
    errors: list[str] = field(default_factory=list)


class Scheduler:
    """Scans and dispatches for ``app`` while it leads."""

    def __init__(self, app: App, lock_ttl: float = LOCK_TTL) -> None:
        self.app = app
        self.connection = redis_conn.connect(app.config)
        self.lock = LeaderLock(self.connection, lock_ttl)
        self._stopping = threading.Event()
        self._next_scan = 0.0
        self._next_dispatch = 0.0
        self._next_prune = 0.0

    def stop(self, *_args: Any) -> None:
        """Finish the current step, release the lock and return from :meth:`run`."""
        self._stopping.set()

    def cycle(self) -> Cycle:
        """Scan (when due) and dispatch (when due), catching failures of the world."""
        from .dispatch import dispatcher
        from .scan import scan_all

        config = self.app.config
        done = Cycle()
        moment = time.monotonic()
        if moment >= self._next_scan:
            self._next_scan = moment + config.scheduler.scan_every.total_seconds()
            try:
                done.scans = [c.as_dict() for c in scan_all(self.app)]
                for counts in done.scans:
                    if counts["error"]:
                        done.errors.append(counts["error"])
            except RuntimeFailure as exc:
                done.errors.append(str(exc))
        if moment >= self._next_dispatch:
            self._next_dispatch = moment + config.scheduler.dispatch_every.total_seconds()
            try:
                done.dispatch = dispatcher(self.app).run(self.app.now()).as_dict()
            except RuntimeFailure as exc:
                done.errors.append(str(exc))
            done.outbox_jobs = self._outbox(done)
        if config.state.retention is not None and moment >= self._next_prune:
            more = self._prune(done)
            # A backlog goes a few batches a cycle; once done, look again at the next scan.
            self._next_prune = moment if more else self._next_scan
        for error in done.errors:
            log.error("scheduler: %s", error)
        if done.scans:
            log.info("scheduler: scanned %s", "; ".join(_scan_line(c) for c in done.scans))
        if done.dispatch and (done.dispatch["enqueued"] or done.dispatch["requeued"]):
            log.info("scheduler: dispatched %s", done.dispatch)
        return done

    def _outbox(self, done: Cycle) -> int:
        """Enqueue the outbox's due destinations; a failure is the cycle's, not the loop's."""
        from . import outbox

        try:
            return outbox.enqueue_due(self.app, self.connection, self.app.now())
        except (RuntimeFailure, redis.RedisError, sa.exc.SQLAlchemyError) as exc:
            done.errors.append(f"outbox: {exc}")
            return 0

    def _prune(self, done: Cycle) -> bool:
        """Delete a bounded part of what is past ``state.retention`` (at most ``PRUNE_BATCHES``
        transactions and about ``PRUNE_SECONDS``, so a backlog never holds up scans and
        dispatches); whether some is left."""
        from . import prune
        from .errors import RemindersError

        retention = self.app.config.state.retention
        assert retention is not None
        try:
            pruned = prune.prune(
                self.app.state,
                self.app.now(),
                retention,
                prune.graces(self.app),
                batch_size=prune.BATCH,
                max_batches=PRUNE_BATCHES,
                max_seconds=PRUNE_SECONDS,
            )
        except RemindersError as exc:  # the state DB failed: prune says so, and what it did
            done.errors.append(str(exc))
            return False
        done.pruned = pruned.as_dict()
        if pruned.total:
            log.info(
                "scheduler: pruned %s",
                ", ".join(f"{getattr(pruned, t)} {t}" for t in prune.TABLES if getattr(pruned, t)),
            )
        return pruned.more

    def run(self, once: bool = False) -> list[Cycle]:
        """Lead (or stand by) until stopped; with ``once``, one cycle if this process can lead.

        Returns the cycles run (only with ``once``: a long-running scheduler keeps none).
        """
        cycles: list[Cycle] = []
        if once:
            if not self.lock.acquire():
                log.info(
                    "scheduler: another scheduler leads (%s); nothing done", self.lock.holder()
                )
                return cycles
            try:
                cycles.append(self.cycle())
            finally:
                self.lock.release()
            return cycles
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return cycles

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("scheduler: %s received, stopping", signal.Signals(signum).name)
        self.stop()

    def _loop(self) -> None:
        leading = False
        while not self._stopping.is_set():
            try:
                leading = self.lock.acquire()
            except redis.RedisError as exc:
                log.warning("scheduler: Redis did not answer: %s", exc)
                leading = False
            if not leading:
                log.debug("scheduler: standing by (leader: %s)", _safe_holder(self.lock))
                self._stopping.wait(STANDBY_POLL)
                continue
            log.info("scheduler: leading (%s)", self.lock.token)
            self._next_scan = self._next_dispatch = 0.0
            renewer = _Renewer(self.lock)
            renewer.start()
            try:
                while not self._stopping.is_set() and renewer.held:
                    self.cycle()
                    wait = min(self._next_scan, self._next_dispatch) - time.monotonic()
                    self._stopping.wait(max(0.0, wait))
            finally:
                renewer.stop()
                if not renewer.held:
                    log.warning("scheduler: lost the leader lock; standing by")
            with contextlib.suppress(redis.RedisError):  # else it expires on its own
                self.lock.release()


def _safe_holder(lock: LeaderLock) -> str | None:
    try:
        return lock.holder()
    except redis.RedisError:
        return None


def _scan_line(counts: dict[str, Any]) -> str:
    return (
        f"{counts['rule']}: {counts['rows']} rows, {counts['created']} created, "
        f"{counts['moved']} moved, {counts['canceled']} canceled"
    )
