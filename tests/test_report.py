"""``reminders status`` shows what keeps messages from going out: reminders deferred by quiet hours
or frequency caps (by reason), opt-outs by channel and source, and suppressed addresses; in the
text form and in ``--json`` (whose earlier keys stay as they were).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from reminders import consent
from tests.caps_fixtures import Notices, caps_redis, lite_notices, notices, rules_yaml
from tests.rules_fixtures import Project, config_yaml, lite

__all__ = ["caps_redis", "lite", "lite_notices", "notices"]

LATER = "2027-03-14T04:00:00Z"


def opt_outs(p: Notices) -> None:
    at = datetime(2027, 3, 13, 16, tzinfo=UTC)
    with p.state.begin() as conn:
        consent.opt_out(conn, "sms", "+12125550001", consent.STOP, "replied STOP", at, "1")
        consent.opt_out(conn, "sms", "+12125550002", consent.STOP, "replied STOP", at, "2")
        consent.opt_out(conn, "sms", "+12125550003", "21610", "Twilio 21610", at, "3")
        consent.opt_out(
            conn,
            "sms",
            "+12125550004",
            "30005",
            "Twilio 30005: unknown destination handset",
            at,
            "4",
        )
        consent.opt_out(conn, "email", "c5@example.com", consent.UNSUBSCRIBE, "one-click", at, "5")


def deferred_project(p: Notices) -> Notices:
    rules = rules_yaml(channels={"payment": "email", "refill": "sms"})
    p.configure(caps="caps: {per_day: 1}\n", rules=rules)
    p.notice(1, 7, "payment", "2027-03-13 10:00")
    p.notice(2, 7, "payment", "2027-03-13 10:00")  # over the cap: Sunday 09:00 EDT
    p.notice(3, 8, "refill", "2027-03-13 22:00")  # SMS quiet hours: Sunday 08:00 EDT
    p.scan("2027-03-13T12:00:00Z")
    p.send("2027-03-13T15:00:00Z")
    p.send("2027-03-14T03:00:00Z")
    opt_outs(p)
    return p


def test_status_json_counts_deferrals_opt_outs_and_suppressed_numbers(notices: Notices) -> None:
    p = deferred_project(notices)
    report = json.loads(p.ok("status", "--json", now=LATER).out)
    for key in ("now", "counts", "totals", "next_due", "due_now", "stuck_sending"):
        assert key in report
    assert report["totals"] == {"sent": 1, "pending": 2}
    assert report["deferred"] == {
        "total": 2,
        "by_reason": {"frequency cap": 1, "quiet hours": 1},
        "next": "2027-03-14T12:00:00Z",
    }
    assert report["opt_outs"] == {
        "email": {"unsubscribe": 1},
        "sms": {"21610": 1, "30005": 1, "stop": 2},
    }
    assert report["suppressed"] == {
        "total": 1,
        "by_source": {"30005": 1},
        "recent": [
            {
                "channel": "sms",
                "address": "+1******0004",
                "source": "30005",
                "reason": "Twilio 30005: unknown destination handset",
                "at": "2027-03-13T16:00:00Z",
            }
        ],
    }


def test_status_text_shows_the_same(lite_notices: Notices) -> None:
    p = deferred_project(lite_notices)
    out = p.ok("status", now=LATER).out
    assert (
        "deferred (pending past their planned time): 2 (frequency cap 1, quiet hours 1), "
        "the next at 2027-03-14T12:00:00Z"
    ) in out
    assert "opt-outs: email 1 (unsubscribe 1); sms 4 (21610 1, 30005 1, stop 2)" in out
    assert "suppressed (cannot receive): 1 (30005 1); latest:" in out
    assert (
        "  sms +1******0004 2027-03-13T16:00:00Z: Twilio 30005: unknown destination handset" in out
    )
    assert "+12125550004" not in out  # numbers are masked


def test_status_says_none_when_nothing_is_held_back(lite_notices: Notices) -> None:
    p = lite_notices.configure()
    p.notice(1, 7, "payment", "2027-03-13 10:00")
    p.scan("2027-03-13T12:00:00Z")
    report = json.loads(p.ok("status", "--json", now=LATER).out)
    assert report["deferred"] == {"total": 0, "by_reason": {}, "next": None}
    assert report["opt_outs"] == {}
    assert report["suppressed"] == {"total": 0, "by_source": {}, "recent": []}
    out = p.ok("status", now=LATER).out
    assert "deferred (pending past their planned time): none" in out
    assert "opt-outs: none" in out
    assert "suppressed" not in out


# --- jobs that failed in RQ -----------------------------------------------------------------------


def test_status_shows_the_jobs_that_failed_in_rq(lite: Project, redis_url: str) -> None:
    from redis import Redis
    from rq import Queue

    from reminders.dispatch import queue_name

    lite.write_config(config_yaml(redis=redis_url))
    lite.ok("db", "upgrade")
    queue = Queue(queue_name("sms"), connection=Redis.from_url(redis_url))
    # Jobs no worker here can run (queued by a version with another job function, say): each
    # fails, and nothing of them reaches the state DB.
    for _ in range(2):
        queue.enqueue("reminders.jobs.deliver_renamed", "sms", [1])
    lite.ok("worker", "--burst")
    report = json.loads(lite.ok("status", "--json").out)
    failed = report["failed_jobs"]
    assert failed["total"] == 2
    assert failed["by_queue"] == {queue_name("sms"): 2}
    assert len(failed["recent"]) == 2
    latest = failed["recent"][0]
    assert latest["queue"] == queue_name("sms")
    assert "deliver_renamed" in latest["error"], latest
    assert latest["at"].endswith("Z")
    text = lite.ok("status").out
    assert f"failed jobs (RQ): 2 ({queue_name('sms')} 2); latest:" in text
    assert f"{queue_name('sms')} {latest['id']}: {latest['error']}" in text


def test_status_without_redis_jobs_says_none_and_starts_no_server(lite: Project) -> None:
    lite.ok("db", "upgrade")
    report = json.loads(lite.ok("status", "--json").out)
    assert report["failed_jobs"] == {"total": 0, "by_queue": {}, "recent": []}
    from reminders import redis_conn
    from reminders.config import load_config

    assert not redis_conn.embedded(load_config(lite.root / "config.yaml")).running()
    assert "failed jobs (RQ): none" in lite.ok("status").out
