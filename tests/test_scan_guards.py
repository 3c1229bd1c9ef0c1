"""What a scan must not do by mistake, on SQLite and PostgreSQL: cancel a rule's reminders en
masse because its query suddenly returns nothing, or cancel for good what only went missing.

A truncated table, a WHERE typo or a replica that lost its data looks, to a scan, exactly like
every occurrence having vanished. Past ``scan.max_cancel`` of a rule's open reminders (with at
least 20 of them) the scan cancels none of them, fails with the way forward, and creates and moves
what it can as usual. And a reminder canceled only because its occurrence went missing comes back
when the occurrence does.
"""

from __future__ import annotations

import json

import pytest

from reminders import lifecycle
from reminders.clock import parse_instant
from reminders.lifecycle import CANCELED, PENDING
from reminders.scan import RESTORED, VANISHED, is_mass_cancel
from tests.rules_fixtures import NOW, Project, config_yaml, project

__all__ = ["project"]

PATIENTS = 30  # 60 open reminders: above the guard's floor of 20


def _statuses(p: Project) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in p.reminders():
        found[row["status"]] = found.get(row["status"], 0) + 1
    return found


def _scan(p: Project, *args: str) -> tuple[int, dict[str, object], str]:
    result = p.run("scan", "--json", *args, now=NOW)
    (line,) = result.json_lines()
    return result.code, line, result.err


def test_the_guards_threshold() -> None:
    assert not is_mass_cancel(19, 19, 0.5)  # too few open reminders to judge
    assert not is_mass_cancel(10, 20, 0.5)  # exactly half: allowed
    assert is_mass_cancel(11, 20, 0.5)
    assert is_mass_cancel(2000, 2000, 0.5)
    assert not is_mass_cancel(2000, 2000, 1.0)


def test_an_emptied_table_cancels_nothing_fails_and_says_how_to_proceed(project: Project) -> None:
    project.ok("db", "upgrade")
    project.refillable(PATIENTS)
    assert _scan(project)[1]["created"] == 2 * PATIENTS
    project.sql("DELETE FROM prescriptions")  # a truncated table, as the scan sees it
    code, counts, err = _scan(project)
    assert code == 1
    assert (counts["canceled"], counts["held"]) == (0, 2 * PATIENTS)
    assert "--allow-mass-cancel" in err and "scan.max_cancel (50%)" in err
    assert _statuses(project) == {"pending": 2 * PATIENTS}
    last = project.scan_runs()[-1]
    assert last["status"] == "failed" and "none was canceled" in last["error"]
    status = json.loads(project.ok("status", "--json", now=NOW).out)
    assert "--allow-mass-cancel" in json.dumps(status)  # ops see why in `status`
    # Ops checked: the rows are really gone.
    code, counts, _ = _scan(project, "--rule", "refill-due", "--allow-mass-cancel")
    assert (code, counts["canceled"], counts["held"]) == (0, 2 * PATIENTS, 0)
    assert _statuses(project) == {"canceled": 2 * PATIENTS}


def test_the_guarded_scan_still_creates_and_moves(project: Project) -> None:
    project.ok("db", "upgrade")
    project.refillable(PATIENTS)
    _scan(project)
    # Most rows vanish (a broken WHERE), one moves, one is new.
    project.sql("DELETE FROM prescriptions WHERE id > 2")
    moved = {"d": project.due("2027-03-21")}
    project.sql("UPDATE prescriptions SET runs_out_on = :d WHERE id = 1", moved)
    project.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
        "VALUES (100, 2, 'Metformin', :d)",
        {"d": project.due("2027-03-22")},
    )
    code, counts, _ = _scan(project)
    assert code == 1
    assert (counts["created"], counts["moved"], counts["canceled"]) == (2, 2, 0)


def test_a_normal_days_cancellations_are_not_held(project: Project) -> None:
    project.ok("db", "upgrade")
    project.refillable(PATIENTS)
    _scan(project)
    project.sql("DELETE FROM prescriptions WHERE id <= 5")  # 10 of 60: a day's refills done
    code, counts, _ = _scan(project)
    assert (code, counts["canceled"], counts["held"]) == (0, 10, 0)


def test_a_vanished_occurrence_that_comes_back_is_pending_again(project: Project) -> None:
    project.ok("db", "upgrade")
    _scan(project)
    planned = {k: r["planned_at"] for k, r in project.by_key().items()}
    project.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 3")  # a WHERE now misses it
    assert _scan(project)[1]["canceled"] == 2
    assert {r["reason"] for k, r in project.by_key().items() if k[0] == "3"} == {VANISHED}
    project.sql("UPDATE prescriptions SET refills_left = 1 WHERE id = 3")  # fixed
    code, counts, _ = _scan(project)
    assert (code, counts["restored"], counts["created"]) == (0, 2, 0)
    after = project.by_key()
    for key in (("3", "-3d"), ("3", "0d")):
        row = after[key]
        assert (row["status"], row["reason"]) == ("pending", RESTORED)
        assert row["planned_at"] == row["send_at"] == planned[key]  # the same planned time
    events = [(e["from_status"], e["to_status"], e["reason"]) for e in project.events()]
    assert events[-2:] == [("canceled", "pending", RESTORED)] * 2
    assert _scan(project)[1]["restored"] == 0  # once


def test_a_reminder_canceled_for_another_reason_stays_canceled(project: Project) -> None:
    project.ok("db", "upgrade")
    _scan(project)
    rid = project.by_key()[("3", "-3d")]["id"]
    with project.state.begin() as conn:  # the customer answered DONE to the first one
        lifecycle.move(
            conn, [rid], source=PENDING, target=CANCELED, now=parse_instant(NOW), reason="done"
        )
    project.sql("UPDATE prescriptions SET refills_left = 0 WHERE id = 3")
    _scan(project)
    project.sql("UPDATE prescriptions SET refills_left = 1 WHERE id = 3")
    assert _scan(project)[1]["restored"] == 1  # the 0d one; the replied one stays done
    assert project.by_key()[("3", "-3d")]["reason"] == "done"


# A query that works for minutes before its first row: a billion combinations counted (a
# recursion of a thousand steps only, MariaDB's default limit).
_SLOW = """\
rules:
  - name: refill-due
    query: |
      WITH RECURSIVE c(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM c WHERE n < 1000)
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
      WHERE (SELECT COUNT(*) FROM c a, c b, c d) > 0
    occurrence: "{{ rx_id }}"
    due: runs_out_on
    offsets: [-3d]
    at: "10:00"
    channels: [sms]
"""


def test_a_query_past_source_query_timeout_is_stopped_and_applies_nothing(
    project: Project,
) -> None:
    p = project
    p.write_config(config_yaml(source="{source}\n  query_timeout: 300ms"))
    p.write("rules/refills.yaml", _SLOW)
    p.ok("db", "upgrade")
    code, line, err = _scan(p)
    assert code == 1, err
    assert line["rule"] == "refill-due"
    # Each database says it in its own words; SQLite's "interrupted" is explained.
    said = line["error"].lower()
    assert "rule refill-due" in said
    assert any(w in said for w in ("query_timeout", "statement timeout", "max_statement_time")), (
        said
    )
    assert p.reminders() == []


# --- the comparison in chunks -----------------------------------------------------------------


@pytest.mark.parametrize("in_memory", [True, False], ids=["digests-in-memory", "lookups"])
def test_a_full_scan_compares_in_chunks_and_cancels_exactly_the_vanished(
    project: Project, in_memory: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With chunks of 7 the rows, the lookups and the cancels of vanished reminders each take
    many transactions; what they add up to is exact, and the guard still sees the whole. Both
    ways of comparing: the open reminders' digests in memory, and (a rule with more open
    reminders than that holds) a lookup in the state DB a batch."""
    import sqlalchemy as sa

    from reminders import open_digests
    from reminders.app import App
    from reminders.scan import scan_rule

    if not in_memory:
        monkeypatch.setattr(open_digests, "LIMIT", 0)

    project.refillable(100)
    project.ok("db", "upgrade")
    app = App(project.root / "config.yaml")
    rule = app.ruleset.rule("refill-due")
    now = parse_instant(NOW)
    statements: list[str] = []

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        statements.append(statement)

    sa.event.listen(app.state, "before_cursor_execute", count)
    first = scan_rule(app.config, rule, app.state, app.business, now, chunk=7)
    assert (first.rows, first.created, first.error) == (100, 200, None)
    project.sql("DELETE FROM prescriptions WHERE id > 40")  # 120 reminders vanish: 60%
    statements.clear()
    held = scan_rule(app.config, rule, app.state, app.business, now, chunk=7)
    assert (held.rows, held.unchanged, held.held, held.canceled) == (40, 80, 120, 0)
    assert held.error and "120 of its 200 open reminders" in held.error
    assert _statuses(project) == {PENDING: 200}
    lookups = [s for s in statements if "row_hash" in s and "SELECT" in s.upper()]
    if in_memory:
        # The digests read once (both offsets' reminders, by occurrence), then only the
        # unmatched ones' reminders counted: no lookup a batch.
        assert len(lookups) == 2, lookups
        assert "ORDER BY reminders_reminder.occurrence" in lookups[0]
        assert "reminders_scan_unmatched" in lookups[1]
    else:
        # Every batch of 7 rows looked its reminders up on its own (6 batches).
        assert len(lookups) == 6
    statements.clear()
    done = scan_rule(
        app.config, rule, app.state, app.business, now, chunk=7, allow_mass_cancel=True
    )
    assert (done.canceled, done.unchanged, done.error) == (120, 80, None)
    # 120 vanished reminders canceled 7 at a time: 18 reads of ids, then one that finds none.
    reads = [s for s in statements if "reminders_scan_seen" in s and "LIMIT" in s.upper()]
    assert len(reads) == 19
    reminders = project.reminders()
    canceled = {r["occurrence"] for r in reminders if r["status"] == CANCELED}
    assert canceled == {str(i) for i in range(41, 101)}
    assert all(r["reason"] == VANISHED for r in reminders if r["status"] == CANCELED)
    assert {r["status"] for r in reminders if int(r["occurrence"]) <= 40} == {PENDING}
