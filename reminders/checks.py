"""Checks: synchronous questions the business's checkout asks its own database.

A check is a rule file's ``checks:`` entry: a read-only, parameterised query. A row back means
"duplicate" and the first row is the match; no row means "not a duplicate". What counts as a
duplicate (any earlier purchase, within a window, only some product types) is written in the query
itself; ``window:`` binds ``:since`` = now - window.

The same logic answers three ways: ``POST /v1/checks/<name>`` (:mod:`reminders.web.checks`),
:func:`run_check` for businesses that embed the engine, and ``reminders check NAME key=value``.

The query runs with the check's ``timeout``: PostgreSQL cancels it (``statement_timeout``, set
per session on the checks' own connections), so do MariaDB (``max_statement_time``) and MySQL
(``MAX_EXECUTION_TIME``), SQLite aborts it from a progress handler (and waits no longer than the
timeout for a lock). Past the timeout the answer is ``unknown``, never an error
page, and the connection goes back to the pool healthy.
"""

from __future__ import annotations

import base64
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from datetime import time as time_of_day
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Literal
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from . import business_db, clock, dberrors, mysql
from .engines import EngineCache
from .errors import (
    InputError,
    Problem,
    RuntimeFailure,
    ServiceUnavailable,
    TemplateError,
)

if TYPE_CHECKING:
    from .app import App
    from .config import Config
    from .rules import CheckRule

log = logging.getLogger(__name__)

TYPE_NAMES = {
    "int": "an integer",
    "str": "a string",
    "float": "a number",
    "bool": "true or false",
    "date": "a date (YYYY-MM-DD)",
    "datetime": "an ISO 8601 date and time (no zone = UTC)",
}
# SQLite calls the progress handler every this many virtual-machine instructions (a few
# microseconds); an indexed lookup finishes before the first call.
_PROGRESS_EVERY = 1000
# A query that failed on a dropped connection within this share of its timeout is retried.
_RETRY_WITHIN = 0.1
# PostgreSQL: query_canceled (statement_timeout) and lock_not_available (lock_timeout).
_PG_TIMEOUT_STATES = {"57014", "55P03"}


class CheckParamError(InputError):
    """The parameters of a check are missing, of the wrong type, or not allowed.

    ``errors`` maps each offending parameter to what is wrong; ``allowed`` maps every parameter
    the check takes to its type. The web answers 422, the command line exits 2.
    """

    def __init__(self, check: CheckRule, errors: dict[str, str]) -> None:
        self.check_name = check.name
        self.errors = errors
        self.allowed = dict(check.params)
        super().__init__(
            [Problem(f"check {check.name}: {param}: {what}") for param, what in errors.items()]
        )


# --- parameters ----------------------------------------------------------------------------------


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, int | float):
        shown = repr(value)
        return f"the number {shown if len(shown) <= 40 else shown[:37] + '...'}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f'the string "{shown}"'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return f"a {type(value).__name__}"


# What every database's integer column and parameter binding takes (PostgreSQL's bigint,
# SQLite's INTEGER): a larger one would fail in the driver, after the check was asked.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1


class _OutOfRange(ValueError):
    """A value of the right type beyond what the type allows; its text says what is allowed."""


_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _coerce(kind: str, value: Any, text: bool) -> Any:
    """``value`` as ``kind``, or ValueError. ``text`` values come from a command line."""
    if kind == "str":
        if isinstance(value, str):
            return value
    elif kind == "int":
        number = None
        if text and isinstance(value, str):
            number = int(value.strip(), 10)
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        if number is not None:
            if not _INT_MIN <= number <= _INT_MAX:
                raise _OutOfRange(f"{TYPE_NAMES['int']} from {_INT_MIN} to {_INT_MAX} (64 bits)")
            return number
    elif kind == "float":
        if text and isinstance(value, str):
            return float(value.strip())
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif kind == "bool":
        if text and isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        if isinstance(value, bool):
            return value
    elif kind == "date":
        if isinstance(value, str):
            return date.fromisoformat(value.strip())
    elif kind == "datetime" and isinstance(value, str) and value.strip():
        return clock.parse_instant(value)
    raise ValueError


def coerce_params(check: CheckRule, given: Mapping[str, Any], *, text: bool = False) -> dict:
    """The check's parameters, typed. Raises :class:`CheckParamError` naming every bad one.

    From JSON (``text=False``) types are strict: ``"7"`` is not an int. From the command line
    (``text=True``) every value is text and is parsed as its declared type.
    """
    errors: dict[str, str] = {}
    typed: dict[str, Any] = {}
    for param, kind in check.params.items():
        if param not in given:
            errors[param] = f"missing: {TYPE_NAMES[kind]} is required"
            continue
        try:
            typed[param] = _coerce(kind, given[param], text)
        except _OutOfRange as exc:
            errors[param] = f"must be {exc}, got {_describe(given[param])}"
        except (ValueError, TypeError, OverflowError):
            errors[param] = f"must be {TYPE_NAMES[kind]}, got {_describe(given[param])}"
    allowed = ", ".join(check.params)
    for param in given:
        if param not in check.params:
            errors[str(param)] = f"not a parameter of this check (allowed: {allowed})"
    if errors:
        raise CheckParamError(check, errors)
    return typed


def parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    """``["customer_id=7", "sku=B01"]`` -> ``{"customer_id": "7", "sku": "B01"}``."""
    out: dict[str, str] = {}
    problems: list[Problem] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            problems.append(Problem(f'"{pair}" is not key=value (e.g. customer_id=7)'))
        elif key in out:
            problems.append(Problem(f"{key} is given twice"))
        else:
            out[key] = value
    if problems:
        raise InputError(problems)
    return out


# --- the answer ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """What a check says. ``status``: ``answered``, ``unknown`` (timed out) or ``error``."""

    check: str
    status: Literal["answered", "unknown", "error"]
    duplicate: bool | None = None
    match: dict[str, Any] | None = None
    message: str | None = None
    message_error: str | None = None
    reason: str | None = None
    # error only: the business DB did not answer (True) or the query failed (False)
    unreachable: bool = False

    @property
    def answered(self) -> bool:
        return self.status == "answered"

    def as_dict(self) -> dict[str, Any]:
        """The JSON answer of the contract (web, command line and :func:`run_check` alike)."""
        if self.status == "answered":
            if not self.duplicate:
                return {"duplicate": False}
            out: dict[str, Any] = {
                "duplicate": True,
                "match": self.match,
                "message": self.message,
            }
            if self.message_error:
                out["message_error"] = self.message_error
            return out
        key = "reason" if self.status == "unknown" else "error"
        return {"duplicate": None, "status": self.status, key: self.reason}


def _plain(value: Any) -> Any:
    """A column value as JSON: dates and times in ISO 8601, decimals as exact strings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, datetime | date | time_of_day):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, UUID):
        return str(value)
    return str(value)


# --- engines and the query -----------------------------------------------------------------------

_engines = EngineCache()


def check_engine(url: str, timeout: timedelta) -> Engine:
    """The process' read-only engine for checks with ``timeout`` against the business DB."""
    return _engines.get(url, lambda: _create_engine(url, timeout), business_db.millis(timeout))


def _create_engine(url: str, timeout: timedelta) -> Engine:
    # Built on business_db.create_engine, so a check is read-only exactly as a rule's query is. No
    # ping before each query (a round trip, a quarter of a check's CPU): _first_row retries once
    # on a connection the server dropped, and SQLAlchemy then renews every older pooled one.
    engine = business_db.create_engine(url, timeout, pre_ping=False, sqlite_every=_PROGRESS_EVERY)
    if engine.dialect.name == "sqlite":
        millis = business_db.millis(timeout)

        @sa.event.listens_for(engine, "connect")
        def _busy(dbapi_conn: Any, _record: Any) -> None:
            # Wait for a writer's lock no longer than the check may take.
            dbapi_conn.execute(f"PRAGMA busy_timeout = {millis}")

        return engine
    if engine.dialect.name == "postgresql":
        # One statement, no BEGIN/ROLLBACK round trips: each query is its own read-only
        # transaction (default_transaction_read_only), and a cancelled one leaves nothing open.
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine


def dispose_engines(matching: str | None = None) -> None:
    """Close and forget the check engines whose URL contains ``matching`` (all when None)."""
    _engines.dispose(matching)


def bind(value: Any, dialect: str) -> Any:
    """A typed parameter as the database compares it.

    SQLite has no date type: dates bind as ``YYYY-MM-DD`` and datetimes as UTC
    ``YYYY-MM-DD HH:MM:SS`` (what SQLite's ``datetime()`` returns), so compare with
    ``datetime(o.placed_at) >= :since`` when the column holds other ISO 8601 forms.
    """
    if dialect != "sqlite":
        return value
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.isoformat(sep=" ", timespec="seconds")
    if isinstance(value, date):
        return value.isoformat()
    return value


class _Timeout(Exception):
    pass


def _first_row(engine: Engine, check: CheckRule, bound: dict[str, Any]) -> dict[str, Any] | None:
    """The query's first row, or None. Raises _Timeout past the check's timeout.

    A connection the server dropped (a restart, an idle timeout) fails at once; the query is
    then retried once on a new connection. A failure that took longer is not retried: the
    checkout's wait stays within the check's timeout.
    """
    started = time.monotonic()
    try:
        return _query(engine, check, bound)
    except sa.exc.DBAPIError as exc:
        quick = time.monotonic() - started < check.timeout.total_seconds() * _RETRY_WITHIN
        if not (exc.connection_invalidated and quick):
            raise _failure(exc, check) from None
    try:
        return _query(engine, check, bound)
    except sa.exc.DBAPIError as exc:
        raise _failure(exc, check) from None


def _query(engine: Engine, check: CheckRule, bound: dict[str, Any]) -> dict[str, Any] | None:
    try:
        with engine.connect() as conn:
            row = conn.execute(business_db.query(check.query), bound).mappings().first()
            return dict(row) if row is not None else None
    except sa.exc.TimeoutError:  # no pooled connection came free in time
        raise _Timeout("no connection to the business DB came free in time") from None
    except sa.exc.DBAPIError as exc:
        if dberrors.interrupted(exc):  # past the timeout on SQLite: never worth a retry
            raise _failure(exc, check) from None
        raise


def _failure(exc: sa.exc.DBAPIError, check: CheckRule) -> Exception:
    """What a failed check query means: a timeout, an unreachable DB, or a broken query."""
    state = getattr(exc.orig, "sqlstate", None)
    code = exc.orig.args[0] if exc.orig is not None and exc.orig.args else None  # MySQL's int
    timed_out = dberrors.interrupted(exc) or state in _PG_TIMEOUT_STATES
    if timed_out or code in mysql.TIMEOUT_CODES:
        return _Timeout(f"the query took longer than {business_db.millis(check.timeout)} ms")
    if isinstance(exc.orig, sqlite3.Error) and "database is locked" in dberrors.message(exc):
        return _Timeout(f"the business DB stayed locked for {business_db.millis(check.timeout)} ms")
    return dberrors.error(exc, dberrors.BUSINESS_DB, f"check {check.name}")


# --- asking ---------------------------------------------------------------------------------------


def _message(app: App, check: CheckRule, params: dict, row: dict, now: datetime) -> str:
    assert check.message is not None
    config = app.config
    context: dict[str, Any] = {
        **params,
        "params": params,
        "match": row,
        "check": check.name,
        "now": now,
        "customer": {"locale": row.get("locale"), "timezone": row.get("timezone")},
        "default_timezone": config.timezone,
        "default_locale": "en_US",  # the renderer's own fall-back, named so it is parsed once
        **row,
    }
    return str(app.renderer.render_check(check.message, context))


def ask(app: App, name: str, given: Mapping[str, Any], *, text: bool = False) -> Answer:
    """Ask check ``name`` with parameters ``given`` (JSON values, or text from a command line).

    Raises :class:`RuleError` for an unknown check and :class:`CheckParamError` for bad
    parameters (both the caller's input); a timeout or a failing database is an :class:`Answer`
    with status ``unknown`` or ``error``, never an exception.
    """
    check = app.ruleset.check(name)
    params = coerce_params(check, given, text=text)
    now = clock.now()
    bound = {**business_db.time_params(check.query, now, app.config.tz()), **params}
    if check.window is not None:
        bound["since"] = now - check.window
    try:
        engine = check_engine(app.config.source_url, check.timeout)
        dialect = engine.dialect.name
        row = _first_row(engine, check, {k: bind(v, dialect) for k, v in bound.items()})
    except _Timeout as exc:
        log.warning("check %s: unknown: %s", name, exc)
        return Answer(name, "unknown", reason=str(exc))
    except RuntimeFailure as exc:
        said = str(exc)
        log.error("%s", said if said.startswith(f"check {name}:") else f"check {name}: {said}")
        unreachable = isinstance(exc, ServiceUnavailable)
        return Answer(name, "error", reason=str(exc), unreachable=unreachable)
    if row is None:
        return Answer(name, "answered", duplicate=False)
    match = {key: _plain(value) for key, value in row.items()}
    message = message_error = None
    if check.message:
        try:
            message = _message(app, check, params, row, now)
        except TemplateError as exc:
            # The checkout needs the answer more than the text: answer, and say what broke.
            log.error("check %s: message: %s", name, exc)
            message_error = str(exc)
    return Answer(name, "answered", True, match, message, message_error)


# --- the Python function --------------------------------------------------------------------------

_apps: dict[Any, App] = {}
_apps_lock = threading.Lock()


def _app_for(target: App | Config | str | os.PathLike[str] | None) -> App:
    from .app import App
    from .config import Config, config_path

    if isinstance(target, App):
        return target
    path = None if isinstance(target, Config) else config_path(target).resolve()
    key: Any = id(target) if path is None else str(path)
    with _apps_lock:
        # A Config is keyed by identity and kept alive here (by its App), so its id is not reused.
        found = _apps.get(key)
        if found is None:
            if len(_apps) >= 16:
                _apps.pop(next(iter(_apps)))
            found = App(config=target) if isinstance(target, Config) else App(path)
            _apps[key] = found
        return found


def run_check(
    app_or_config: App | Config | str | os.PathLike[str] | None,
    name: str,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """Ask check ``name`` from Python, e.g. in the business's own checkout code.

    ``app_or_config``: an :class:`App`, a loaded :class:`Config`, or the path of a config.yaml
    (None: ``$REMINDERS_CONFIG``, then ./config.yaml); rules are loaded once per config.
    ``params``: Python values of the declared types (an ``int`` for ``int``, a ``date`` or ISO
    text for ``date``, ...).

    Returns the JSON answer of the contract: ``{"duplicate": True, "match": {...}, "message":
    ...}``, ``{"duplicate": False}``, ``{"duplicate": None, "status": "unknown", "reason": ...}``
    past the timeout, or ``{"duplicate": None, "status": "error", "error": ...}`` when the
    database failed. Raises :class:`CheckParamError` (bad parameters) and
    :class:`~reminders.errors.RuleError` (no such check).
    """
    app = _app_for(app_or_config)
    typed = {
        key: value.isoformat() if isinstance(value, date) else value
        for key, value in params.items()
    }
    return ask(app, name, typed).as_dict()
