"""The scan respects the customers' preferences: no reminders for a customer who turned every
channel of a rule off (counted as ``off``); their existing open reminders are left to the
send-time check, and switching back on lets the next scan create them. SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime

from reminders import consent
from tests.rules_fixtures import NOW, Project, project

__all__ = ["project"]

AT = datetime(2027, 3, 9, tzinfo=UTC)


def choose(p: Project, customer: str, choices: dict[tuple[str, str], bool]) -> None:
    """Store a customer's choices as the preferences page does."""
    with p.state.begin() as conn:
        consent.set_preferences(conn, customer, choices, AT)


def customers_with_reminders(p: Project) -> dict[str, int]:
    found: dict[str, int] = {}
    for row in p.reminders():
        found[row["customer_id"]] = found.get(row["customer_id"], 0) + 1
    return found


def test_customers_who_turned_a_rule_off_get_no_reminders(project: Project) -> None:
    p = project
    p.ok("db", "upgrade")
    choose(p, "1", {("refill-due", "sms"): False, ("refill-due", "email"): False})
    choose(p, "2", {("refill-due", "sms"): False})  # email is still on: reminders as usual
    choose(p, "3", {("*", "*"): False})  # everything off
    (counts,) = p.ok("scan", "--json").json_lines()
    assert (counts["rows"], counts["created"], counts["off"]) == (3, 2, 4)
    assert customers_with_reminders(p) == {"2": 2}
    assert p.events() == []
    text = p.ok("scan").out
    assert "0 created" in text and "4 off (turned off by the customer)" in text


def test_open_reminders_are_left_to_the_send_time_check_and_on_again_creates(
    project: Project,
) -> None:
    p = project
    p.ok("db", "upgrade")
    (first,) = p.ok("scan", "--json").json_lines()
    assert (first["created"], first["off"]) == (6, 0)
    before = {r["id"]: r["status"] for r in p.reminders()}
    choose(p, "1", {("refill-due", "*"): False})
    (again,) = p.ok("scan", "--json").json_lines()
    # Customer 1's reminders exist already: not canceled (START before their time lets them
    # go), and not counted as off (nothing was left out).
    assert (again["created"], again["canceled"], again["off"]) == (0, 0, 0)
    assert {r["id"]: r["status"] for r in p.reminders()} == before
    # A new occurrence for customer 1 while off: not created.
    p.sql(
        "INSERT INTO prescriptions (id, patient_id, drug_name, runs_out_on) "
        "VALUES (4, 1, 'Insulin', :d)",
        {"d": p.due("2027-03-18")},
    )
    (off,) = p.ok("scan", "--json").json_lines()
    assert (off["created"], off["off"]) == (0, 2)
    assert "4" not in {r["occurrence"] for r in p.reminders()}
    # Switched back on: the next scan creates them.
    choose(p, "1", {("refill-due", "*"): True})
    (on,) = p.ok("scan", "--json", now=NOW).json_lines()
    assert (on["created"], on["off"]) == (2, 0)
    assert {r["offset"] for r in p.reminders() if r["occurrence"] == "4"} == {"-3d", "0d"}
