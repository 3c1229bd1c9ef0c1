"""Incremental scans: a rule with ``incremental:`` reads only the rows changed since its last
scan (``:since``), and a full scan at least every ``full_every`` sees the rows that vanished.

End to end through the command line on SQLite and PostgreSQL (business and state DB alike), at
fixed ``--now`` times: the "last scan" an incremental scan starts from is the recorded start of
the rule's last successful run.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.rules_fixtures import NOW, Project, config_yaml, project_at
from tests.test_scan import scans_at_once

T0 = datetime.fromisoformat(NOW.replace("Z", "+00:00"))

INCREMENTAL_RULE = """\
rules:
  - name: refill-due
    query: |
      SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,
             p.id AS customer_id, p.first_name, p.phone, p.email, p.timezone
      FROM prescriptions rx JOIN patients p ON p.id = rx.patient_id
      WHERE rx.refills_left > 0 AND rx.updated_at >= :since{extra}
      ORDER BY rx.id
    occurrence: "{{{{ rx_id }}}}"
    due: runs_out_on
    offsets: [-3d, 0d]
    at: "10:00"
    channels: [sms, email]
    template: refill-due
    incremental:
      full_every: 1d
      lookback: 10m
"""


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


@pytest.fixture(params=["sqlite", "postgresql"])
def shop(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    """The default prescriptions with an ``updated_at`` column (an hour before T0) and the
    incremental rule, migrated."""
    with project_at(tmp_path, request.param) as made:
        p = made.setup(rules=INCREMENTAL_RULE.format(extra=""))
        kind = "TEXT" if p.backend == "sqlite" else "TIMESTAMP WITH TIME ZONE"
        p.sql(f"ALTER TABLE prescriptions ADD COLUMN updated_at {kind}")
        p.sql("UPDATE prescriptions SET updated_at = :t", {"t": at(-60)})
        p.ok("db", "upgrade")
        yield p


def scan(p: Project, when: datetime, *args: str) -> dict[str, Any]:
    (only,) = p.ok("scan", "--json", *args, now=iso(when)).json_lines()
    assert only["error"] is None
    return only


def change(p: Project, rx: int, when: datetime, runs_out_on: str | None = None) -> None:
    """The business updates prescription ``rx`` at ``when`` (a new date, or only touched)."""
    if runs_out_on is None:
        p.sql("UPDATE prescriptions SET updated_at = :t WHERE id = :id", {"t": when, "id": rx})
        return
    p.sql(
        "UPDATE prescriptions SET updated_at = :t, runs_out_on = :d WHERE id = :id",
        {"t": when, "d": p.due(runs_out_on), "id": rx},
    )


def add_prescriptions(p: Project, rows: int, when: datetime) -> None:
    """``rows`` new prescriptions (ids from 10), each updated at ``when``."""
    p.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on, updated_at) "
        "VALUES (:id, :patient, :drug, :due, :t)",
        [
            {"id": i, "patient": 1 + i % 3, "drug": f"drug {i}", "due": p.due("2027-04-01"),
             "t": when}
            for i in range(10, 10 + rows)
        ],
    )  # fmt: skip


def statuses(p: Project) -> dict[tuple[str, str], str]:
    return {key: r["status"] for key, r in p.by_key().items()}


def test_inserted_moved_late_and_deleted_rows(shop: Project) -> None:
    first = scan(shop, at(0))
    assert (first["kind"], first["rows"], first["created"]) == ("full", 3, 6)

    # Nothing changed: the incremental scan reads no row and touches nothing.
    quiet = scan(shop, at(5))
    assert (quiet["kind"], quiet["rows"], quiet["created"], quiet["canceled"]) == (
        "incremental",
        0,
        0,
        0,
    )

    # After it: a new prescription, a moved date, a deleted row, and a change stamped 4 minutes
    # before that scan began but committed after it (a long transaction): inside the lookback.
    shop.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on, updated_at) "
        "VALUES (4, 1, 'Levothyroxine', :d, :t)",
        {"d": shop.due("2027-03-28"), "t": at(6)},
    )
    change(shop, 2, at(6), "2027-03-22")
    change(shop, 1, at(1), "2027-03-19")
    shop.sql("DELETE FROM prescriptions WHERE id = 3")
    before = shop.by_key()

    seen = scan(shop, at(10))
    assert seen["kind"] == "incremental"
    assert (seen["rows"], seen["created"], seen["moved"], seen["canceled"]) == (3, 2, 4, 0)
    after = shop.by_key()
    assert after[("4", "-3d")]["status"] == "pending"
    for rx in ("1", "2"):
        for offset in ("-3d", "0d"):
            assert after[(rx, offset)]["planned_at"] != before[(rx, offset)]["planned_at"]
    # The deleted row's reminders: an incremental scan cannot see a row vanish.
    assert statuses(shop)[("3", "-3d")] == statuses(shop)[("3", "0d")] == "pending"
    assert after[("3", "0d")]["updated_at"] == before[("3", "0d")]["updated_at"]

    # The next full scan (asked for) cancels them, and finds the rest in line.
    full = scan(shop, at(15), "--full")
    assert (full["kind"], full["rows"], full["canceled"], full["created"], full["moved"]) == (
        "full",
        3,
        2,
        0,
        0,
    )
    assert statuses(shop)[("3", "-3d")] == statuses(shop)[("3", "0d")] == "canceled"
    assert [r["kind"] for r in shop.scan_runs()] == ["full", "incremental", "incremental", "full"]
    status = shop.ok("status", now=iso(at(16))).out
    assert "refill-due 2027-03-10T12:15:00Z done (full scan): 3 rows" in status


def test_since_is_the_last_successful_start_minus_the_lookback(shop: Project) -> None:
    """A row stamped just inside the lookback of the last scan is read again; one stamped just
    outside it is not (it was read by that scan already)."""
    scan(shop, at(0))
    change(shop, 1, at(-9))  # 1 minute inside T0 - 10m
    change(shop, 2, at(-11))  # 1 minute before it
    again = scan(shop, at(5))
    assert (again["kind"], again["rows"], again["unchanged"]) == ("incremental", 1, 2)
    # The scan at 5 minutes is now the last: since = 5m - 10m = -5m.
    assert scan(shop, at(6))["rows"] == 0
    change(shop, 2, at(-4))
    assert scan(shop, at(7))["rows"] == 1


def test_the_choice_of_full_or_incremental_survives_restarts(shop: Project, redis_url: str) -> None:
    """Each ``scheduler --once`` is a new process: the choice comes from the recorded runs."""
    shop.write_config(config_yaml(redis=redis_url))

    def once(when: datetime) -> str:
        shop.ok("scheduler", "--once", now=iso(when))
        return str(shop.scan_runs()[-1]["kind"])

    assert once(at(0)) == "full"  # no full scan yet
    assert once(at(5)) == "incremental"
    assert once(at(60 * 23)) == "incremental"
    assert once(at(60 * 24)) == "full"  # the last full one began a day ago
    assert once(at(60 * 24 + 5)) == "incremental"
    # A full scan that failed does not count: the next is full again.
    shop.write("rules/refills.yaml", INCREMENTAL_RULE.format(extra=" AND no_such_column = 1"))
    shop.run("scan", now=iso(at(60 * 48)))
    assert [r["status"] for r in shop.scan_runs()][-1] == "failed"
    assert shop.scan_runs()[-1]["kind"] == "full"
    shop.write("rules/refills.yaml", INCREMENTAL_RULE.format(extra=""))
    assert once(at(60 * 48 + 5)) == "full"
    # A plain scan without incremental: always full.
    plain = INCREMENTAL_RULE.format(extra="").replace(" AND rx.updated_at >= :since", "")
    shop.write("rules/refills.yaml", plain.split("    incremental:")[0])
    assert scan(shop, at(60 * 48 + 6))["kind"] == "full"


def test_a_query_failing_half_way_applies_no_half_and_moves_no_watermark(shop: Project) -> None:
    """The query fails at a row of bad data (its 2,501st): what was read before stands in whole
    batches (each batch is one transaction), nothing is canceled, the run is failed, and the
    next scan starts from the last successful one, so it reads every row the failed one did not
    finish."""
    # A query that fails on one value: a JSON or integer cast of the drug's name.
    boom = "json(rx.drug_name)" if shop.backend == "sqlite" else "CAST(rx.drug_name AS integer)"
    failing = INCREMENTAL_RULE.format(extra="").replace(
        "SELECT rx.id AS rx_id,",
        f"SELECT CASE WHEN rx.drug_name = 'poison' THEN {boom} END AS boom,\n"
        "             rx.id AS rx_id,",
    )
    shop.write("rules/refills.yaml", failing)
    scan(shop, at(0))
    rows = 3000
    add_prescriptions(shop, rows, at(2))
    shop.sql("UPDATE prescriptions SET drug_name = 'poison' WHERE id = 2510")
    result = shop.run("scan", "--json", now=iso(at(5)))
    assert result.code == 1, result
    (failed,) = result.json_lines()
    assert failed["kind"] == "incremental" and failed["error"]
    assert shop.scan_runs()[-1]["status"] == "failed"
    reminders = shop.reminders()
    by_occurrence: dict[str, int] = {}
    for r in reminders:
        by_occurrence[r["occurrence"]] = by_occurrence.get(r["occurrence"], 0) + 1
    assert set(by_occurrence.values()) == {2}  # every occurrence whole, none half
    assert len(by_occurrence) < rows + 3  # not the rows from the failure on
    assert {r["status"] for r in reminders} == {"pending"}

    shop.sql("UPDATE prescriptions SET drug_name = 'Aspirin' WHERE id = 2510")
    done = scan(shop, at(10))
    # since = T0 - 10m (the last successful scan), not 5m - 10m: every new row is read.
    assert (done["kind"], done["rows"]) == ("incremental", rows)
    assert len(shop.reminders()) == 2 * (rows + 3)


def test_two_incremental_scans_at_once(shop: Project) -> None:
    scan(shop, at(0))
    rows = 3000
    add_prescriptions(shop, rows, at(2))
    results = scans_at_once(shop)
    assert [r["kind"] for r in results] == ["incremental", "incremental"]
    assert sum(r["created"] for r in results) == 2 * rows
    reminders = shop.reminders()
    assert len(reminders) == 2 * (rows + 3)
    assert len({(r["occurrence"], r["offset"]) for r in reminders}) == 2 * (rows + 3)
    assert shop.events() == []


@pytest.mark.parametrize(
    ("case", "line", "message"),
    [
        (
            "incremental without :since",
            15,
            "rule refill-due: incremental: the query does not use :since",
        ),
        (":since without incremental", 3, "rule refill-due: query: :since is bound only for"),
        ("full_every of zero", 16, "rule refill-due: incremental.full_every: must be a positive"),
    ],
)
def test_validate_pairs_incremental_with_since(
    tmp_path: Path, case: str, line: int, message: str
) -> None:
    with project_at(tmp_path, "sqlite") as made:
        p = made.setup(rules=INCREMENTAL_RULE.format(extra=""), data=False)
        text = INCREMENTAL_RULE.format(extra="")
        if case == "incremental without :since":
            text = text.replace(" AND rx.updated_at >= :since", "")
        elif case == ":since without incremental":
            text = text.split("    incremental:")[0]
        else:
            text = text.replace("full_every: 1d", "full_every: 0d")
        p.write("rules/refills.yaml", text)
        result = p.run("validate", "--offline")
        assert result.code == 2, result
        assert f"rules/refills.yaml:{line}: {message}" in result.out + result.err, result


def test_validate_prepares_an_incremental_query(shop: Project) -> None:
    assert shop.run("validate").code == 0


def test_a_changed_rule_gets_a_full_scan(shop: Project) -> None:
    """A new send time or WHERE concerns rows whose updated_at did not move: the first scan
    after the rule changed is a full one, whatever full_every says."""
    scan(shop, at(0))
    assert scan(shop, at(5))["kind"] == "incremental"
    text = INCREMENTAL_RULE.format(extra="")
    shop.write("rules/refills.yaml", text.replace('at: "10:00"', 'at: "11:00"'))
    moved = scan(shop, at(10))
    assert (moved["kind"], moved["rows"], moved["moved"]) == ("full", 3, 6)
    assert scan(shop, at(15))["kind"] == "incremental"
    narrower = text.replace('at: "10:00"', 'at: "11:00"').replace(
        "WHERE rx.refills_left > 0", "WHERE rx.refills_left > 0 AND rx.id <> 3"
    )
    shop.write("rules/refills.yaml", narrower)
    gone = scan(shop, at(20))
    assert (gone["kind"], gone["rows"], gone["canceled"]) == ("full", 2, 2)
