"""``reminders preview``: real rows rendered as a worker would, nothing sent or stored; on each
business DB the engine reads (SQLite, PostgreSQL, MariaDB)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.channel_fixtures import SmtpServer
from tests.delivery_fixtures import RULES, SEND_AT, Shop, rules_with_check
from tests.rules_fixtures import BUSINESS_BACKENDS, made_at
from tests.twilio_stub import TwilioStub


@pytest.fixture(params=BUSINESS_BACKENDS)
def shop(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    delivery_redis: str,
    stub: TwilioStub,
    mailbox_server: SmtpServer,
) -> Iterator[Shop]:
    """The delivery tests' shop, its business DB on each backend."""

    def make(root: Path, *database: str) -> Shop:
        return Shop(root, delivery_redis, stub, mailbox_server, *database)

    with made_at(tmp_path, request.param, make) as project:
        yield project.configure()


def test_preview_renders_each_channel_for_the_first_rows_and_sends_nothing(shop: Shop) -> None:
    shop.patients(5)
    result = shop.ok("preview", "refill-due", "--limit", "2", now=SEND_AT)
    out = result.out
    assert out.count("== refill-due ") == 4  # 2 rows x (sms, email)
    assert "== refill-due 1 (customer 1) sms, offset 0d at 2027-03-10T15:00:00Z" in out
    assert "Hi P1, your Lisinopril runs out on Mar 10, 2027." in out
    assert "segments: 1 (GSM-7, 48 units)" in out
    assert "subject: Your Lisinopril runs out soon" in out
    assert "to: +1******0001" in out and "to: p*@example.com" in out  # masked
    assert "+12125550001" not in out and "p1@example.com" not in out
    assert shop.stub.received == {}
    assert shop.smtp.mailbox.messages == []
    assert not (shop.root / "reminders.db").exists()  # the state DB is not even needed


def test_preview_one_occurrence_as_json(shop: Shop) -> None:
    shop.patients(5)
    result = shop.ok("preview", "refill-due", "--occurrence", "4", "--json", now=SEND_AT)
    items = result.json_lines()
    assert [(i["occurrence"], i["channel"]) for i in items] == [("4", "sms"), ("4", "email")]
    assert items[0]["text"] == "Hi P4, your Lisinopril runs out on Mar 10, 2027."
    assert items[0]["segments"] == 1 and items[0]["encoding"] == "GSM-7"
    assert items[1]["subject"] == "Your Lisinopril runs out soon"


def test_preview_of_an_unknown_occurrence_or_rule_is_a_usage_error(shop: Shop) -> None:
    shop.patients(2)
    missing = shop.run("preview", "refill-due", "--occurrence", "99", now=SEND_AT)
    assert missing.code == 2
    no_rule = shop.run("preview", "no-such-rule", now=SEND_AT)
    assert no_rule.code == 2
    assert 'no rule named "no-such-rule"' in no_rule.err


def test_preview_warns_of_ucs2(shop: Shop) -> None:
    text = "Hi {{ first_name }} \u2019 " + "x" * 60 + "\n"  # a curly quote forces UCS-2
    shop.configure(sms_template=text)
    shop.patients(1)
    out = shop.ok("preview", "refill-due", now=SEND_AT).out
    assert "segments: 1 (UCS-2, 68 units)" in out
    assert "warning: \u2019 (U+2019 RIGHT SINGLE QUOTATION MARK) forces UCS-2" in out


def test_preview_of_too_many_segments_is_the_error_a_worker_would_fail_with(shop: Shop) -> None:
    long_text = "Hi {{ first_name }} \u2019 " + "x" * 150 + "\n"
    shop.configure(sms_template=long_text, sms_extra="    max_segments: 2\n")
    shop.patients(1)
    result = shop.run("preview", "refill-due", now=SEND_AT)
    assert result.code == 2
    assert (
        "templates/refill-due.sms.j2: 3 segments (158 UCS-2 units), more than "
        "channels.sms.max_segments = 2: not sent"
    ) in result.out


def test_preview_names_a_template_error_and_exits_2(shop: Shop) -> None:
    shop.configure(sms_template="Hello\n{{ first_name }} {{ nope }}\n")
    shop.patients(1)
    result = shop.run("preview", "refill-due", now=SEND_AT)
    assert result.code == 2
    assert "templates/refill-due.sms.j2:2" in result.out
    assert "nope" in result.out


def test_preview_shows_an_unusable_address_and_the_check_answer(shop: Shop) -> None:
    checked = rules_with_check(
        "SELECT 1 FROM patients WHERE id = :customer_id AND first_name <> 'Gone'"
    )
    shop.configure(rules=checked)
    shop.patients(1, phone="not a number")
    out = shop.ok("preview", "refill-due", now=SEND_AT).out
    assert "not sendable: phone number" in out
    assert "check: returns a row: would send" in out
    shop.sql("UPDATE patients SET first_name = 'Gone'")
    out = shop.ok("preview", "refill-due", now=SEND_AT).out
    assert "check: no row: would be canceled" in out


def test_preview_exits_1_when_the_check_query_fails_and_2_when_it_cannot_be_asked(
    shop: Shop,
) -> None:
    shop.configure(rules=rules_with_check("SELECT 1 FROM patientz WHERE id = :customer_id"))
    shop.patients(1)
    result = shop.run("preview", "refill-due", now=SEND_AT)
    assert result.code == 1, result
    assert "check: failed: rule refill-due: " in result.out
    assert result.err.startswith("error: rule refill-due: check query failed: ")
    assert "patientz" in result.err
    shop.configure(rules=rules_with_check("SELECT 1 FROM patients WHERE id = :patient"))
    result = shop.run("preview", "refill-due", now=SEND_AT)
    assert result.code == 2, result
    assert ":patient, which the rule's query does not return" in result.out


def test_preview_shows_the_label_a_customer_sees_and_names_a_broken_one(shop: Shop) -> None:
    labeled = RULES.replace(
        "    template: refill-due\n",
        "    template: refill-due\n"
        "    label: \"Refill of {{ drug_name }}, runs out {{ runs_out_on | date('MMM d') }}\"\n",
    )
    shop.configure(rules=labeled)
    shop.patients(1)
    result = shop.ok("preview", "refill-due", now=SEND_AT)
    assert "label: Refill of Lisinopril, runs out Mar 10" in result.out
    shop.configure(rules=labeled.replace("drug_name }}", "drug }}"))
    broken = shop.run("preview", "refill-due", now=SEND_AT)
    assert broken.code == 2
    line = labeled.splitlines().index("  - name: refill-due") + 1
    assert f"rules/refills.yaml:{line}: rule refill-due: label: 'drug' is undefined" in broken.out
