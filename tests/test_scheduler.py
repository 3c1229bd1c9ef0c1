"""The scheduler: scan and dispatch on intervals, one leader among any number started."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import redis

from reminders.scheduler import LOCK_KEY
from tests.delivery_fixtures import SEND_AT, Shop, finish, wait_until

FAST = "scheduler:\n  scan_every: 1s\n  dispatch_every: 1s\n"


def test_once_scans_and_dispatches(shop: Shop) -> None:
    shop.patients(3)
    shop.ok("db", "upgrade")
    result = shop.ok("scheduler", "--once", now=SEND_AT)
    assert "scan refill-due: 3 rows, 3 created" in result.out
    assert "dispatch: 3 enqueued" in result.out
    assert shop.statuses() == {"queued": 3}
    conn = redis.Redis.from_url(shop.redis_url)
    assert conn.get(LOCK_KEY) is None  # released
    conn.close()


def test_once_does_nothing_while_another_scheduler_leads(shop: Shop) -> None:
    shop.patients(2)
    shop.ok("db", "upgrade")
    conn = redis.Redis.from_url(shop.redis_url)
    conn.set(LOCK_KEY, "other-host:1:abc", px=60_000)
    result = shop.ok("scheduler", "--once", now=SEND_AT)
    assert "another scheduler is active" in result.out
    assert shop.reminders() == []
    assert conn.get(LOCK_KEY) == b"other-host:1:abc"
    conn.close()


def _spawn_scheduler(shop: Shop, log: Path) -> subprocess.Popen[str]:
    handle = log.open("w")
    return subprocess.Popen(
        shop.command("scheduler", now=SEND_AT),
        cwd=shop.root,
        env={k: v for k, v in os.environ.items() if k not in ("REMINDERS_NOW", "REMINDERS_CONFIG")},
        stdout=handle,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def test_two_schedulers_elect_one_leader_and_the_other_takes_over(shop: Shop) -> None:
    shop.configure(extra=FAST)
    shop.patients(4)
    shop.ok("db", "upgrade")
    conn = redis.Redis.from_url(shop.redis_url)
    logs = [shop.root / "a.log", shop.root / "b.log"]
    processes = [_spawn_scheduler(shop, logs[0]), _spawn_scheduler(shop, logs[1])]
    try:
        wait_until(lambda: shop.statuses().get("queued") == 4)
        holder = conn.get(LOCK_KEY)
        assert holder is not None
        pids = [p.pid for p in processes]
        leader_pid = int(holder.decode().split(":")[1])
        assert leader_pid in pids
        leader = processes[pids.index(leader_pid)]
        standby = processes[1 - pids.index(leader_pid)]
        assert "leading" not in logs[1 - pids.index(leader_pid)].read_text()
        # The leader stops (SIGTERM: it releases the lock); the standby takes over.
        os.kill(leader.pid, signal.SIGTERM)
        code, _out, _err = finish(leader, timeout=30)
        assert code == 0
        wait_until(
            lambda: (conn.get(LOCK_KEY) or b"").decode().split(":")[1:2] == [str(standby.pid)]
        )
        wait_until(lambda: "leading" in logs[1 - pids.index(leader_pid)].read_text())
        # Every cycle of both, scans included, created each reminder once.
        assert len(shop.reminders()) == 4
    finally:
        for process in processes:
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
                finish(process, timeout=30)
        conn.close()


def test_a_dead_leaders_lock_expires(shop: Shop) -> None:
    from reminders.scheduler import LeaderLock

    conn = redis.Redis.from_url(shop.redis_url)
    first = LeaderLock(conn, ttl=0.2)
    second = LeaderLock(conn, ttl=0.2)
    assert first.acquire()
    assert not second.acquire()
    assert first.acquire()  # renewing its own lock
    wait_until(lambda: second.acquire(), timeout=10)
    assert second.holder() == second.token
    first.release()  # releases only its own lock
    assert second.holder() == second.token
    conn.close()
