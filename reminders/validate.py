"""``reminders validate``: every problem in config, rules and templates, each with its place.

Three passes, each only when the one before found the input readable:

1. the config, the rules and the templates on their own (no database, no network);
2. the secrets the configuration makes necessary (``REMINDERS_SECRET`` once ``web.public_url`` is
   set): a worker checks the same before taking a job;
3. against the business DB: each rule's ``query`` and ``check`` and each check's query are prepared
   by the database without reading a row, and the columns the query returns are compared with what
   the rule and its templates use. An unreachable business DB is a runtime failure (exit 1), not
   a pass: ``validate --offline`` skips this step and says so.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import business_db
from .errors import InputError, Problem, SourceError
from .rules import CheckRule, Rule, RuleSet, key_columns

# What the engine puts in a rule template's context besides the row's columns (see
# compose.template_context), and in a check template's besides its query's columns and params
# (checks._message); Jinja's own globals (range, dict, namespace...) are added per environment.
RULE_CONTEXT = frozenset(
    {
        "customer",
        "reminder",
        "now",
        "default_timezone",
        "default_locale",
        "template_locale",
        "unsubscribe_url",
        "preferences_url",
    }
)
CHECK_CONTEXT = frozenset(
    {"params", "match", "check", "now", "customer", "default_timezone", "default_locale"}
)
PREPARE_TIMEOUT = timedelta(seconds=10)  # a plan that takes longer is a query to look at

if TYPE_CHECKING:
    from .app import App


def validate_all(app: App, *, business: bool = True) -> list[Problem]:
    """Problems (errors and warnings) of the config, the rules and every template they name.

    With ``business``, and no error found before, each query is also prepared against the
    business DB; an unreachable one raises :class:`ServiceUnavailable`.
    """
    try:
        app.config  # noqa: B018 - loading is the check
    except InputError as exc:
        return list(exc.problems)
    try:
        ruleset = app.ruleset
    except InputError as exc:
        return list(exc.problems)
    problems: list[Problem] = list(ruleset.warnings)
    problems.extend(template_problems(app, ruleset.rules, ruleset.checks))
    problems.extend(digest_problems(app, ruleset))
    problems.extend(keyword_problems(app.config, ruleset.rules))
    problems.extend(secret_problems(app.config))
    if business and not any(not p.warning for p in problems):
        problems.extend(query_problems(app, ruleset.rules, ruleset.checks))
    return problems


def keyword_problems(config: Any, rules: Iterable[Rule]) -> list[Problem]:
    """A rule's reply word that a language's keywords (config ``keywords``) already claim: the
    engine's meaning would win, and the rule's never happen."""
    claimed = {
        word: (language, action)
        for language, words in config.keywords.items()
        for action in ("stop", "start", "help")
        for word in getattr(words, action)
    }
    found = []
    for rule in rules:
        for word in rule.replies:
            if word in claimed:
                language, action = claimed[word]
                found.append(
                    Problem(
                        f"rule {rule.name}: replies: {word} is the {language} {action} keyword "
                        f"(config keywords.{language}.{action}); choose another word",
                        rule.file,
                        rule.line_of("replies"),
                    )
                )
    return [_relative(p, config.root) for p in found]


def secret_problems(config: Any) -> list[Problem]:
    """The secrets ``config`` needs that the environment lacks (named, with what needs them).

    Provider credentials are ``${VAR}`` values of the config, checked when it loads; the link
    key is not in the config, so it is asked for here.
    """
    if not config.web.public_url:
        return []
    from . import links

    try:
        links.secrets()
    except InputError as exc:
        return [
            replace(p, message=f"web.public_url is set: {p.message}", file=p.file or config.file)
            for p in exc.problems
        ]
    return []


def template_problems(app: App, rules: Iterable[Any], checks: Iterable[Any] = ()) -> list[Problem]:
    """What is wrong with the templates of ``rules`` (each channel) and of ``checks``.

    Files are named relative to the config's folder, like rule files (``templates/x.sms.j2``).
    """
    renderer = app.renderer
    found: list[Problem] = []
    for rule in rules:
        found.extend(renderer.problems(rule.template_name, rule.channels))
    for check in checks:
        if check.message:
            found.extend(renderer.problems(check.message, ["check"]))
    root = app.config.root
    return [_relative(p, root) for p in found]


def digest_problems(app: App, ruleset: RuleSet) -> list[Problem]:
    """What is wrong with each digest's template (every channel its rules send on, each
    variant): the template problems, and names it reads that a digest's template does not have
    (``items``, ``digest``, ``customer``, the links...: see :data:`reminders.digest.CONTEXT`)."""
    from .digest import CONTEXT

    renderer = app.renderer
    found: list[Problem] = []
    for digest in ruleset.digests:
        name = digest.template_name
        channels = sorted({c for r in digest.rules for c in ruleset.rule(r).channels})
        found.extend(renderer.problems(name, channels))
        for used, file, line in _unknown_names(renderer, name, channels, CONTEXT):
            found.append(
                Problem(
                    f"{used} is not a name digest {digest.name}'s template has "
                    f"({digest.file}:{digest.line}; it has: {', '.join(sorted(CONTEXT))}; "
                    f"a reminder's columns are on each of items: item.{used})",
                    file,
                    line,
                )
            )
    root = app.config.root
    return [_relative(p, root) for p in found]


def query_problems(app: Any, rules: Iterable[Rule], checks: Iterable[CheckRule]) -> list[Problem]:
    """Each query prepared against the business DB, and the names the rules and templates use
    compared with the columns it returns. Raises ServiceUnavailable when the DB does not answer."""
    config = app.config
    engine = app.business
    now = app.now()
    engine_params = {"now": now, "today": now.astimezone(config.tz()).date()}
    found: list[Problem] = []
    for rule in rules:
        found.extend(_rule_problems(app, engine, rule, engine_params))
    for check in checks:
        found.extend(_check_problems(app, engine, check, engine_params))
    root = config.root
    return [_relative(p, root) for p in found]


def _prepare(
    engine: Any, sql: str, values: Mapping[str, Any], what: str, problem: Problem
) -> tuple[list[str] | None, list[Problem]]:
    """(the columns of ``sql``, []) or (None, [its failure as ``problem``'s message's tail])."""
    wanted = business_db.parameters(sql)
    try:
        names = business_db.columns(
            engine,
            sql,
            {k: v for k, v in values.items() if k in wanted},
            what=what,
            timeout=PREPARE_TIMEOUT,
        )
    except SourceError as exc:
        text = str(exc).removeprefix(f"{what}: ")
        return None, [replace(problem, message=f"{problem.message}{text}")]
    return names, []


def _rule_problems(
    app: Any, engine: Any, rule: Rule, engine_params: Mapping[str, Any]
) -> list[Problem]:
    what = f"rule {rule.name}"
    at = Problem(f"{what}: query: ", rule.file, rule.line_of("query"))
    # An incremental rule's query is prepared as its full scans run it (:since at the epoch).
    query_params = {**engine_params, "since": business_db.EPOCH}
    names, found = _prepare(engine, rule.query, query_params, what, at)
    if names is None:
        return found
    returned = set(names)
    listed = ", ".join(names)

    def missing(key: str, column: str, role: str) -> None:
        if column not in returned:
            found.append(
                Problem(
                    f"{what}: {key}: the query returns no column {column} ({role}; "
                    f"it returns: {listed})",
                    rule.file,
                    rule.line_of(key),
                )
            )

    missing("due", rule.due, "the due date")
    missing("customer", rule.columns["id"], "the customer's id")
    for field, column in rule.customer.items():
        if field != "id":
            missing("customer", column, f"the customer's {field}")
    simple = key_columns(rule.occurrence)
    used = simple[1] if simple is not None else _template_names(rule.occurrence)
    for column in dict.fromkeys(used):
        missing("occurrence", column, "used by the occurrence key")
    if rule.check:
        found.extend(_rule_check_problems(engine, rule, names, engine_params))
    found.extend(_writeback_problems(rule, names))
    found.extend(_template_name_problems(app, rule, returned))
    return found


def _writeback_problems(rule: Rule, names: list[str]) -> list[Problem]:
    """A write-back statement's ``:names`` that its event does not bind (the row's columns and
    the event's own facts). The statements are never run here: the write-back connection
    writes, and is used for nothing but applying events."""
    from .outbox import REMINDER_BINDS, unknown_binds

    found = []
    for event, sql in rule.writeback.items():
        for name in unknown_binds(sql, [*names, *REMINDER_BINDS]):
            found.append(
                Problem(
                    f"rule {rule.name}: writeback.{event}: :{name} is not bound by {event} (it "
                    f"binds the query's columns: {', '.join(names)}; and "
                    f":{', :'.join(REMINDER_BINDS)})",
                    rule.file,
                    rule.line_of(f"writeback.{event}"),
                )
            )
    return found


def _rule_check_problems(
    engine: Any, rule: Rule, names: list[str], engine_params: Mapping[str, Any]
) -> list[Problem]:
    assert rule.check is not None
    what = f"rule {rule.name}"
    line = rule.line_of("check")
    unknown = sorted(business_db.parameters(rule.check) - set(names) - set(engine_params))
    if unknown:
        return [
            Problem(
                f"{what}: check: :{', :'.join(unknown)} is not a column of the rule's query "
                f"(a check may use the query's columns, :now and :today; the query returns: "
                f"{', '.join(names)})",
                rule.file,
                line,
            )
        ]
    # The row's values are not known yet: NULL of every column, which any database can type.
    values = {**dict.fromkeys(names), **engine_params}
    _, found = _prepare(
        engine, rule.check, values, what, Problem(f"{what}: check: ", rule.file, line)
    )
    return found


# A value of each check param type, to prepare the query with; bound as checks bind them.
_SAMPLES: dict[str, Any] = {
    "int": 0,
    "str": "",
    "float": 0.0,
    "bool": False,
    "date": date(2000, 1, 1),
    "datetime": datetime(2000, 1, 1),
}


def _check_problems(
    app: Any, engine: Any, check: CheckRule, engine_params: Mapping[str, Any]
) -> list[Problem]:
    from .checks import bind

    what = f"check {check.name}"
    values: dict[str, Any] = {**engine_params, **{k: _SAMPLES[t] for k, t in check.params.items()}}
    if check.window is not None:
        values["since"] = engine_params["now"] - check.window
    dialect = engine.dialect.name
    values = {k: bind(v, dialect) for k, v in values.items()}
    at = Problem(f"{what}: query: ", check.file, check.line_of("query"))
    names, found = _prepare(engine, check.query, values, what, at)
    if names is None or not check.message:
        return found
    known = set(names) | set(check.params) | CHECK_CONTEXT
    for name, file, line in app.renderer.names(check.message, "check"):
        if name not in known:
            found.append(
                Problem(
                    f"{name} is not a column of check {check.name}'s query "
                    f"({check.file}:{check.line_of('query')}), nor one of its params or the "
                    f"engine's names (it returns: {', '.join(names)})",
                    file,
                    line,
                )
            )
    return found


def _template_name_problems(app: Any, rule: Rule, returned: set[str]) -> list[Problem]:
    """Names the rule's templates (each variant too) use that neither its query nor the engine
    provides."""
    known = returned | RULE_CONTEXT
    found = []
    for name, file, line in _unknown_names(app.renderer, rule.template_name, rule.channels, known):
        found.append(
            Problem(
                f"{name} is not a column of rule {rule.name}'s query "
                f"({rule.file}:{rule.line_of('query')}) nor a name the engine provides "
                f"(it returns: {', '.join(sorted(returned))}; the engine adds: "
                f"{', '.join(sorted(RULE_CONTEXT))})",
                file,
                line,
            )
        )
    return found


def _unknown_names(
    renderer: Any, template: str, channels: Iterable[str], known: Collection[str]
) -> list[tuple[str, str | None, int]]:
    """The names ``template`` reads on each of ``channels`` (each locale variant too) that are
    not ``known``: (name, file, line), once a file."""
    found = []
    reported: set[tuple[str, str | None]] = set()
    for channel in channels:
        for locale in [None, *renderer.variants(template, channel)]:
            for name, file, line in renderer.names(template, channel, locale):
                if name in known or (name, file) in reported:
                    continue
                reported.add((name, file))
                found.append((name, file, line))
    return found


def _template_names(source_text: str) -> list[str]:
    """The names an occurrence template that is not simple reads from the row."""
    from jinja2 import meta

    from .rules import _sandbox

    names = meta.find_undeclared_variables(_sandbox.parse(source_text))
    return sorted(names - set(_sandbox.globals))


def _relative(problem: Problem, root: Path) -> Problem:
    if not problem.file:
        return problem
    path = Path(problem.file)
    try:
        shown = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return problem
    return replace(problem, file=str(shown))
