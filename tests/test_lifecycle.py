"""The lifecycle: the allowed changes as data, and ``move``/``move_each`` on SQLite and PostgreSQL.

Every status change of the engine goes through these two functions, so what they guarantee holds
everywhere: a change not in the table is refused before the database is touched, a change is
conditional on the status the caller saw, and each reminder changed leaves one event.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from reminders import lifecycle, models, state_db
from reminders.lifecycle import (
    CANCELED,
    DELIVERED,
    FAILED,
    OPEN,
    PENDING,
    QUEUED,
    SENDING,
    SENT,
    UNDELIVERED,
    UNKNOWN,
    Status,
    TransitionNotAllowed,
    move,
    move_each,
    param,
)
from tests.test_state_db import _reminder

T0 = datetime(2027, 3, 10, 12, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)

# Every pair of statuses, and whether the engine may make that change.
ALLOWED = {
    (PENDING, QUEUED), (PENDING, PENDING), (PENDING, CANCELED), (PENDING, SENDING),
    (QUEUED, SENDING), (QUEUED, QUEUED), (QUEUED, PENDING), (QUEUED, CANCELED), (QUEUED, FAILED),
    (SENDING, SENT), (SENDING, PENDING), (SENDING, FAILED), (SENDING, UNKNOWN),
    (UNKNOWN, SENT), (UNKNOWN, PENDING), (UNKNOWN, FAILED), (UNKNOWN, CANCELED),
    (SENT, DELIVERED), (SENT, UNDELIVERED), (SENT, PENDING),
    (FAILED, PENDING), (CANCELED, PENDING),
}  # fmt: skip


@pytest.mark.parametrize("source", list(Status))
@pytest.mark.parametrize("target", list(Status))
def test_the_table_allows_exactly_the_engines_changes(source: Status, target: Status) -> None:
    assert lifecycle.allowed(source, target) is ((source, target) in ALLOWED)


def test_statuses_are_stored_as_their_plain_names() -> None:
    assert [s.value for s in Status] == [
        "pending", "queued", "sending", "sent", "unknown", "delivered", "undelivered", "canceled",
        "failed",
    ]  # fmt: skip
    assert Status("sent") is SENT and SENT == "sent"
    assert OPEN | lifecycle.FINAL | {SENDING, UNKNOWN} == set(Status)


def _add(state: sa.Engine, *statuses: str) -> list[int]:
    rows = [_reminder(str(i), status=s) for i, s in enumerate(statuses)]
    with state.begin() as conn:
        state_db.insert_ignoring_conflicts(conn, models.reminder, rows)
        return list(conn.execute(sa.select(models.reminder.c.id).order_by("id")).scalars())


def _rows(state: sa.Engine) -> dict[int, sa.RowMapping]:
    with state.connect() as conn:
        return {r["id"]: r for r in conn.execute(sa.select(models.reminder)).mappings()}


def _events(state: sa.Engine) -> list[tuple[int, str | None, str, str | None, datetime]]:
    e = models.event
    with state.connect() as conn:
        query = sa.select(e.c.reminder_id, e.c.from_status, e.c.to_status, e.c.reason, e.c.at)
        return [tuple(r) for r in conn.execute(query.order_by(e.c.id))]  # type: ignore[misc]


def test_move_changes_only_reminders_still_in_the_status_seen_and_records_each(
    state: sa.Engine,
) -> None:
    a, b, c = _add(state, PENDING, PENDING, SENT)
    with state.begin() as conn:
        moved = move(
            conn, [c, b, a], source=PENDING, target=CANCELED, now=T1, reason="canceled: gone"
        )
    assert moved == [a, b]
    rows = _rows(state)
    assert [rows[i]["status"] for i in (a, b, c)] == ["canceled", "canceled", "sent"]
    assert rows[a]["reason"] == "canceled: gone" and rows[a]["updated_at"] == T1
    assert rows[c]["updated_at"] == T0  # another status: untouched, no event
    assert _events(state) == [
        (a, "pending", "canceled", "canceled: gone", T1),
        (b, "pending", "canceled", "canceled: gone", T1),
    ]


def test_move_from_several_statuses_names_the_one_each_left(state: sa.Engine) -> None:
    a, b, c = _add(state, PENDING, QUEUED, SENDING)
    with state.begin() as conn:
        moved = move(conn, [a, b, c], source=OPEN, target=CANCELED, now=T1, reason="gone")
    assert moved == [a, b]
    assert {(e[0], e[1]) for e in _events(state)} == {(a, "pending"), (b, "queued")}


def test_move_writes_values_honours_where_and_can_keep_the_reason(state: sa.Engine) -> None:
    a, b = _add(state, QUEUED, QUEUED)
    with state.begin() as conn:
        conn.execute(models.reminder.update().values(job_id="job-1", reason="earlier"))
        conn.execute(models.reminder.update().where(models.reminder.c.id == b).values(job_id="x"))
        moved = move(
            conn,
            [a, b],
            source=QUEUED,
            target=PENDING,
            now=T1,
            reason="released",
            keep_reason=True,
            values={"job_id": None, "send_at": T1},
            where=[models.reminder.c.job_id == "job-1"],
        )
    assert moved == [a]
    rows = _rows(state)
    assert (rows[a]["status"], rows[a]["job_id"], rows[a]["send_at"]) == ("pending", None, T1)
    assert rows[a]["reason"] == "earlier"  # kept on the row; the event says why
    assert (rows[b]["status"], rows[b]["job_id"]) == ("queued", "x")
    assert _events(state) == [(a, "queued", "pending", "released", T1)]


def test_a_change_not_allowed_is_an_error_and_touches_nothing(state: sa.Engine) -> None:
    (a,) = _add(state, CANCELED)
    with state.begin() as conn, pytest.raises(TransitionNotAllowed, match="canceled to sent"):
        move(conn, [a], source=CANCELED, target=SENT, now=T1)
    with state.begin() as conn, pytest.raises(TransitionNotAllowed, match="to pending"):
        move(conn, [a], source=[CANCELED, DELIVERED], target=PENDING, now=T1)
    assert _rows(state)[a]["status"] == "canceled" and _events(state) == []


def test_move_of_nothing_does_nothing(state: sa.Engine) -> None:
    with state.begin() as conn:
        assert move(conn, [], source=PENDING, target=QUEUED, now=T1) == []
    assert _events(state) == []


def test_move_each_gives_each_reminder_its_own_values(state: sa.Engine) -> None:
    a, b, c = _add(state, PENDING, QUEUED, SENT)
    later = T0 + timedelta(days=1)
    rows = [
        {"id": a, "source": PENDING, "reason": "moved", "planned": later},
        {"id": b, "source": QUEUED, "reason": "moved", "planned": later + timedelta(hours=1)},
    ]
    with state.begin() as conn:
        given = move_each(
            conn,
            rows,
            source=OPEN,
            target=PENDING,
            now=T1,
            values={"send_at": param("planned"), "planned_at": param("planned"), "job_id": None},
        )
    assert given == 2
    got = _rows(state)
    assert (got[a]["send_at"], got[b]["send_at"]) == (later, later + timedelta(hours=1))
    assert got[b]["status"] == "pending" and got[c]["status"] == "sent"
    assert _events(state) == [
        (a, "pending", "pending", "moved", T1),
        (b, "queued", "pending", "moved", T1),
    ]


def test_move_each_refuses_a_row_outside_its_sources(state: sa.Engine) -> None:
    (a,) = _add(state, SENT)
    with state.begin() as conn, pytest.raises(TransitionNotAllowed):
        move_each(conn, [{"id": a, "source": SENT}], source=SENDING, target=SENT, now=T1)
    with state.begin() as conn, pytest.raises(TransitionNotAllowed):
        move_each(conn, [{"id": a, "source": SENT}], source=SENT, target=QUEUED, now=T1)
    assert _events(state) == []
