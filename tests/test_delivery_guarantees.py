"""The delivery guarantees, with separate worker processes: exactly once, nothing lost.

- two workers, every job enqueued twice and a stale copy of a batch: each customer gets one text;
- a worker SIGKILLed in the middle of a batch, then restarted: its batch stays in ``sending``
  (``status`` says its worker died) until its worker's key expires, then dispatch reconciles it
  with Twilio's records: every reminder ends sent, none twice, none vanishes;
- Redis emptied after dispatch: the next dispatch after ``requeue_after`` enqueues again;
- a job abandoned by a dead worker is enqueued again; a job still waiting is not.
"""

from __future__ import annotations

import json
import os
import signal

import redis
from rq import Queue
from rq.job import Job

from reminders import lifecycle
from reminders import report as report_
from tests import services
from tests.delivery_fixtures import SEND_AT, Shop, finish, wait_until

QUEUE_KEY = "rq:queue:reminders-sms"


def test_two_workers_and_duplicated_jobs_send_each_reminder_exactly_once(any_shop: Shop) -> None:
    shop = any_shop
    people = shop.prepare(60)
    shop.ok("dispatch", now=SEND_AT)
    conn = redis.Redis.from_url(shop.redis_url)
    jobs = conn.lrange(QUEUE_KEY, 0, -1)
    assert len(jobs) == 12
    # RQ is at-least-once: every job is pushed a second time, as a redelivery would ...
    for job_id in jobs:
        conn.rpush(QUEUE_KEY, job_id)
    # ... and a stale copy of the first batches runs under another job id.
    ids = sorted(r["id"] for r in shop.reminders())
    Queue("reminders-sms", connection=conn).enqueue(
        "reminders.jobs.deliver", "sms", ids[:20], job_id="stale-copy"
    )
    workers = [shop.spawn_worker(), shop.spawn_worker()]
    for process in workers:
        code, _out, err = finish(process)
        assert code == 0, err
    assert shop.statuses() == {"sent": 60}
    assert sorted(shop.stub.accepted) == sorted(p["phone"] for p in people)
    assert set(shop.stub.accepted.values()) == {1}
    assert sum(shop.stub.received.values()) == 60
    messages = shop.messages()
    assert len(messages) == 60 and len({m["reminder_id"] for m in messages}) == 60
    stale = Job.fetch("stale-copy", connection=conn)
    assert stale.return_value() == {
        "sent": 0,
        "unknown": 0,
        "retried": 0,
        "failed": 0,
        "canceled": 0,
        "deferred": 0,
        "moved": 0,
        "released": 0,
        "not_claimed": 20,
        "digests": 0,
    }
    conn.close()


def test_a_worker_killed_mid_batch_is_reconciled_without_sending_twice(shop: Shop) -> None:
    shop.configure(batch_size=10, sms_extra="    reconcile_after: 1s\n")
    people = shop.prepare(40)
    # The second batch stays in flight long enough to be killed in it, even on a busy machine.
    shop.stub.latency_ms = 1500
    shop.ok("dispatch", now=SEND_AT)
    first = shop.spawn_worker()
    # More than one batch has reached the provider: batch 1 is recorded, batch 2 is in flight.
    wait_until(lambda: sum(shop.stub.received.values()) > 10)
    os.killpg(first.pid, signal.SIGKILL)
    first.communicate()
    killed = shop.statuses()
    assert killed.get("sending") == 10, killed
    stuck = sorted(rid for rid, row in shop.status_of().items() if row["status"] == "sending")
    # The killed batch's requests had reached the stub: it records them after its latency.
    wait_until(lambda: shop.stub.in_flight == 0)
    shop.stub.latency_ms = 0
    code, _out, err = finish(shop.spawn_worker())
    assert code == 0, err
    assert shop.statuses() == {"sent": 30, "sending": 10}  # none lost, none sent twice yet
    report = json.loads(shop.ok("status", "--json", now=SEND_AT).out)
    assert {x["channel"] for x in report["stuck_sending"]} == {"sms"}  # claimed on that channel

    # Until the dead worker's key expires (jobs.LIVENESS_TTL), status says what happened ...
    def causes() -> set[str]:
        report = json.loads(shop.ok("status", "--json", now=SEND_AT).out)
        assert sorted(x["id"] for x in report["stuck_sending"]) == stuck
        return {x["cause"] for x in report["stuck_sending"]}

    wait_until(lambda: causes() == {report_.WORKER_GONE}, timeout=90, interval=0.5)

    # ... and dispatch decides them from Twilio's records: those it has are sent with its SIDs;
    # those it never got whole (the kill cut the request short) are sent once more.
    def settled() -> bool:
        shop.ok("dispatch", now=SEND_AT)
        shop.worker()
        return shop.statuses() == {"sent": 40}

    wait_until(settled, timeout=90, interval=0.5)
    assert sorted(shop.stub.accepted) == sorted(p["phone"] for p in people)
    assert set(shop.stub.accepted.values()) == {1}  # none sent twice
    sids = {m["sid"] for m in shop.stub.created}
    assert {r["provider_id"] for r in shop.reminders()} == sids
    reasons = {e["reason"] for e in shop.events() if e["reminder_id"] in stuck}
    assert any("is gone (no heartbeat)" in (why or "") for why in reasons)


def test_redis_emptied_after_dispatch_is_enqueued_again_after_requeue_after(shop: Shop) -> None:
    people = shop.prepare(30)
    shop.ok("dispatch", now=SEND_AT)
    conn = redis.Redis.from_url(shop.redis_url)
    conn.flushdb()  # Redis restarted empty: every job is gone
    soon = shop.ok("dispatch", "--json", now="2027-03-10T15:04:59Z").json_lines()[0]
    assert soon == {"enqueued": 0, "requeued": 0, "jobs": 0, "reconciled": 0}
    later = "2027-03-10T15:05:00Z"  # requeue_after (5m) on the engine clock
    again = shop.ok("dispatch", "--json", now=later).json_lines()[0]
    assert again["requeued"] == 30
    shop.worker(now=later)
    assert shop.statuses() == {"sent": 30}
    assert set(shop.stub.accepted.values()) == {1}
    assert sorted(shop.stub.accepted) == sorted(p["phone"] for p in people)
    reasons = [e["reason"] for e in shop.events() if e["from_status"] == e["to_status"] == "queued"]
    assert len(reasons) == 30 and "is gone from Redis" in reasons[0]
    conn.close()


def test_a_job_still_waiting_in_its_queue_is_not_enqueued_again(shop: Shop) -> None:
    shop.prepare(5)
    shop.ok("dispatch", now=SEND_AT)
    again = shop.ok("dispatch", "--json", now="2027-03-10T16:00:00Z").json_lines()[0]
    assert again["requeued"] == 0
    shop.worker(now="2027-03-10T16:00:00Z")
    assert shop.statuses() == {"sent": 5}
    assert sum(shop.stub.received.values()) == 5


def _dequeued_as_started(conn: redis.Redis, worker: str) -> str:
    """The one job in the queue, taken off it and marked started by ``worker``; its id."""
    (job_id,) = [j.decode() for j in conn.lrange(QUEUE_KEY, 0, -1)]
    conn.lrem(QUEUE_KEY, 0, job_id)
    conn.hset(Job.key_for(job_id), mapping={"status": "started", "worker_name": worker})
    return job_id


def test_a_job_abandoned_by_a_dead_worker_is_enqueued_again(shop: Shop) -> None:
    shop.prepare(4)
    shop.ok("dispatch", now=SEND_AT)
    conn = redis.Redis.from_url(shop.redis_url)
    # As RQ leaves it when its worker is SIGKILLed after dequeueing, before the job claimed:
    # started, by a worker whose registration has expired.
    job_id = _dequeued_as_started(conn, "dead-worker")
    # At once: its worker's key is gone, no need to wait requeue_after.
    later = SEND_AT
    again = shop.ok("dispatch", "--json", now=later).json_lines()[0]
    assert again["requeued"] == 4
    reasons = {e["reason"] for e in shop.events() if e["from_status"] == e["to_status"]}
    assert reasons == {f"enqueued again: job {job_id} was abandoned (its worker is gone)"}
    shop.worker(now=later)
    assert shop.statuses() == {"sent": 4}
    # The abandoned job, run late after all, claims nothing: its id is no longer theirs.
    assert {r["job_id"] for r in shop.reminders()} != {job_id}
    conn.close()


def test_a_job_running_on_a_live_worker_is_left_alone(shop: Shop) -> None:
    shop.prepare(2)
    shop.ok("dispatch", now=SEND_AT)
    conn = redis.Redis.from_url(shop.redis_url)
    _dequeued_as_started(conn, "busy")
    conn.hset("rq:worker:busy", mapping={"state": "busy"})
    again = shop.ok("dispatch", "--json", now="2027-03-10T15:30:00Z").json_lines()[0]
    assert again["requeued"] == 0
    assert shop.statuses() == {"queued": 2}
    conn.close()


def test_redis_down_at_dispatch_keeps_reminders_pending(shop: Shop) -> None:
    shop.prepare(3)
    dead = f"redis://127.0.0.1:{services.free_port()}/0"
    text = shop.read("config.yaml").replace(shop.redis_url, dead)
    shop.write("config.yaml", text)
    result = shop.run("dispatch", now=SEND_AT)
    assert result.code == 1
    assert "Redis" in result.err and "did not answer" in result.err
    assert shop.statuses() == {"pending": 3}
    assert not [e for e in shop.events() if e["to_status"] == lifecycle.QUEUED]
