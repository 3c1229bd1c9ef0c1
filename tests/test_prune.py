"""Retention: pruning keeps everything not final and everything younger than the limit, never
lets a scan remind a customer again, and resumes where an interrupted prune stopped; on SQLite and
PostgreSQL, through the command line and the scheduler.

The clock: reminders finished around NOW (March 2027) and LATER is 200 days after, so with the
default retention (180d) what was last changed before 2027-03-30 12:00 is old enough to go.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import counts, lifecycle, models, prune
from reminders.app import App
from tests.rules_fixtures import NOW, REFILLS, Project, config_yaml, project_at

LATER = "2027-09-26T12:00:00Z"
RETENTION = timedelta(days=180)


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(UTC)


OLD = utc("2027-03-14T14:00:00Z")  # before the cutoff (2027-03-30T12:00Z)
YOUNG = utc("2027-06-01T12:00:00Z")  # after it


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The refills project, migrated, with no reminders yet."""
    with project_at(tmp_path, request.param) as made:
        made.setup()
        made.ok("db", "upgrade")
        yield made


def add(
    p: Project,
    occurrence: str,
    status: str,
    updated: datetime,
    planned: datetime = OLD,
    rule: str = "refill-due",
) -> int:
    """A reminder with one message and two events (what a sent reminder has)."""
    with p.state.begin() as conn:
        (rid,) = conn.execute(
            models.reminder.insert()
            .values(
                rule=rule,
                occurrence=occurrence,
                offset="-3d",
                customer_id="1",
                planned_at=planned,
                send_at=planned,
                status=status,
                data="{}",
                row_hash="0" * 32,
                created_at=min(updated, planned),
                updated_at=updated,
            )
            .returning(models.reminder.c.id)
        ).one()
        conn.execute(
            models.message.insert().values(
                reminder_id=rid,
                channel="sms",
                rule=rule,
                to_address="+15005550006",
                status="delivered",
                created_at=updated,
                updated_at=updated,
            )
        )
        conn.execute(
            models.event.insert(),
            [
                {
                    "reminder_id": rid,
                    "at": updated,
                    "from_status": "pending",
                    "to_status": "queued",
                },
                {"reminder_id": rid, "at": updated, "from_status": "queued", "to_status": status},
            ],
        )
    return int(rid)


def occurrences(p: Project) -> set[str]:
    return {r["occurrence"] for r in p.reminders()}


def owners(p: Project, table: sa.Table) -> list[int]:
    """The reminder ids a child table's rows name, sorted."""
    return sorted(r["reminder_id"] for r in p.rows(table))


def prune_json(p: Project, *args: str, now: str = LATER) -> dict[str, Any]:
    (only,) = p.ok("prune", "--json", *args, now=now).json_lines()
    return only


# --- what goes and what stays --------------------------------------------------------------------

# occurrence: (status, last change, planned time, pruned at LATER?)
CASES: dict[str, tuple[str, datetime, datetime, bool]] = {
    **{f"{s}-old": (s, OLD, OLD, True) for s in sorted(lifecycle.FINAL)},
    # not final: kept however old
    **{f"{s}-old": (s, OLD, OLD, False) for s in ("pending", "queued", "sending", "unknown")},
    # delivered lately for an occurrence long past: age is the last change
    "delivered-young": ("delivered", YOUNG, utc("2026-09-01T14:00:00Z"), False),
    # canceled long ago (a DONE), planned after LATER: the scan could plan it again
    "canceled-ahead": ("canceled", OLD, utc("2028-01-10T15:00:00Z"), False),
    # planned within the rule's grace (1d) of LATER: a scan at LATER would still create it
    "canceled-in-grace": ("canceled", OLD, utc(LATER) - timedelta(hours=12), False),
}


def test_pruning_keeps_everything_not_final_and_everything_younger(shop: Project) -> None:
    ids = {occ: add(shop, occ, *case[:3]) for occ, case in CASES.items()}
    gone = add(shop, "of-a-rule-removed", "failed", OLD, rule="old-rule")
    expected = {occ for occ, case in CASES.items() if not case[3]}
    pruned = [ids[o] for o, case in CASES.items() if case[3]] + [gone]
    with shop.state.begin() as conn:
        counts.rebuild(conn)  # the rows above were written directly

    done = prune_json(shop)

    assert occurrences(shop) == expected
    kept = sorted(ids[o] for o in expected)
    assert owners(shop, models.message) == kept
    assert owners(shop, models.event) == sorted(kept * 2)
    assert (done["reminders"], done["messages"], done["events"]) == (
        len(pruned),
        len(pruned),
        2 * len(pruned),
    )
    assert done["cutoff"] == "2027-03-30T12:00:00Z" and done["finished"] is True
    with shop.state.connect() as conn:  # the counts by rule and status lost what was deleted
        for family in (counts.REMINDERS, counts.MESSAGES):
            assert family.totals(conn) == family.count_rows(conn)
        assert sum(counts.reminders(conn).values()) == len(expected)
    # Again: nothing left to do.
    again = prune_json(shop)
    assert [again[t] for t in prune.TABLES] == [0] * len(prune.TABLES)


def test_consent_stays_and_old_replies_and_scan_runs_go(shop: Project) -> None:
    old, young = OLD, YOUNG
    with shop.state.begin() as conn:
        conn.execute(
            models.inbound.insert(),
            [
                {"from_address": "+15005550006", "body": b, "action": a, "created_at": at}
                for b, a, at in (
                    ("STOP", "stop", old),
                    ("START", "start", old),
                    ("DONE", "done", old),
                    ("what?", "unknown", old),
                    ("HELP", "help", young),
                )
            ],
        )
        conn.execute(
            models.optout.insert().values(
                channel="sms", address="+15005550006", source="stop", created_at=old
            )
        )
        conn.execute(
            models.consent_event.insert().values(
                channel="sms", address="+15005550006", action="opt_out", source="stop", at=old
            )
        )
        conn.execute(
            models.preference.insert().values(
                customer_id="1", rule="*", channel="sms", enabled=False, updated_at=old
            )
        )
        runs = [
            ("refill-due", old),
            ("refill-due", old + timedelta(minutes=5)),
            ("refill-due", young),
            ("other", old),  # that rule's latest run: kept however old
        ]
        run_ids = [
            conn.execute(
                models.scan_run.insert()
                .values(rule=rule, started_at=at, status="done")
                .returning(models.scan_run.c.id)
            ).scalar_one()
            for rule, at in runs
        ]
        conn.execute(
            models.skipped_row.insert(),
            [
                {"scan_run_id": rid, "rule": "refill-due", "row_number": 1, "reason": "no due"}
                for rid in run_ids
            ],
        )

    dry = prune_json(shop, "--dry-run")
    done = prune_json(shop)

    assert sorted(r["action"] for r in shop.rows(models.inbound)) == ["help", "start", "stop"]
    assert len(shop.rows(models.optout)) == 1
    assert len(shop.rows(models.consent_event)) == 1
    assert len(shop.rows(models.preference)) == 1
    assert [r["id"] for r in shop.scan_runs()] == run_ids[2:]
    assert sorted(r["scan_run_id"] for r in shop.skipped()) == run_ids[2:]
    assert (done["inbound"], done["scan_runs"], done["skipped_rows"]) == (2, 2, 2)
    assert {t: dry[t] for t in prune.TABLES} == {t: done[t] for t in prune.TABLES}
    assert dry["dry_run"] is True and done["dry_run"] is False


def test_a_dry_run_counts_per_table_and_deletes_nothing(shop: Project) -> None:
    for occ, case in CASES.items():
        add(shop, occ, *case[:3])
    before = shop.snapshot()
    result = shop.ok("prune", "--dry-run", now=LATER)
    assert shop.snapshot() == before
    final = len(lifecycle.FINAL)
    assert result.out.splitlines() == [
        "would delete, older than 180d (last changed before 2027-03-30T12:00:00Z):",
        f"  reminders     {final}",
        f"  events        {2 * final}",
        f"  messages      {final}",
        "  inbound       0",
        "  scan runs     0",
        "  skipped rows  0",
    ]


def test_older_than_chooses_the_limit(shop: Project) -> None:
    add(shop, "a", "sent", OLD)
    add(shop, "b", "sent", YOUNG)
    assert prune_json(shop)["reminders"] == 1
    # 100 days before LATER is 2027-06-18: b (changed 2027-06-01) is older than that.
    done = prune_json(shop, "--older-than", "100d")
    assert (done["reminders"], done["older_than"]) == (1, "100d")
    assert occurrences(shop) == set()


# --- a pruned reminder does not come back --------------------------------------------------------


@pytest.mark.parametrize("grace", ["1d", "300d"])
def test_the_next_scan_does_not_remind_again_after_pruning(shop: Project, grace: str) -> None:
    if grace != "1d":
        shop.write(
            "rules/refills.yaml",
            REFILLS.replace('    at: "10:00"\n', f'    at: "10:00"\n    grace: {grace}\n'),
        )
    (scan,) = shop.ok("scan", "--json", now=NOW).json_lines()
    assert scan["created"] == 6
    # rx 1: its -3d reminder delivered, its 0d one canceled by the customer's DONE.
    r = models.reminder
    with shop.state.begin() as conn:
        for offset, status in (("-3d", "delivered"), ("0d", "canceled")):
            conn.execute(
                r.update()
                .where(r.c.occurrence == "1", r.c.offset == offset)
                .values(status=status, updated_at=OLD)
            )
    finished = {k for k, v in shop.by_key().items() if v["status"] in lifecycle.FINAL}
    assert finished == {("1", "-3d"), ("1", "0d")}

    done = prune_json(shop)
    (rescan,) = shop.ok("scan", "--json", now=LATER).json_lines()

    assert rescan["created"] == 0 and rescan["error"] is None
    assert rescan["rows"] == 3
    if grace == "1d":
        # Past grace: gone, and the scan finds the row too late to plan.
        assert done["reminders"] == 2
        assert set(shop.by_key()) == {("2", "-3d"), ("2", "0d"), ("3", "-3d"), ("3", "0d")}
    else:
        # A scan at LATER could still plan them (within 300 days): they stay and keep it from
        # planning them again.
        assert done["reminders"] == 0
        assert finished <= set(shop.by_key())
        assert {shop.by_key()[k]["status"] for k in finished} == {"delivered", "canceled"}


# --- interrupted, resumed ------------------------------------------------------------------------


def _ten(p: Project) -> list[int]:
    """Ten old delivered reminders, x0..x9, in the order a prune takes them (by last change)."""
    return [add(p, f"x{i}", "delivered", OLD + timedelta(minutes=i)) for i in range(10)]


def _orphans(p: Project) -> list[int]:
    alive = {r["id"] for r in p.reminders()}
    return [i for i in owners(p, models.message) + owners(p, models.event) if i not in alive]


def test_a_prune_stopped_between_batches_resumes(shop: Project) -> None:
    ids = _ten(shop)
    app = App(shop.root / "config.yaml")
    graces = prune.graces(app)
    now = utc(LATER)
    counted = prune.count(shop.state, now, RETENTION, graces)

    first = prune.prune(shop.state, now, RETENTION, graces, batch_size=3, max_batches=2)

    assert (first.reminders, first.more, first.batches) == (6, True, 2)
    assert occurrences(shop) == {"x6", "x7", "x8", "x9"}
    assert owners(shop, models.message) == ids[6:] and _orphans(shop) == []
    asked = iter([None, "SIGTERM"])
    second = prune.prune(
        shop.state, now, RETENTION, graces, batch_size=3, should_stop=lambda: next(asked)
    )
    assert (second.reminders, second.stopped) == (3, "SIGTERM")
    rest = prune.prune(shop.state, now, RETENTION, graces, batch_size=3)
    assert (rest.reminders, rest.more) == (1, False)
    assert occurrences(shop) == set() and shop.rows(models.event) == []
    total = {t: getattr(first, t) + getattr(second, t) + getattr(rest, t) for t in prune.TABLES}
    assert total == {t: getattr(counted, t) for t in prune.TABLES}


def _fail_deleting(p: Project, occurrence: str) -> None:
    """A trigger that refuses to delete one reminder, as a database that fails mid-batch."""
    with p.state.begin() as conn:
        if p.backend == "sqlite":
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE DELETE ON reminders_reminder "
                f"WHEN OLD.occurrence = '{occurrence}' BEGIN SELECT RAISE(ABORT, 'disk full'); END"
            )
        else:
            conn.exec_driver_sql(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "RAISE EXCEPTION 'disk full'; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER refuse BEFORE DELETE ON reminders_reminder FOR EACH ROW "
                f"WHEN (OLD.occurrence = '{occurrence}') EXECUTE FUNCTION refuse()"
            )


def test_a_batch_that_fails_is_rolled_back_whole_and_the_next_prune_finishes(
    shop: Project,
) -> None:
    ids = _ten(shop)
    _fail_deleting(shop, "x7")

    failed = shop.run("prune", "--batch-size", "3", now=LATER)

    assert failed.code == 1, str(failed)
    assert "disk full" in failed.err and "deleted before it: 6 reminders" in failed.err
    # Two batches (x0..x5) done; the third (x6..x8) rolled back with its messages and events.
    assert occurrences(shop) == {"x6", "x7", "x8", "x9"}
    assert owners(shop, models.message) == ids[6:]
    assert owners(shop, models.event) == sorted(ids[6:] * 2)
    with shop.state.begin() as conn:
        conn.exec_driver_sql(
            "DROP TRIGGER refuse" + ("" if shop.backend == "sqlite" else " ON reminders_reminder")
        )
    done = prune_json(shop, "--batch-size", "3")
    assert (done["reminders"], done["messages"], done["events"]) == (4, 4, 8)
    assert occurrences(shop) == set() and _orphans(shop) == []


# --- the scheduler -------------------------------------------------------------------------------


def test_the_scheduler_prunes_a_bounded_part_each_cycle(
    shop: Project, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reminders import scheduler

    shop.write_config(config_yaml(redis=redis_url))
    _ten(shop)
    add(shop, "still-pending", "pending", OLD)
    monkeypatch.setattr(prune, "BATCH", 2)
    monkeypatch.setattr(scheduler, "PRUNE_BATCHES", 2)
    monkeypatch.setenv("REMINDERS_NOW", LATER)
    runner = scheduler.Scheduler(App(shop.root / "config.yaml"))

    first = runner.cycle()

    assert first.errors == []
    assert first.scans is not None and first.dispatch is not None  # not held up by pruning
    assert first.pruned is not None
    assert (first.pruned["reminders"], first.pruned["more"]) == (4, True)
    assert len(occurrences(shop) - {"1", "2", "3"}) == 7
    parts = [first.pruned["reminders"]]
    more = True
    while more:  # a backlog goes on at the next cycles, a bounded part each
        cycle = runner.cycle()
        assert cycle.pruned is not None
        parts.append(cycle.pruned["reminders"])
        more = cycle.pruned["more"]
    assert parts == [4, 4, 2]
    assert occurrences(shop) - {"1", "2", "3"} == {"still-pending"}
    # Nothing left: the next prune waits for the next scan.
    assert runner.cycle().pruned is None


def test_scheduler_once_prunes_and_says_so(shop: Project, redis_url: str) -> None:
    shop.write_config(config_yaml(redis=redis_url))
    add(shop, "a", "delivered", OLD)
    add(shop, "b", "pending", OLD)
    result = shop.ok("scheduler", "--once", now=LATER)
    assert "prune: 1 reminders, 1 messages, 2 events deleted\n" in result.out
    assert occurrences(shop) == {"b"}


# --- bad input -----------------------------------------------------------------------------------


def test_a_bad_older_than_names_the_allowed_forms(shop: Project) -> None:
    add(shop, "a", "sent", OLD)
    result = shop.run("prune", "--older-than", "3x", now=LATER)
    assert result.code == 2
    assert "--older-than" in result.err and "ms, s, m, h, d or w" in result.err
    result = shop.run("prune", "--older-than", "30d", now=LATER)
    assert result.code == 2
    assert "shorter than web.link_max_age (90d)" in result.err
    assert occurrences(shop) == {"a"}


def test_a_retention_shorter_than_links_live_is_a_config_error(shop: Project) -> None:
    text = shop.read("config.yaml").replace("state:\n", "state:\n  retention: 30d\n", 1)
    shop.write("config.yaml", text)
    result = shop.run("validate", "--offline")
    assert result.code == 2
    assert "config.yaml:6: state.retention (30d) is shorter than web.link_max_age" in result.err


def test_a_null_retention_keeps_everything_unless_asked(shop: Project) -> None:
    text = shop.read("config.yaml").replace("state:\n", "state:\n  retention: null\n", 1)
    shop.write("config.yaml", text)
    add(shop, "a", "sent", OLD)
    result = shop.run("prune", now=LATER)
    assert result.code == 2 and "pass --older-than" in result.err
    assert prune_json(shop, "--older-than", "180d")["reminders"] == 1


def test_the_final_statuses_written_out_are_the_lifecycles() -> None:
    assert set(re.findall(r"'(\w+)'", models.FINAL_SQL)) == {s.value for s in lifecycle.FINAL}


def test_sigterm_stops_a_prune_between_batches_and_the_next_run_finishes(tmp_path: Path) -> None:
    """On PostgreSQL, where a trigger can make each delete slow enough to be stopped midway."""
    from tests.delivery_fixtures import finish, wait_until

    with project_at(tmp_path, "postgresql") as p:
        p.setup()
        p.ok("db", "upgrade")
        for i in range(40):
            add(p, f"x{i:02}", "delivered", OLD + timedelta(minutes=i))
        with p.state.begin() as conn:
            conn.exec_driver_sql(
                "CREATE FUNCTION slow() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM pg_sleep(0.2); RETURN OLD; END $$"
            )
            conn.exec_driver_sql(
                "CREATE TRIGGER slow BEFORE DELETE ON reminders_reminder FOR EACH ROW "
                "EXECUTE FUNCTION slow()"
            )
        child = p.spawn("prune", "--batch-size", "1", now=LATER)
        wait_until(lambda: len(p.reminders()) < 40)
        child.send_signal(signal.SIGTERM)
        code, out, err = finish(child)

        assert code == 128 + signal.SIGTERM, err
        assert "interrupted by SIGTERM" in err
        left = len(p.reminders())
        assert 0 < left < 40
        deleted = int(re.search(r"reminders\s+(\d+)", out).group(1))  # type: ignore[union-attr]
        assert deleted == 40 - left and _orphans(p) == []
        assert prune_json(p)["reminders"] == left
        assert p.reminders() == []


def test_a_reminder_another_transaction_holds_is_left_for_the_next_prune(tmp_path: Path) -> None:
    """On PostgreSQL a batch skips the reminders another transaction has locked (ops' retry of a
    failed one, say) instead of waiting for it or deleting what it is changing."""
    with project_at(tmp_path, "postgresql") as p:
        p.setup()
        p.ok("db", "upgrade")
        held = add(p, "held", "failed", OLD)
        add(p, "free", "failed", OLD)
        r = models.reminder
        with p.state.connect() as other, other.begin():
            other.execute(sa.select(r.c.id).where(r.c.id == held).with_for_update()).one()
            done = prune_json(p)
            assert done["reminders"] == 1
            other.execute(
                r.update().where(r.c.id == held).values(status="pending", updated_at=utc(LATER))
            )
        # The retry committed: pending now, and kept.
        assert prune_json(p)["reminders"] == 0
        assert occurrences(p) == {"held"} and owners(p, models.message) == [held]
