"""The one channel-fallback rule shared by the worker and the Twilio status callback: the next
channel while one is left and the reminder is within grace, else the caller's final status;
conditional on the status the caller saw, and recorded. On a real SQLite state DB.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from reminders import fallback, state_db
from reminders.lifecycle import FAILED, PENDING, SENDING, SENT, UNDELIVERED
from reminders.models import event, reminder
from reminders.rules import Rule

NOW = datetime(2027, 3, 10, 15, tzinfo=UTC)
RULE = Rule.model_validate(
    {
        "name": "refill-due",
        "query": "SELECT 1",
        "occurrence": "{{ rx_id }}",
        "due": "runs_out_on",
        "offsets": ["0d"],
        "channels": ["sms", "email"],
        "grace": "1d",
    }
)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[sa.Engine]:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    yield engine
    state_db.dispose_engines(url)


def add(state: sa.Engine, status: str, index: int = 0, send_at: datetime = NOW) -> dict[str, Any]:
    row = {
        "rule": "refill-due",
        "occurrence": f"rx-{status}-{index}-{send_at.isoformat()}",
        "offset": "0d",
        "customer_id": "7",
        "planned_at": send_at,
        "send_at": send_at,
        "status": status,
        "channel": RULE.channels[index],
        "channel_index": index,
        "data": "{}",
        "row_hash": "x",
        "job_id": "job-1",
        "created_at": send_at,
        "updated_at": send_at,
    }
    with state.begin() as conn:
        rid = conn.execute(reminder.insert().values(**row)).inserted_primary_key[0]  # type: ignore[index]
    return {"id": rid, "channel_index": index, "send_at": send_at}


def read(state: sa.Engine, rid: int) -> Any:
    with state.connect() as conn:
        row = conn.execute(sa.select(reminder).where(reminder.c.id == rid)).one()
        events = conn.execute(
            sa.select(event.c.from_status, event.c.to_status, event.c.reason).where(
                event.c.reminder_id == rid
            )
        ).all()
    return row, [tuple(e) for e in events]


def test_next_channel_while_one_is_left_and_within_grace() -> None:
    assert fallback.next_channel(RULE, 0, NOW, NOW + timedelta(hours=3)) == (1, "email")
    assert fallback.next_channel(RULE, 0, NOW, NOW + timedelta(days=1)) == (1, "email")
    assert fallback.next_channel(RULE, 0, NOW, NOW + timedelta(days=1, seconds=1)) is None
    assert fallback.next_channel(RULE, 1, NOW, NOW) is None  # email was the last
    assert fallback.next_channel(None, 0, NOW, NOW) is None  # the rule is gone


def test_falls_back_to_pending_on_the_next_channel_due_at_once(state: sa.Engine) -> None:
    rem = add(state, SENDING)
    with state.begin() as conn:
        new = fallback.fall_back(
            conn,
            rem,
            RULE,
            "sms failed: invalid number",
            NOW,
            status=SENDING,
            otherwise=FAILED,
            values={"attempts": 1},
        )
    assert new == PENDING
    row, events = read(state, rem["id"])
    assert (row.status, row.channel, row.channel_index, row.attempts) == (PENDING, "email", 1, 1)
    assert (row.job_id, row.queued_at, row.send_at) == (None, None, NOW)  # grace not extended
    assert row.reason == "sms failed: invalid number; trying email"
    assert events == [(SENDING, PENDING, "sms failed: invalid number; trying email")]


def test_with_none_left_it_ends_in_the_callers_status(state: sa.Engine) -> None:
    last = add(state, SENT, index=1)
    late = add(state, SENT, send_at=NOW - timedelta(days=2))
    with state.begin() as conn:
        for rem in (last, late):
            new = fallback.fall_back(
                conn, rem, RULE, "undelivered (30005)", NOW, status=SENT, otherwise=UNDELIVERED
            )
            assert new == UNDELIVERED
    for rem in (last, late):
        row, events = read(state, rem["id"])
        assert (row.status, row.reason) == (UNDELIVERED, "undelivered (30005)")
        assert events == [(SENT, UNDELIVERED, "undelivered (30005)")]


def test_nothing_changes_when_another_process_moved_it_first(state: sa.Engine) -> None:
    rem = add(state, SENT)
    with state.begin() as conn:
        new = fallback.fall_back(conn, rem, RULE, "x", NOW, status=SENDING, otherwise=FAILED)
    assert new is None
    row, events = read(state, rem["id"])
    assert (row.status, row.channel_index, events) == (SENT, 0, [])
