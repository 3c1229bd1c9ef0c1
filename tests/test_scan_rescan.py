"""A full rescan compared through the open reminders' digests in memory, on SQLite and
PostgreSQL: what it must get right that a lookup a row got right by construction.

A row whose digest an open reminder carries is unchanged and is not recorded as seen; only the
reminders no row matched can have vanished. So each case here is one where trusting a digest
match alone would cancel, or miss, something. Last, the statistics a first scan leaves
PostgreSQL to plan the next scan's lookups with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import models, scan
from reminders.lifecycle import CANCELED, PENDING
from reminders.scan import VANISHED
from tests.rules_fixtures import NOW, Project, project, project_at, refills_yaml

__all__ = ["project"]

PATIENTS = 30  # 60 open reminders (two offsets each)


def _scan(p: Project) -> dict[str, Any]:
    result = p.run("scan", "--json", "--full", now=NOW)
    assert result.code == 0, result.err
    (line,) = result.json_lines()
    return dict(line)


def _set_digest(p: Project, occurrence: str, digest: str, offset: str | None = None) -> None:
    r = models.reminder
    where = [r.c.occurrence == occurrence]
    if offset is not None:
        where.append(r.c.offset == offset)
    with p.state.begin() as conn:
        assert conn.execute(sa.update(r).where(*where).values(row_hash=digest)).rowcount


def _first_scan(p: Project, patients: int = PATIENTS) -> None:
    p.ok("db", "upgrade")
    p.refillable(patients)
    assert _scan(p)["created"] == 2 * patients


def test_changed_deleted_and_unchanged_rows_in_one_rescan(project: Project) -> None:
    """The changed row's old digest matches nothing, yet its reminders are moved, not
    canceled: the rows compared in the state DB are recorded as seen."""
    _first_scan(project)
    project.sql(
        "UPDATE prescriptions SET runs_out_on = :due WHERE id = 1",
        {"due": project.due("2027-03-25")},
    )
    project.sql("DELETE FROM prescriptions WHERE id = 2")
    counts = _scan(project)
    assert (counts["rows"], counts["moved"], counts["canceled"], counts["unchanged"]) == (
        PATIENTS - 1,
        2,
        2,
        2 * PATIENTS - 4,
    )
    by_key = project.by_key()
    assert {by_key[("1", o)]["status"] for o in ("-3d", "0d")} == {PENDING}
    assert {by_key[("2", o)]["reason"] for o in ("-3d", "0d")} == {VANISHED}
    assert {r["status"] for r in project.reminders()} == {PENDING, CANCELED}
    assert _scan(project)["unchanged"] == 2 * PATIENTS - 2  # and then nothing is left to do


def test_an_occurrence_whose_open_reminders_disagree_is_compared_in_the_state_db(
    project: Project,
) -> None:
    """One of occurrence 5's two reminders carries another digest (it was with a worker when
    the other was refreshed): its row matches the first, yet must not leave the second looking
    vanished. The row is compared in the state DB, which refreshes both."""
    _first_scan(project)
    _set_digest(project, "5", "0" * 24, offset="0d")
    counts = _scan(project)
    assert (counts["canceled"], counts["unchanged"], counts["moved"]) == (0, 2 * PATIENTS, 0)
    by_key = project.by_key()
    assert by_key[("5", "0d")]["status"] == PENDING
    assert by_key[("5", "0d")]["row_hash"] == by_key[("5", "-3d")]["row_hash"] != "0" * 24


def test_reminders_written_by_other_means_are_compared_and_vanish_like_any_other(
    project: Project,
) -> None:
    """Reminders whose digest is not of the scan's kind (another writer's) are never matched:
    their row, present, refreshes them; absent, cancels them."""
    _first_scan(project)
    _set_digest(project, "3", "x")
    _set_digest(project, "4", "x")
    project.sql("DELETE FROM prescriptions WHERE id = 3")
    counts = _scan(project)
    assert (counts["canceled"], counts["unchanged"]) == (2, 2 * PATIENTS - 2)
    by_key = project.by_key()
    assert {by_key[("3", o)]["status"] for o in ("-3d", "0d")} == {CANCELED}
    assert {by_key[("4", o)]["status"] for o in ("-3d", "0d")} == {PENDING}
    assert by_key[("4", "0d")]["row_hash"] != "x"


def test_a_row_the_query_returns_twice_counts_its_reminders_once(project: Project) -> None:
    _first_scan(project)
    rule = refills_yaml().replace(
        "      ORDER BY rx.id\n",
        "      UNION ALL\n"
        "      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,\n"
        "             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone\n"
        "      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id\n"
        "      WHERE rx.id = 7\n",
    )
    project.write("rules/refills.yaml", rule)
    counts = _scan(project)
    assert (counts["rows"], counts["unchanged"], counts["created"]) == (
        PATIENTS + 1,
        2 * PATIENTS,
        0,
    )


def test_reminders_past_grace_or_not_open_are_left_alone_when_their_row_vanishes(
    project: Project,
) -> None:
    """Only open reminders within grace are in the comparison: a sent one whose row is gone
    stays sent, its pending sibling is canceled."""
    _first_scan(project)
    r = models.reminder
    with project.state.begin() as conn:
        conn.execute(
            sa.update(r).where(r.c.occurrence == "6", r.c.offset == "-3d").values(status="sent")
        )
    project.sql("DELETE FROM prescriptions WHERE id = 6")
    counts = _scan(project)
    assert (counts["canceled"], counts["unchanged"]) == (1, 2 * PATIENTS - 2)
    by_key = project.by_key()
    assert by_key[("6", "-3d")]["status"] == "sent"
    assert by_key[("6", "0d")]["status"] == CANCELED


def _reltuples(p: Project) -> float:
    with p.state.connect() as conn:
        return float(
            conn.execute(
                sa.text("SELECT reltuples FROM pg_class WHERE relname = :t"),
                {"t": models.reminder.name},
            ).scalar_one()
        )


def test_a_first_scan_that_filled_the_table_leaves_postgresql_statistics_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL plans the next scan's lookups from statistics: a first scan that created many
    reminders refreshes them (ANALYZE) instead of leaving the table looking empty until
    autovacuum comes by. A small one leaves them to autovacuum (-1: never analyzed). Under
    autovacuum's own threshold (50 changed rows) either way, so only the scan can have done it."""
    monkeypatch.setattr(scan, "ANALYZE_AFTER", 40)
    for patients, reltuples in ((20, 40.0), (19, -1.0)):
        with project_at(tmp_path / str(patients), "postgresql") as made:
            p = made.setup()
            _first_scan(p, patients)
            assert _reltuples(p) == reltuples
