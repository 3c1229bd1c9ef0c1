"""Database errors, translated in one place.

SQLAlchemy wraps a driver's exception in a ``DBAPIError`` whose text also carries the statement
and its parameters (customers' data, pages long). The engine shows the first line of the driver's
own message instead, and names the database it came from: the business DB (rules' and checks'
queries, read-only) or the state DB (the engine's own tables).
"""

from __future__ import annotations

import sqlalchemy as sa

from .errors import RuntimeFailure, ServiceUnavailable, SourceError, StateError

BUSINESS_DB = "business DB"
STATE_DB = "state DB"


# What SQLite says when the progress handler of reminders.business_db stops a statement that ran
# past source.query_timeout (PostgreSQL and MySQL say it themselves).
_INTERRUPTED = "interrupted"
TIMED_OUT = "the query ran longer than source.query_timeout allows and was stopped"

# What the SQLite authorizer on business connections (reminders.business_db) makes SQLite say
# when it refuses a statement; VACUUM says the second.
_REFUSED = ("not authorized", "authorization denied")
NOT_AUTHORIZED = (
    "not allowed on the business DB, which is read-only: a query may only read "
    "(SELECT, WITH; no ATTACH, VACUUM, PRAGMA settings or writes)"
)


def message(exc: BaseException) -> str:
    """The first line of the database's own message: the ``orig`` of SQLAlchemy's
    ``DBAPIError`` (or other ``StatementError``), else the exception's text ("" when none).
    SQLite's bare refusal by the business DB's authorizer is explained."""
    cause = exc.orig if isinstance(exc, sa.exc.StatementError) and exc.orig is not None else exc
    args = cause.args
    # MySQL's drivers raise (error code, message): the message is what the database said.
    said = args[1] if len(args) == 2 and isinstance(args[0], int) else cause
    lines = str(said).strip().splitlines()
    first = lines[0] if lines else ""
    if first in _REFUSED:
        return f"not authorized: {NOT_AUTHORIZED}"
    if first == _INTERRUPTED:
        return f"interrupted: {TIMED_OUT}"
    return first


def interrupted(exc: BaseException) -> bool:
    """Whether SQLite stopped the statement because it ran past its time limit (the progress
    handler of :func:`reminders.business_db.create_engine`)."""
    cause = exc.orig if isinstance(exc, sa.exc.StatementError) and exc.orig is not None else exc
    return str(cause).strip() == _INTERRUPTED


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` says the database did not answer (refused, dropped or unopenable), as
    opposed to refusing one statement."""
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    text = message(exc).lower()
    return isinstance(exc, sa.exc.OperationalError) and (
        "connect" in text or "unable to open database file" in text
    )


def error(exc: sa.exc.DBAPIError, database: str, what: str | None = None) -> RuntimeFailure:
    """``exc`` in the engine's error tree: :class:`ServiceUnavailable` when ``database``
    (:data:`BUSINESS_DB` or :data:`STATE_DB`) did not answer, else :class:`SourceError` (the
    business DB) or :class:`StateError` (the state DB). ``what`` names the query ("rule
    refill-due") and starts the message."""
    where = f"{what}: " if what else ""
    if unreachable(exc):
        return ServiceUnavailable(f"{where}{database} unreachable: {message(exc)}")
    if database == STATE_DB:
        return StateError(f"{where}{database}: {message(exc)}")
    return SourceError(f"{where}the query failed: {message(exc)}")
