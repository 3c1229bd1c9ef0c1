"""Every write path stores UTC times in one text format on SQLite, so stored times compare as
equal and sort as they should whichever path wrote them (scan's bulk insert or SQLAlchemy)."""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa

from reminders import lifecycle, models, state_db


def test_bulk_insert_and_core_insert_store_the_same_text(tmp_path):
    url = f"sqlite:///{tmp_path / 'state.db'}"
    state_db.upgrade(url)
    engine = state_db.engine_for(url)
    at = datetime(2027, 3, 14, 14, 0, tzinfo=UTC)
    row = {
        "rule": "r",
        "offset": "0d",
        "customer_id": "1",
        "planned_at": at,
        "send_at": at,
        "status": lifecycle.PENDING,
        "data": "{}",
        "row_hash": "x",
        "created_at": at,
        "updated_at": at,
    }
    with engine.begin() as conn:
        state_db.insert_ignoring_conflicts(conn, models.reminder, [dict(row, occurrence="bulk")])
        conn.execute(models.reminder.insert().values(**dict(row, occurrence="core")))
    with engine.connect() as conn:
        raw = dict(
            conn.execute(sa.text("SELECT occurrence, send_at FROM reminders_reminder")).all()
        )
        same = conn.execute(
            sa.select(sa.func.count()).where(models.reminder.c.send_at == at)
        ).scalar_one()
    assert raw["bulk"] == raw["core"]
    assert same == 2
