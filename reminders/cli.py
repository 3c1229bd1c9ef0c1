"""The ``reminders`` command line.

Exit codes: 0 done (skipped bad rows still count as done), 1 a runtime failure (a rule's SQL failed,
a service unreachable), 2 invalid config, rules, templates or usage.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from types import FrameType
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

    # SIGTERM (systemd, a deploy) or Ctrl-C stops a scan after its current batch, between
    # transactions, and its run is recorded as interrupted by that signal instead of being left
    # "running" by a process that vanished. A second signal stops it at once.
    asked: list[str] = []

    def stop(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if asked:
            raise KeyboardInterrupt(name)
        asked.append(name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        results = scan_all(
            app,
            rule_name=rule_name,
            progress=sys.stderr.isatty(),
            should_stop=lambda: asked[0] if asked else None,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = False
    for counts in results:
        if as_json:
            _echo_json(counts.as_dict())
        else:
            click.echo(
                f"{counts.rule}: {counts.rows} rows, {counts.created} created, "
                f"{counts.moved} moved, {counts.canceled} canceled, {counts.unchanged} unchanged, "
                f"{counts.skipped} skipped, {counts.too_late} too late"
                + (f", {counts.off} off (turned off by the customer)" if counts.off else "")
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


# --- delivery: dispatch, worker, scheduler, preview, retry ----------------------------------------


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="the counts as one JSON object")
@pass_app
def dispatch(app: App, as_json: bool) -> None:
    """Enqueue the reminders that are due (and re-enqueue those whose job was lost)."""
    from .dispatch import dispatch as run_dispatch

    store.ensure_current(app.config.state_url)
    counts = run_dispatch(app)
    if as_json:
        _echo_json(counts.as_dict())
    else:
        click.echo(
            f"dispatched: {counts.enqueued} enqueued, {counts.requeued} enqueued again "
            f"(job lost), in {counts.jobs} job(s)"
        )


@cli.command()
@click.option("--burst", is_flag=True, help="stop when the queues are empty")
@click.option(
    "--queue", "queues", multiple=True, metavar="Q", help="a channel (sms, email) or queue name"
)
@click.option("--name", metavar="NAME", help="the worker's name in RQ (default: a random id)")
@click.option("--max-jobs", type=int, metavar="N", help="stop after N jobs")
@pass_app
def worker(
    app: App, burst: bool, queues: tuple[str, ...], name: str | None, max_jobs: int | None
) -> None:
    """An RQ worker; with no --queue it serves every channel's queue."""
    from .jobs import resolve_queues, run_worker, setup_logging

    store.ensure_current(app.config.state_url)
    setup_logging()
    run_worker(app, resolve_queues(app.config, queues), burst=burst, name=name, max_jobs=max_jobs)


@cli.command()
@click.option("--once", is_flag=True, help="one scan and one dispatch, then exit (for cron)")
@pass_app
def scheduler(app: App, once: bool) -> None:
    """Scan and dispatch on intervals; one active at a time (a Redis lock elects it)."""
    from .jobs import setup_logging
    from .scheduler import Scheduler

    store.ensure_current(app.config.state_url)
    setup_logging()
    cycles = Scheduler(app).run(once=once)
    if once and not cycles:
        click.echo("another scheduler is active: nothing done")
    for cycle in cycles:
        for counts in cycle.scans or []:
            click.echo(f"scan {counts['rule']}: {counts['rows']} rows, {counts['created']} created")
        if cycle.dispatch is not None:
            click.echo(f"dispatch: {cycle.dispatch['enqueued']} enqueued")
        for error in cycle.errors:
            click.echo(f"error: {error}", err=True)
        if cycle.errors:
            raise SystemExit(1)


@cli.command()
@click.argument("rule_name", metavar="RULE")
@click.option(
    "--occurrence", metavar="KEY", help="the occurrence to show (default: the first rows)"
)
@click.option("--limit", type=int, default=3, show_default=True, help="rows to show")
@click.option("--json", "as_json", is_flag=True, help="one JSON object a message")
@pass_app
def preview(app: App, rule_name: str, occurrence: str | None, limit: int, as_json: bool) -> None:
    """Render a rule's messages for real rows of the business DB; sends nothing."""
    from .preview import format_preview, preview_rule

    shown = preview_rule(app, rule_name, occurrence=occurrence, limit=limit)
    if as_json:
        for item in shown.items:
            _echo_json(item)
    else:
        click.echo(format_preview(shown))
    if shown.errors:
        raise SystemExit(2)


@cli.command()
@click.option(
    "--status",
    "from_status",
    type=click.Choice([models.FAILED, models.SENDING]),
    default=models.FAILED,
    show_default=True,
    help="failed reminders, or ones stuck in sending (a worker died: they may have been sent)",
)
@click.option("--rule", "rule_name", metavar="R", help="one rule's only")
@click.option("--id", "ids", type=int, multiple=True, metavar="ID", help="these reminders only")
@click.option("--dry-run", is_flag=True, help="show what would be put back, change nothing")
@pass_app
def retry(
    app: App, from_status: str, rule_name: str | None, ids: tuple[int, ...], dry_run: bool
) -> None:
    """Ops: put failed or stuck reminders back to pending, deliberately (recorded)."""
    from .dispatch import retry as run_retry

    store.ensure_current(app.config.state_url)
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
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
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
