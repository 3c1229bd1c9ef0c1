"""The ``reminders`` command line.

Exit codes: 0 done (skipped bad rows still count as done), 1 a runtime failure (a rule's SQL failed,
a service unreachable), 2 invalid config, rules, templates or usage.

Each command imports what it needs when it runs: ``reminders --help`` and ``--version`` load click
and nothing of the engine (no SQLAlchemy, pydantic or Jinja), so they answer at once; see
``benchmarks/cli_startup.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable, Iterator
from functools import update_wrapper
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

import click

from . import __version__, clock
from .errors import InputError, RemindersError, RuntimeFailure, ServiceUnavailable

if TYPE_CHECKING:
    from .app import App

F = TypeVar("F", bound=Callable[..., Any])


def pass_app(command: F) -> F:
    """Give ``command`` the engine's App for ``-c`` (made when the command runs, never for
    ``--help``: click runs the group before a subcommand's own --help)."""

    @click.pass_context
    def run(ctx: click.Context, /, *args: Any, **kwargs: Any) -> Any:
        from .app import App

        return ctx.invoke(command, App(ctx.find_root().obj), *args, **kwargs)

    return update_wrapper(run, command)  # type: ignore[return-value]


LIST_LIMIT = 50  # rows of the list table unless --limit says otherwise (--json: all)


class StatusType(click.ParamType):
    """A reminder status, checked against the lifecycle's own list when a command runs (so
    ``reminders --help`` does not import the state DB's code)."""

    name = "status"

    def __init__(self, allowed: tuple[str, ...] | None = None) -> None:
        self.allowed = allowed

    def names(self) -> list[str]:
        if self.allowed is not None:
            return list(self.allowed)
        from .lifecycle import STATUSES

        return [s.value for s in STATUSES]

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "[" + "|".join(self.names()) + "]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        names = self.names()
        if value not in names:
            self.fail(f"{value!r} is not one of {', '.join(names)}", param, ctx)
        return str(value)


def color() -> bool | None:
    """Colours: on a terminal, never when piped (click strips them) or when NO_COLOR is set."""
    return False if os.environ.get("NO_COLOR") else None


def _database_unreachable(exc: Exception) -> bool:
    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded only by a command that used a database
    return sa_exc is not None and isinstance(exc, sa_exc.OperationalError)


def _set_now(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            clock.parse_instant(value)
        except ValueError:
            raise click.BadParameter(
                f'"{value}" is not an ISO 8601 time (e.g. 2027-03-14T09:00Z)'
            ) from None
        os.environ[clock.ENV] = value  # one clock for every part of the engine, workers included
    return value


def _set_log_format(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    from . import logs

    if value:
        os.environ[logs.ENV] = value  # the processes a command starts log the same way
    try:
        logs.chosen()
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "-c",
    "--config",
    "config_path",
    metavar="PATH",
    help="config file (default: $REMINDERS_CONFIG, then ./config.yaml)",
)
@click.option(
    "--now",
    callback=_set_now,
    expose_value=False,
    is_eager=True,
    metavar="ISO",
    help="the current time, ISO 8601 (no zone = UTC); default: $REMINDERS_NOW or the real time",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    callback=_set_log_format,
    expose_value=False,
    is_eager=True,
    help="log lines as text (default) or one JSON object a line; default: $REMINDERS_LOG_FORMAT",
)
@click.version_option(__version__, prog_name="reminders")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """reminders: proactive customer reminders from your own database."""

    if os.environ.get(clock.ENV):
        try:
            clock.now()
        except ValueError:
            raise click.BadParameter(
                f'REMINDERS_NOW="{os.environ[clock.ENV]}" is not an ISO 8601 time'
            ) from None
    ctx.obj = config_path  # pass_app makes the App when a command runs


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps the engine's errors to exit codes 1 and 2."""
    try:
        cli.main(args=argv, prog_name="reminders", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            # Ctrl-C, or a SIGTERM turned into one by a command that records its stop (scan):
            # the shell's convention, 128 + the signal's number.
            name = str(exc.__cause__) or "SIGINT"
            click.echo(f"interrupted by {name}", err=True)
            sys.exit(128 + getattr(signal.Signals, name, signal.SIGINT).value)
        click.echo("aborted", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except InputError as exc:
        for problem in exc.problems:
            click.echo(str(problem), err=True)
        sys.exit(2)
    except RuntimeFailure as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except RemindersError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except Exception as exc:
        if not _database_unreachable(exc):
            raise
        from . import dberrors

        click.echo(f"error: database unreachable: {dberrors.message(exc)}", err=True)
        sys.exit(1)
    sys.exit(0)


def _migrated(app: App) -> None:
    """Refuse (exit 1, saying what to run) a state DB not at the code's revision."""
    from . import state_db

    state_db.ensure_current(app.config.state_url)


def _echo_json(obj: Any) -> None:
    import json

    click.echo(json.dumps(obj, separators=(",", ":"), default=str))


# --- validate ------------------------------------------------------------------------------------


@cli.command()
@click.option("--offline", is_flag=True, help="Do not prepare the queries against the business DB.")
@pass_app
def validate(app: App, offline: bool) -> None:
    """Check config, rules and templates, and prepare every query against the business DB
    (reading no row); exit 2 with file:line: message lines on error, 1 when the DB is
    unreachable."""
    from .validate import validate_all

    try:
        problems = validate_all(app, business=not offline)
    except ServiceUnavailable as exc:
        raise ServiceUnavailable(
            f"{exc} (validate prepares every query against the business DB; "
            "validate --offline checks the rest without it)"
        ) from None
    errors = [p for p in problems if not p.warning]
    for problem in problems:
        tint = "yellow" if problem.warning else "red"
        click.echo(click.style(str(problem), fg=tint), err=True, color=color())
    if errors:
        raise SystemExit(2)
    rules = app.ruleset
    checked = "not checked against the business DB" if offline else "queries prepared"
    click.echo(
        click.style("ok", fg="green", bold=True)
        + f": {len(rules.rules)} rule(s), {len(rules.checks)} check(s), "
        + (f"{len(rules.digests)} digest(s), " if rules.digests else "")
        + f"channels: {', '.join(app.config.channel_names) or 'none'}; {checked}",
        color=color(),
    )


# --- db -------------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The state DB: create and migrate its tables."""


@db.command("upgrade")
@click.argument("revision", default="head")
@pass_app
def db_upgrade(app: App, revision: str) -> None:
    """Create or migrate the state DB (alembic)."""
    from . import state_db

    state_db.upgrade(app.config.state_url, revision)
    click.echo(f"state DB at revision {state_db.current_revision(app.config.state_url)}")


@db.command("current")
@pass_app
def db_current(app: App) -> None:
    """Print the state DB's revision and the code's."""
    from . import state_db

    click.echo(f"state DB: {state_db.current_revision(app.config.state_url) or 'none'}")
    click.echo(f"code:     {state_db.head_revision()}")


# --- scan -----------------------------------------------------------------------------------------


@cli.command()
@click.option("--rule", "rule_name", metavar="NAME", help="scan one rule only")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a rule")
@click.option(
    "--allow-mass-cancel",
    is_flag=True,
    help="cancel reminders whose rows vanished even when more than scan.max_cancel of a rule's",
)
@click.option(
    "--full",
    is_flag=True,
    help="a full scan of every incremental rule too (the only kind that sees vanished rows)",
)
@pass_app
def scan(
    app: App, rule_name: str | None, as_json: bool, allow_mass_cancel: bool, full: bool
) -> None:
    """Read the business DB; create, move and cancel reminders; print counts."""
    from .scan import scan_all

    # SIGTERM (systemd, a deploy) or Ctrl-C stops a scan after its current batch, between
    # transactions, and its run is recorded as interrupted by that signal instead of being left
    # "running" by a process that vanished.
    with _stop_between_batches() as should_stop:
        results = scan_all(
            app,
            rule_name=rule_name,
            progress=sys.stderr.isatty(),
            allow_mass_cancel=allow_mass_cancel,
            should_stop=should_stop,
            full=full,
        )
    failed = False
    for counts in results:
        if as_json:
            _echo_json(counts.as_dict())
        else:
            click.echo(
                f"{counts.rule}{' (incremental)' if counts.kind == 'incremental' else ''}: "
                f"{counts.rows} rows, {counts.created} created, "
                f"{counts.moved} moved, {counts.canceled} canceled, {counts.unchanged} unchanged, "
                f"{counts.skipped} skipped, {counts.too_late} too late"
                + (f", {counts.off} off (turned off by the customer)" if counts.off else "")
                + (f", {counts.restored} restored" if counts.restored else "")
                + (f", {counts.held} not canceled (too many)" if counts.held else "")
            )
            for number, occurrence, _column, reason in counts.skips[:10]:
                where = f"occurrence {occurrence}" if occurrence else f"row {number}"
                click.echo(f"  skipped {where}: {reason}")
            if counts.skipped > 10:
                click.echo(f"  ... and {counts.skipped - 10} more (reminders status)")
        if counts.error:
            failed = True
            click.echo(f"error: {counts.error}", err=True)
    if failed:
        raise SystemExit(1)


@contextlib.contextmanager
def _stop_between_batches() -> Iterator[Callable[[], str | None]]:
    """While the block runs, SIGTERM or Ctrl-C asks it to stop after its current batch: yields
    what a command passes as ``should_stop`` (the signal's name once one came). A second signal
    stops it at once."""
    asked: list[str] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if asked:
            raise KeyboardInterrupt(name)
        asked.append(name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield lambda: asked[0] if asked else None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# --- list -----------------------------------------------------------------------------------------


STATUS_COLORS = {
    "sent": "green",
    "delivered": "green",
    "failed": "red",
    "undelivered": "red",
    "canceled": "bright_black",
    "queued": "cyan",
    "sending": "cyan",
}


@cli.command("list")
@click.option("--rule", "rule_name", metavar="R", help="one rule's reminders")
@click.option("--status", type=StatusType(), help="reminders in this status only")
@click.option("--customer", metavar="ID", help="one customer's reminders")
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=None,
    metavar="N",
    help=f"at most N rows (default: {LIST_LIMIT} in the table, all with --json; 0 = all)",
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object a line")
@pass_app
def list_(
    app: App,
    rule_name: str | None,
    status: str | None,
    customer: str | None,
    limit: int | None,
    as_json: bool,
) -> None:
    """List reminders ordered by send time then id, with when each was sent."""
    import sqlalchemy as sa

    from . import models
    from .stats import LIST_COLUMNS, reminder_fields

    r = models.reminder
    query = sa.select(*LIST_COLUMNS)
    if rule_name:
        query = query.where(r.c.rule == rule_name)
    if status:
        query = query.where(r.c.status == status)
    if customer:
        query = query.where(r.c.customer_id == customer)
    if limit is None and not as_json:
        limit = LIST_LIMIT
    _migrated(app)
    with app.state.connect() as conn:
        total = None
        if limit:
            total = conn.execute(sa.select(sa.func.count()).select_from(query.subquery())).scalar()
            query = query.limit(limit)
        rows = conn.execute(query.order_by(r.c.send_at, r.c.id)).mappings()
        if as_json:
            for row in rows:
                _echo_json(reminder_fields(row))
            return
        header = (
            f"{'id':>6}  {'send at (UTC)':20}  {'status':11}  {'sent at (UTC)':20}  {'rule':20}  "
            f"{'offset':6}  {'customer':10}  {'channel':7}  occurrence / reason"
        )
        click.echo(click.style(header, bold=True), color=color())
        shown = 0
        for row in rows:
            shown += 1
            tail = row["occurrence"] + (f"  ({row['reason']})" if row["reason"] else "")
            sent = clock.iso_utc(row["sent_at"]) if row["sent_at"] else "-"
            state = click.style(f"{row['status']:11}", fg=STATUS_COLORS.get(row["status"]))
            click.echo(
                f"{row['id']:>6}  {clock.iso_utc(row['send_at']):20}  {state}  {sent:20}  "
                f"{row['rule'][:20]:20}  {row['offset']:6}  {row['customer_id'][:10]:10}  "
                f"{(row['channel'] or '-'):7}  {tail}",
                color=color(),
            )
        if total is not None and total > shown:
            click.echo(
                f"... and {total - shown} more (--limit 0 shows all; --rule, --status or "
                "--customer narrow them)"
            )


# --- status ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the report as one JSON object")
@pass_app
def status(app: App, as_json: bool) -> None:
    """Counts by rule and status, next due, stuck and recent failures, last scans."""
    from .report import format_status, status_report

    _migrated(app)
    report = status_report(app)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_status(report))


# --- prune ----------------------------------------------------------------------------------------


def _older_than(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    if value is None:
        return None
    from .sendtime import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@cli.command()
@click.option(
    "--older-than",
    callback=_older_than,
    metavar="DURATION",
    help="prune what is older than this (e.g. 90d, 26w; default: state.retention); at least "
    "web.link_max_age",
)
@click.option("--dry-run", is_flag=True, help="count what would go, per table; delete nothing")
@click.option("--json", "as_json", is_flag=True, help="the counts as one JSON object")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="reminders (or other rows) deleted per transaction",
)
@pass_app
def prune(app: App, older_than: Any, dry_run: bool, as_json: bool, batch_size: int) -> None:
    """Delete finished reminders (with their messages and events), old replies and old scan runs
    older than the retention, in small transactions; never a reminder not final, nor consent."""
    from . import prune as retention
    from .config import retention_text

    config = app.config
    if older_than is None:
        older_than = config.state.retention
        if older_than is None:
            raise click.UsageError(
                "state.retention is null (keep everything): pass --older-than (e.g. 180d)"
            )
    elif older_than < config.web.link_max_age:
        limit = retention_text(config.web.link_max_age)
        raise click.BadParameter(
            f"{retention_text(older_than)} is shorter than web.link_max_age ({limit}): an "
            "unsubscribe link finds its address among the messages sent, so they are kept "
            f"while a link is valid (use {limit} or more)",
            param_hint="--older-than",
        )
    _migrated(app)
    graces = retention.graces(app)
    now = app.now()
    with _stop_between_batches() as should_stop:
        if dry_run:
            done = retention.count(app.state, now, older_than, graces)
        else:
            done = retention.prune(
                app.state, now, older_than, graces, batch_size=batch_size, should_stop=should_stop
            )
    if as_json:
        _echo_json(
            {
                "dry_run": dry_run,
                "older_than": retention_text(older_than),
                "cutoff": clock.iso_utc(done.cutoff),
                **{name: getattr(done, name) for name in retention.TABLES},
                "finished": done.stopped is None,
            }
        )
    else:
        verb = "would delete" if dry_run else "deleted"
        click.echo(
            f"{verb}, older than {retention_text(older_than)} "
            f"(last changed before {clock.iso_utc(done.cutoff)}):"
        )
        for name in retention.TABLES:
            click.echo(f"  {name.replace('_', ' '):<13} {getattr(done, name)}")
    if done.stopped:
        raise KeyboardInterrupt(done.stopped)


# --- metrics --------------------------------------------------------------------------------------


@cli.command()
@pass_app
def metrics(app: App) -> None:
    """Print the Prometheus metrics GET /metrics answers, read now from the state DB and Redis."""
    from .metrics import collect

    _migrated(app)
    click.echo(collect(app).decode(), nl=False)


# --- check ----------------------------------------------------------------------------------------


@cli.command("check")
@click.argument("name")
@click.argument("params", nargs=-1, metavar="KEY=VALUE...")
@pass_app
def check_(app: App, name: str, params: tuple[str, ...]) -> None:
    """Ask check NAME (e.g. already-owned customer_id=7 sku=B01); print its JSON answer.

    Exit 0 answered, 1 unknown (timed out) or failed, 2 bad parameters.
    """
    from .checks import ask, parse_pairs

    answer = ask(app, name, parse_pairs(params), text=True)
    _echo_json(answer.as_dict())
    if not answer.answered:
        raise SystemExit(1)


# --- delivery: dispatch, worker, scheduler, preview, retry ----------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the counts as one JSON object")
@pass_app
def dispatch(app: App, as_json: bool) -> None:
    """Enqueue the reminders that are due (and re-enqueue those whose job was lost)."""
    from .dispatch import dispatch as run_dispatch

    _migrated(app)
    counts = run_dispatch(app)
    if as_json:
        _echo_json(counts.as_dict())
    else:
        click.echo(
            f"dispatched: {counts.enqueued} enqueued, {counts.requeued} enqueued again "
            f"(job lost), in {counts.jobs} job(s)"
        )


def _serve_metrics(port: int | None, host: str) -> None:
    if port is None:
        return
    from .process_metrics import serve

    try:
        serve(port, host)
    except OSError as exc:
        raise click.BadParameter(f"cannot listen on {host}:{port}: {exc}") from None


@cli.command()
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
@click.option(
    "--queue", "queues", multiple=True, metavar="Q", help="a channel (sms, email) or queue name"
)
@click.option("--name", metavar="NAME", help="the worker's name in RQ (default: a random id)")
@click.option("--max-jobs", type=int, metavar="N", help="stop after N jobs")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="P",
    help="serve this process's own metrics (send, render and scan times) on GET :P/metrics",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="the address --metrics-port listens on",
)
@pass_app
def worker(
    app: App,
    burst: bool,
    queues: tuple[str, ...],
    name: str | None,
    max_jobs: int | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """An RQ worker; with no --queue it serves every channel's queue."""
    from .jobs import resolve_queues, run_worker, setup_logging

    _migrated(app)
    setup_logging()
    _serve_metrics(metrics_port, metrics_host)
    run_worker(app, resolve_queues(app.config, queues), burst=burst, name=name, max_jobs=max_jobs)


@cli.command()
@click.option("--once", is_flag=True, help="one scan and one dispatch, then exit (for cron)")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    metavar="P",
    help="serve this process's own metrics (send, render and scan times) on GET :P/metrics",
)
@click.option(
    "--metrics-host",
    default="127.0.0.1",
    show_default=True,
    help="the address --metrics-port listens on",
)
@pass_app
def scheduler(app: App, once: bool, metrics_port: int | None, metrics_host: str) -> None:
    """Scan and dispatch on intervals; one active at a time (a Redis lock elects it)."""
    from .jobs import setup_logging
    from .scheduler import Scheduler

    _migrated(app)
    setup_logging()
    _serve_metrics(metrics_port, metrics_host)
    cycles = Scheduler(app).run(once=once)
    if once and not cycles:
        click.echo("another scheduler is active: nothing done")
    for cycle in cycles:
        for counts in cycle.scans or []:
            kind = " (incremental)" if counts["kind"] == "incremental" else ""
            click.echo(
                f"scan {counts['rule']}{kind}: {counts['rows']} rows, {counts['created']} created"
            )
        if cycle.dispatch is not None:
            click.echo(f"dispatch: {cycle.dispatch['enqueued']} enqueued")
        if cycle.outbox_jobs:
            click.echo(f"outbox: {cycle.outbox_jobs} destinations enqueued")
        if cycle.pruned is not None:
            gone = cycle.pruned
            click.echo(
                f"prune: {gone['reminders']} reminders, {gone['messages']} messages, "
                f"{gone['events']} events deleted" + (" (more next time)" if gone["more"] else "")
            )
        for error in cycle.errors:
            click.echo(f"error: {error}", err=True)
        if cycle.errors:
            raise SystemExit(1)


@cli.command()
@click.argument("rule_name", metavar="[RULE]", required=False)
@click.option(
    "--digest",
    metavar="NAME",
    help="a digest's messages instead: pending reminders a customer would get in one",
)
@click.option(
    "--occurrence", metavar="KEY", help="the occurrence to show (default: the first rows)"
)
@click.option("--limit", type=int, default=3, show_default=True, help="rows to show")
@click.option(
    "--locale", metavar="LOCALE", help="render the variant for this locale (es, fr-CA) instead"
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object a message")
@pass_app
def preview(
    app: App,
    rule_name: str | None,
    digest: str | None,
    occurrence: str | None,
    limit: int,
    locale: str | None,
    as_json: bool,
) -> None:
    """Render a rule's messages for real rows of the business DB (or, with --digest, a digest's
    for pending reminders); sends nothing."""
    from .preview import format_preview, preview_digest, preview_rule

    if (rule_name is None) == (digest is None):
        raise click.UsageError("give a RULE or --digest NAME (one of them)")
    if digest is not None:
        if occurrence is not None:
            raise click.UsageError("--occurrence is for a rule, not a digest")
        shown = preview_digest(app, digest, limit=limit, locale=locale)
    else:
        assert rule_name is not None
        shown = preview_rule(app, rule_name, occurrence=occurrence, limit=limit, locale=locale)
    if as_json:
        for item in shown.items:
            _echo_json(item)
    else:
        click.echo(format_preview(shown))
    for failure in shown.failures:
        click.echo(f"error: {failure}", err=True)
    if shown.errors:
        raise SystemExit(2)
    if shown.failures:
        raise SystemExit(1)


@cli.command()
@click.option(
    "--status",
    "from_status",
    type=StatusType(("failed", "sending", "unknown")),
    default="failed",
    show_default=True,
    help="failed reminders, or ones in sending or unknown that reconciliation could not decide "
    "(they may have been sent: check the provider's log first)",
)
@click.option("--rule", "rule_name", metavar="R", help="one rule's only")
@click.option("--id", "ids", type=int, multiple=True, metavar="ID", help="these reminders only")
@click.option("--dry-run", is_flag=True, help="show what would be put back, change nothing")
@pass_app
def retry(
    app: App, from_status: str, rule_name: str | None, ids: tuple[int, ...], dry_run: bool
) -> None:
    """Ops: put failed, stuck or unknown reminders back to pending, deliberately (recorded)."""
    from .dispatch import retry as run_retry

    _migrated(app)
    found = run_retry(app, from_status, rule=rule_name, ids=list(ids), dry_run=dry_run)
    verb = "would put back" if dry_run else "put back"
    click.echo(f"{verb} {len(found)} {from_status} reminder(s) to pending")
    for rid in found[:20]:
        click.echo(f"  #{rid}")
    if len(found) > 20:
        click.echo(f"  ... and {len(found) - 20} more")


# --- demo -----------------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--dir",
    "folder",
    default="demo",
    show_default=True,
    metavar="DIR",
    help="the demo's own folder; each run replaces the data in it",
)
@click.option("--reset", is_flag=True, help="copy the shipped config, rules and templates again")
def demo(folder: str, reset: bool) -> None:
    """The whole flow on embedded defaults: a demo business, scan, send, and what happened."""
    from .demo.run import run

    run(folder, reset=reset, echo=click.echo)


# --- web ------------------------------------------------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port"
)
@click.option(
    "--workers", default=2, show_default=True, type=click.IntRange(1, 64), help="processes"
)
@click.option(
    "--threads",
    default=4,
    show_default=True,
    type=click.IntRange(1, 256),
    help="requests served at once by each process (Python threads)",
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="write one line a request to stdout, tokens of customer links masked (a proxy in "
    "front usually logs requests already; errors are always logged)",
)
@click.option(
    "--body-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.1, 300),
    help="seconds a client has to send a request's whole body, else 408",
)
@pass_app
def web(
    app: App,
    host: str,
    port: int,
    workers: int,
    threads: int,
    access_log: bool,
    body_timeout: float,
) -> None:
    """Serve the webhooks, unsubscribe links, preferences page, checks and /healthz (granian)."""
    from .web.server import serve

    serve(
        app,
        host=host,
        port=port,
        workers=workers,
        threads=threads,
        access_log=access_log,
        body_timeout=body_timeout,
    )


# --- the console: console, users, keys, forecast -------------------------------------------------


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option(
    "--port",
    default=8001,
    show_default=True,
    type=click.IntRange(1, 65535),
    help="port to listen on",
)
@click.option(
    "--workers", default=1, show_default=True, type=click.IntRange(1, 64), help="processes"
)
@click.option(
    "--threads", default=4, show_default=True, type=click.IntRange(1, 256), help="per process"
)
@click.option(
    "--access-log/--no-access-log",
    default=False,
    show_default=True,
    help="write a line a request (the proxy in front usually logs them)",
)
@pass_app
def console(app: App, host: str, port: int, workers: int, threads: int, access_log: bool) -> None:
    """Serve the console and its API (internal: keep it off the public network)."""
    from .console.server import serve

    serve(app, host=host, port=port, workers=workers, threads=threads, access_log=access_log)


# The console role of a user or an API key (users add, keys add).
_role = click.option(
    "--role",
    type=click.Choice(["viewer", "operator"]),
    required=True,
    help="viewer: looks; operator: also retries, cancels, pauses",
)


@cli.group()
def users() -> None:
    """The console's users (passwords stored as scrypt hashes)."""


@users.command("add")
@click.argument("name")
@_role
@click.option("--password-stdin", is_flag=True, help="read the password from standard input")
@pass_app
def users_add(app: App, name: str, role: str, password_stdin: bool) -> None:
    """Add a user (or set an existing user's role and password)."""
    from . import accounts

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("password", hide_input=True, confirmation_prompt=True)
    _migrated(app)
    with app.state.begin() as conn:
        accounts.add_user(conn, name, role, password, now=app.now())
    click.echo(f"user {name} ({role}) saved")


@users.command("list")
@pass_app
def users_list(app: App) -> None:
    """The users and their roles."""
    from . import accounts

    _migrated(app)
    with app.state.connect() as conn:
        found = accounts.list_users(conn)
    for user in found:
        click.echo(f"{user['name']:24} {user['role']:9} since {clock.iso_utc(user['created_at'])}")
    if not found:
        click.echo("no users (reminders users add NAME --role viewer|operator)")


@users.command("remove")
@click.argument("name")
@pass_app
def users_remove(app: App, name: str) -> None:
    """Remove a user; their sessions end at once."""
    from . import accounts

    _account_change(app, accounts.remove_user, name, f"no user {name}", f"user {name} removed")


@cli.group()
def keys() -> None:
    """API keys for scripts (Authorization: Bearer KEY); stored as scrypt hashes."""


@keys.command("add")
@click.argument("name")
@_role
@pass_app
def keys_add(app: App, name: str, role: str) -> None:
    """Make a key and print it once: it cannot be shown again."""
    from . import accounts

    _migrated(app)
    with app.state.begin() as conn:
        key = accounts.add_key(conn, name, role, now=app.now())
    click.echo(key)
    click.echo(f"key {name} ({role}): shown once, keep it somewhere safe", err=True)


@keys.command("list")
@pass_app
def keys_list(app: App) -> None:
    """The keys (never the keys themselves): name, role, id, made, revoked."""
    from . import accounts

    _migrated(app)
    with app.state.connect() as conn:
        found = accounts.list_keys(conn)
    for key in found:
        state = f"revoked {clock.iso_utc(key['revoked_at'])}" if key["revoked_at"] else "live"
        click.echo(
            f"{key['name']:24} {key['role']:9} rk_{key['id']}_…  "
            f"made {clock.iso_utc(key['created_at'])}  {state}"
        )
    if not found:
        click.echo("no keys (reminders keys add NAME --role viewer|operator)")


@keys.command("revoke")
@click.argument("name")
@pass_app
def keys_revoke(app: App, name: str) -> None:
    """Revoke a key: refused from its next request."""
    from . import accounts

    _account_change(app, accounts.revoke_key, name, f"no live key {name}", f"key {name} revoked")


def _account_change(
    app: App, change: Callable[..., bool], name: str, missing: str, done: str
) -> None:
    """Remove a user or revoke a key (``change``); a usage error when there is none."""
    _migrated(app)
    with app.state.begin() as conn:
        if not change(conn, name, now=app.now()):
            raise click.UsageError(missing)
    click.echo(done)


@cli.command("forecast")
@click.argument("rule_name", metavar="RULE")
@click.option(
    "--days", default=30, show_default=True, type=click.IntRange(1, 366), help="days ahead"
)
@click.option("--json", "as_json", is_flag=True, help="one JSON object")
@pass_app
def forecast_(app: App, rule_name: str, days: int, as_json: bool) -> None:
    """Run a rule's query and plan it without writing anything: messages a day by channel, and
    what quiet hours, caps, opt-outs, preferences or missing addresses would hold."""
    from .forecast import format_forecast, from_query

    _migrated(app)
    result = from_query(app, rule_name, days)
    if as_json:
        _echo_json(result)
    else:
        click.echo(format_forecast(result))
