"""The ``reminders`` command line.

Exit codes: 0 done (skipped bad rows still count as done), 1 a runtime failure (a rule's SQL failed,
a service unreachable), 2 invalid config, rules, templates or usage.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click
import sqlalchemy as sa

from . import clock, models, store
from .app import App
from .errors import InputError, RemindersError, RuntimeFailure

pass_app = click.make_pass_decorator(App)


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
@click.version_option(package_name="reminders")
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
    ctx.obj = App(config_path)


def main(argv: list[str] | None = None) -> None:
    """Entry point: maps the engine's errors to exit codes 1 and 2."""
    try:
        cli.main(args=argv, prog_name="reminders", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
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
    except sa.exc.OperationalError as exc:
        click.echo(f"error: database unreachable: {exc.orig}", err=True)
        sys.exit(1)
    sys.exit(0)


def _echo_json(obj: Any) -> None:
    click.echo(json.dumps(obj, separators=(",", ":"), default=str))


# --- validate ------------------------------------------------------------------------------------


@cli.command()
@pass_app
def validate(app: App) -> None:
    """Check config, rules and templates; exit 2 with file:line: message lines on error."""
    from .validate import validate_all

    problems = validate_all(app)
    errors = [p for p in problems if not p.warning]
    for problem in problems:
        click.echo(str(problem), err=True)
    if errors:
        raise SystemExit(2)
    rules = app.ruleset
    click.echo(
        f"ok: {len(rules.rules)} rule(s), {len(rules.checks)} check(s), "
        f"channels: {', '.join(app.config.channel_names) or 'none'}"
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
    store.upgrade(app.config.state_url, revision)
    click.echo(f"state DB at revision {store.current_revision(app.config.state_url)}")


@db.command("current")
@pass_app
def db_current(app: App) -> None:
    """Print the state DB's revision and the code's."""
    click.echo(f"state DB: {store.current_revision(app.config.state_url) or 'none'}")
    click.echo(f"code:     {store.head_revision()}")


# --- scan -----------------------------------------------------------------------------------------


@cli.command()
@click.option("--rule", "rule_name", metavar="NAME", help="scan one rule only")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a rule")
@pass_app
def scan(app: App, rule_name: str | None, as_json: bool) -> None:
    """Read the business DB; create, move and cancel reminders; print counts."""
    from .scan import scan_all

    results = scan_all(app, rule_name=rule_name, progress=sys.stderr.isatty())
    failed = False
    for counts in results:
        if as_json:
            _echo_json(counts.as_dict())
        else:
            click.echo(
                f"{counts.rule}: {counts.rows} rows, {counts.created} created, "
                f"{counts.moved} moved, {counts.canceled} canceled, {counts.unchanged} unchanged, "
                f"{counts.skipped} skipped, {counts.too_late} too late"
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


# --- list -----------------------------------------------------------------------------------------


@cli.command("list")
@click.option("--rule", "rule_name", metavar="R")
@click.option("--status", type=click.Choice(models.STATUSES))
@click.option("--customer", metavar="ID", help="one customer's reminders")
@click.option("--limit", type=int, default=None)
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
    """List reminders ordered by send time then id."""
    r = models.reminder
    query = sa.select(
        r.c.id,
        r.c.rule,
        r.c.occurrence,
        r.c.customer_id,
        r.c.offset,
        r.c.send_at,
        r.c.status,
        r.c.channel,
        r.c.reason,
    ).order_by(r.c.send_at, r.c.id)
    if rule_name:
        query = query.where(r.c.rule == rule_name)
    if status:
        query = query.where(r.c.status == status)
    if customer:
        query = query.where(r.c.customer_id == customer)
    if limit:
        query = query.limit(limit)
    store.ensure_current(app.config.state_url)
    with app.state.connect() as conn:
        rows = conn.execute(query).mappings()
        if as_json:
            for row in rows:
                _echo_json(
                    {
                        "id": row["id"],
                        "rule": row["rule"],
                        "occurrence": row["occurrence"],
                        "customer_id": row["customer_id"],
                        "offset": row["offset"],
                        "send_at": clock.iso_utc(row["send_at"]),
                        "status": row["status"],
                        "channel": row["channel"],
                        "reason": row["reason"],
                    }
                )
            return
        header = (
            f"{'id':>6}  {'send at (UTC)':20}  {'status':10}  {'rule':20}  {'offset':6}  "
            f"{'customer':10}  {'channel':7}  occurrence / reason"
        )
        click.echo(header)
        for row in rows:
            tail = row["occurrence"] + (f"  ({row['reason']})" if row["reason"] else "")
            click.echo(
                f"{row['id']:>6}  {clock.iso_utc(row['send_at']):20}  {row['status']:10}  "
                f"{row['rule'][:20]:20}  {row['offset']:6}  {row['customer_id'][:10]:10}  "
                f"{(row['channel'] or '-'):7}  {tail}"
            )


# --- status ---------------------------------------------------------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@pass_app
def status(app: App, as_json: bool) -> None:
    """Counts by rule and status, next due, stuck and recent failures, last scans."""
    from .report import format_status, status_report

    store.ensure_current(app.config.state_url)
    report = status_report(app)
    if as_json:
        _echo_json(report)
    else:
        click.echo(format_status(report))


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
