"""``reminders validate`` checks what the README says it checks: each query prepared against the
business DB (no row read), the columns the rule and its templates use, recurrences and secrets."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tests import services
from tests.rules_fixtures import Project, config_yaml, lite, project

__all__ = ["lite", "project"]


# Lines of REFILLS: query is line 4, its SELECT list lines 5-6, occurrence 10, due 11.
def _no_table(p: Project) -> str:
    """What the business DB says of the misspelt table ``prescriptionz``."""
    database = p.business_url.rsplit("/", 1)[-1]
    return {
        "sqlite": "no such table: prescriptionz",
        "postgresql": 'relation "prescriptionz" does not exist',
        "mariadb": f"Table '{database}.prescriptionz' doesn't exist",
    }[p.backend]


def _rules(p: Project, old: str, new: str, *, file: str = "rules/refills.yaml") -> None:
    text = p.read(file)
    assert old in text, old
    p.write(file, text.replace(old, new))


def _errors(p: Project, *args: str) -> list[str]:
    result = p.run("validate", *args)
    assert result.code == 2, result
    assert result.out == ""
    return result.err.splitlines()


def test_a_misspelt_table_is_an_error_at_the_rules_query(project: Project) -> None:
    _rules(project, "FROM prescriptions rx", "FROM prescriptionz rx")
    assert _errors(project) == [
        "rules/refills.yaml:4: rule refill-due: query: the query failed: " + _no_table(project)
    ]


def test_a_misspelt_column_and_a_syntax_error_are_errors_at_the_query(project: Project) -> None:
    _rules(project, "rx.drug_name,", "rx.drug_nam,")
    (line,) = _errors(project)
    assert line.startswith("rules/refills.yaml:4: rule refill-due: query: the query failed: ")
    assert "drug_nam" in line
    _rules(project, "rx.drug_nam,", "rx.drug_name,,")
    (line,) = _errors(project)
    assert line.startswith("rules/refills.yaml:4: rule refill-due: query: the query failed: ")
    assert ("error in your SQL syntax" if project.backend == "mariadb" else "syntax error") in line


def test_the_due_and_occurrence_columns_must_be_returned(project: Project) -> None:
    _rules(project, "SELECT rx.id AS rx_id, rx.drug_name, rx.runs_out_on,", "SELECT rx.id, ")
    _rules(project, "p.id AS customer_id", "p.id AS customer_id, rx.drug_name")
    returned = "id, customer_id, drug_name, first_name, phone, email, timezone"
    # (and the templates, which use runs_out_on too: each said at its own line)
    assert _errors(project)[:2] == [
        "rules/refills.yaml:11: rule refill-due: due: the query returns no column runs_out_on "
        f"(the due date; it returns: {returned})",
        "rules/refills.yaml:10: rule refill-due: occurrence: the query returns no column rx_id "
        f"(used by the occurrence key; it returns: {returned})",
    ]


def test_a_check_query_is_prepared_with_the_rules_columns(project: Project) -> None:
    _rules(
        project,
        "    channels:",
        "    check: SELECT 1 FROM prescriptions WHERE id = :rx_id AND runs_out_on = :runs_out_on\n"
        "    channels:",
    )
    project.ok("validate")
    _rules(project, "SELECT 1 FROM prescriptions WHERE", "SELECT 1 FROM prescriptionz WHERE")
    assert _errors(project) == [
        "rules/refills.yaml:14: rule refill-due: check: the query failed: " + _no_table(project)
    ]
    _rules(project, "FROM prescriptionz WHERE id = :rx_id", "FROM prescriptions WHERE id = :rx")
    (line,) = _errors(project)
    assert line.startswith(
        "rules/refills.yaml:14: rule refill-due: check: :rx is not a column of the rule's query "
    )


CHECK = """\
checks:
  - name: owned
    query: |
      SELECT rx.id AS rx_id, rx.drug_name FROM prescriptions rx
      WHERE rx.patient_id = :customer_id AND rx.runs_out_on >= :since
    params: {customer_id: int}
    window: 30d
    message: owned
"""


def test_a_checks_query_is_prepared_with_typed_params(project: Project) -> None:
    project.write("rules/checks.yaml", CHECK)
    project.write("templates/owned.check.j2", "You have {{ drug_name }} ({{ params }}).\n")
    project.ok("validate")
    project.write("rules/checks.yaml", CHECK.replace("rx.patient_id", "rx.patient"))
    (line,) = _errors(project)
    assert line.startswith("rules/checks.yaml:3: check owned: query: the query failed: ")
    assert "patient" in line


def test_a_check_template_name_the_query_does_not_return_is_an_error(lite: Project) -> None:
    lite.write("rules/checks.yaml", CHECK)
    lite.write("templates/owned.check.j2", "You have\n{{ drug }}.\n")
    assert _errors(lite) == [
        "templates/owned.check.j2:2: drug is not a column of check owned's query "
        "(rules/checks.yaml:3), nor one of its params or the engine's names "
        "(it returns: rx_id, drug_name)"
    ]


def test_a_template_name_the_query_does_not_return_is_an_error_at_its_line(
    project: Project,
) -> None:
    project.write(
        "templates/refill-due.sms.j2",
        "Hi {{ customer.first_name }}, {{ reminder.due }} {{ now }}\n"
        "{% set n = 2 %}{% for x in range(n) %}{{ loop.index }}{{ x }}{% endfor %}\n"
        "your {{ drug }} runs out on {{ runs_out_on | date }}.\n",
    )
    project.write(
        "templates/refill-due.email.j2",
        "{% block subject %}{{ drug_name }}{% endblock %}\n"
        "{% block text %}{% include 'footer.j2' %}{% endblock %}\n",
    )
    project.write("templates/footer.j2", "{{ unsubscribe_url }}\n\n{{ footer_text }}\n")
    errors = _errors(project)
    tail = (
        "(rules/refills.yaml:4) nor a name the engine provides (it returns: customer_id, "
        "drug_name, email, first_name, phone, runs_out_on, rx_id, timezone; the engine adds: "
        "customer, default_locale, default_timezone, now, preferences_url, reminder, "
        "template_locale, unsubscribe_url)"
    )
    assert errors == [
        f"templates/refill-due.sms.j2:3: drug is not a column of rule refill-due's query {tail}",
        f"templates/footer.j2:3: footer_text is not a column of rule refill-due's query {tail}",
    ]


def test_an_unreachable_business_db_is_a_runtime_failure_unless_offline(lite: Project) -> None:
    port = services.free_port()
    lite.write_config(
        lite.read("config.yaml").replace(
            lite.source_config_url, f"postgresql://postgres@127.0.0.1:{port}/shop"
        )
    )
    result = lite.run("validate")
    assert result.code == 1, result
    assert result.err.startswith("error: rule refill-due: business DB unreachable: ")
    assert result.err.endswith(
        "(validate prepares every query against the business DB; validate --offline checks "
        "the rest without it)\n"
    )
    result = lite.ok("validate", "--offline")
    assert result.out == (
        "ok: 1 rule(s), 0 check(s), channels: sms, email; not checked against the business DB\n"
    )


def test_a_missing_sqlite_business_db_is_named(lite: Project) -> None:
    (lite.root / "business.db").unlink()
    result = lite.run("validate")
    assert result.code == 1, result
    assert result.err.startswith("error: source.url: no database file at ")
    assert not (lite.root / "business.db").exists()


def test_validate_reads_no_row(project: Project) -> None:
    # On PostgreSQL this cast fails on the first row read: the scan fails, validate does not.
    _rules(project, "WHERE rx.refills_left > 0", "WHERE CAST(rx.drug_name AS INTEGER) > 0")
    assert project.ok("validate").out == (
        "ok: 1 rule(s), 0 check(s), channels: sms, email; queries prepared\n"
    )
    if project.backend == "postgresql":
        project.ok("db", "upgrade")
        result = project.run("scan")
        assert result.code == 1, result
        assert "invalid input syntax for type integer" in result.err


# --- secrets the configuration makes necessary ----------------------------------------------------

SECRET_MISSING = (
    "config.yaml: web.public_url is set: environment variable REMINDERS_SECRET is not set: links "
    "in messages are signed with it"
)


def test_a_public_url_without_reminders_secret_stops_validate_and_the_worker(
    lite: Project, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REMINDERS_SECRET", raising=False)
    lite.write_config(config_yaml(settings="web:\n  public_url: https://r.example.com\n"))
    result = lite.run("validate", "--offline")
    assert result.code == 2, result
    assert result.err.replace(f"{lite.root}/", "").startswith(SECRET_MISSING), result.err
    lite.ok("db", "upgrade")
    # The worker refuses to start instead of failing every job it takes, one by one.
    result = lite.run("worker", "--burst")
    assert result.code == 2, result
    assert result.err.replace(f"{lite.root}/", "").startswith(SECRET_MISSING), result.err
    short = lite.run("validate", env={"REMINDERS_SECRET": "short"})
    assert short.code == 2
    assert "REMINDERS_SECRET is too short" in short.err
    lite.ok("validate", env={"REMINDERS_SECRET": "x" * 32})


def test_the_names_validate_allows_are_those_a_worker_puts_in_the_context(lite: Project) -> None:
    from reminders.app import App
    from reminders.compose import template_context
    from reminders.validate import RULE_CONTEXT

    app = App(lite.root / "config.yaml")
    rule = app.ruleset.rule("refill-due")
    now = datetime(2027, 3, 10, 12, tzinfo=UTC)
    context = template_context(app.config, rule, {}, {"rx_id": 1}, now, "sms", "+15005550006")
    assert set(context) - {"rx_id"} == RULE_CONTEXT
