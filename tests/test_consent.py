"""Consent: opt-outs and preferences on SQLite and PostgreSQL, and the send-time refusal."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from reminders import consent, models, state_db
from tests import services

NOW = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sa.Engine]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
        state_db.upgrade(url)
        yield state_db.engine_for(url)
        return
    with services.postgres_database() as url:
        state_db.upgrade(url)
        engine = state_db.engine_for(url)
        yield engine
        engine.dispose()


def test_opt_out_is_recorded_once_and_keeps_the_first_reason(state: sa.Engine) -> None:
    with state.begin() as conn:
        assert consent.opt_out(conn, "sms", "+15005550006", "stop", "replied STOP", NOW, "7")
        assert not consent.opt_out(conn, "sms", "+15005550006", "30005", "unknown", NOW)
    with state.connect() as conn:
        found = consent.opted_out(conn, "sms", "+15005550006")
        assert found is not None
        assert (found.source, found.reason, found.customer_id) == ("stop", "replied STOP", "7")
        assert conn.execute(sa.select(sa.func.count()).select_from(models.optout)).scalar() == 1


def test_email_addresses_match_whatever_their_case(state: sa.Engine) -> None:
    with state.begin() as conn:
        consent.opt_out(conn, "email", " Jane@Example.com", "unsubscribe", None, NOW)
    with state.connect() as conn:
        assert consent.is_opted_out(conn, "email", "jane@example.COM")
        assert not consent.is_opted_out(conn, "sms", "jane@example.com")


def test_opt_in_removes_the_opt_out_and_both_are_kept_in_the_history(state: sa.Engine) -> None:
    later = NOW.replace(hour=13)
    with state.begin() as conn:
        consent.opt_out(conn, "sms", "+15005550006", "stop", "replied STOP", NOW, "7")
        assert consent.opt_in(conn, "sms", "+15005550006", "start", "replied START", later, "7")
        assert not consent.opt_in(conn, "sms", "+15005550006", "start", "replied YES", later)
        consent.opt_out(conn, "email", "Jane@example.com", "unsubscribe", "one-click", NOW, "7")
        assert consent.opt_in(conn, "email", "jane@example.com", "preferences", None, later, "7")
    with state.connect() as conn:
        assert not consent.is_opted_out(conn, "sms", "+15005550006")
        assert not consent.is_opted_out(conn, "email", "jane@example.com")
        sms = consent.history(conn, "sms", "+15005550006")
        email = consent.history(conn, "email", "JANE@example.com")
    assert [(e["action"], e["source"], e["reason"], e["at"], e["customer_id"]) for e in sms] == [
        ("opt_out", "stop", "replied STOP", NOW, "7"),
        ("opt_in", "start", "replied START", later, "7"),
    ]
    assert [(e["action"], e["source"]) for e in email] == [
        ("opt_out", "unsubscribe"),
        ("opt_in", "preferences"),
    ]


def test_the_migration_starts_the_history_with_the_opt_outs_already_recorded(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    state_db.upgrade(url, "0002")
    engine = state_db.engine_for(url)
    with engine.begin() as conn:
        conn.execute(
            models.optout.insert().values(
                channel="sms", address="+15005550006", source="stop", created_at=NOW
            )
        )
    state_db.upgrade(url)
    with engine.connect() as conn:
        found = consent.history(conn, "sms", "+15005550006")
    assert [(e["action"], e["source"], e["at"]) for e in found] == [("opt_out", "stop", NOW)]


@pytest.mark.parametrize(
    ("choices", "rule", "channel", "expected"),
    [
        ({}, "refill", "sms", True),
        ({("refill", "sms"): False}, "refill", "sms", False),
        ({("refill", "sms"): False}, "refill", "email", True),
        ({("refill", "sms"): False}, "other", "sms", True),
        ({("*", "sms"): False}, "refill", "sms", False),
        ({("*", "sms"): False, ("refill", "sms"): True}, "refill", "sms", True),
        ({("*", "*"): False}, "refill", "email", False),
        ({("*", "*"): False, ("refill", "*"): True}, "refill", "email", True),
        ({("refill", "*"): False, ("*", "email"): True}, "refill", "email", False),
    ],
)
def test_most_specific_choice_wins(
    choices: dict[tuple[str, str], bool], rule: str, channel: str, expected: bool
) -> None:
    assert consent.resolve(choices, rule, channel) is expected


def test_preferences_are_per_customer_and_only_changes_are_written(state: sa.Engine) -> None:
    with state.begin() as conn:
        changed = consent.set_preferences(conn, "7", {("refill", "sms"): False}, NOW)
        assert changed == 1
        assert consent.set_preferences(conn, "7", {("refill", "sms"): False}, NOW) == 0
    with state.connect() as conn:
        assert not consent.enabled(conn, "7", "refill", "sms")
        assert consent.enabled(conn, "8", "refill", "sms")
        assert consent.enabled(conn, "7", "refill", "email")
    with state.begin() as conn:
        assert consent.set_preferences(conn, "7", {("refill", "sms"): True}, NOW) == 1
    with state.connect() as conn:
        assert consent.enabled(conn, "7", "refill", "sms")


def test_turned_off_lists_customers_with_every_channel_off(state: sa.Engine) -> None:
    with state.begin() as conn:
        consent.set_preferences(conn, "1", {("refill", "sms"): False}, NOW)
        consent.set_preferences(
            conn, "2", {("refill", "sms"): False, ("refill", "email"): False}, NOW
        )
        consent.set_preferences(conn, "3", {("*", "*"): False}, NOW)
        consent.set_preferences(conn, "4", {("*", "*"): False, ("refill", "email"): True}, NOW)
    with state.connect() as conn:
        assert consent.turned_off(conn, "refill", ["sms", "email"]) == {"2", "3"}
        assert consent.turned_off(conn, "refill", ["sms"]) == {"1", "2", "3", "4"}


def test_refusal_names_the_reason(state: sa.Engine) -> None:
    with state.begin() as conn:
        consent.opt_out(conn, "sms", "+15005550006", "30005", "unknown destination", NOW)
        consent.set_preferences(conn, "7", {("refill", "email"): False}, NOW)
    with state.connect() as conn:
        assert consent.refusal(conn, "7", "refill", "sms", "+15005550006") == (
            "opted out of sms (30005)"
        )
        assert consent.refusal(conn, "7", "refill", "sms", "+15005550001") is None
        assert consent.refusal(conn, "7", "refill", "email", "a@example.com") == (
            "refill by email turned off by the customer"
        )
        assert consent.refusal(conn, "8", "refill", "email", "a@example.com") is None
        view = consent.View.load(
            conn, ["7", "8"], [("sms", "+15005550006"), ("email", "A@example.com")]
        )
        assert view.refusal("8", "refill", "sms", "+15005550006") == "opted out of sms (30005)"
        assert view.refusal("8", "refill", "email", "a@example.com") is None
        assert view.refusal("7", "refill", "email", "a@example.com") is not None
