"""Rules: the business's reminder rules (and checks and digests), loaded from YAML and validated
at load.

Every error names the file and line of the offending value and says what is allowed. A rule set is
loaded whole or not at all: one bad rule makes ``load_rules`` raise, so nothing is sent on a
half-valid rule.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)

from . import locales, sendtime
from .business_db import parameters
from .config import Config, Duration
from .errors import Problem, RuleError
from .yamlfile import Document, YamlError, load, unknown_key

NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
CUSTOMER_FIELDS = ("id", "phone", "email", "timezone", "locale", "first_name")
DEFAULT_CUSTOMER = {
    "id": "customer_id",
    "phone": "phone",
    "email": "email",
    "timezone": "timezone",
    "locale": "locale",
    "first_name": "first_name",
}
STOP_WORDS = {"STOP", "STOPALL", "UNSUBSCRIBE", "CANCEL", "END", "QUIT", "REVOKE", "OPTOUT"}
START_WORDS = {"START", "YES", "UNSTOP"}
HELP_WORDS = {"HELP", "INFO"}
RESERVED_WORDS = STOP_WORDS | START_WORDS | HELP_WORDS
QUERY_PARAMETERS = ("now", "today", "since")  # what the engine binds in a rule's query
PARAM_TYPES = ("int", "str", "float", "bool", "date", "datetime")


def _offset(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, str):
        return sendtime.parse_offset(value)
    raise ValueError(f"{value!r} is not an offset (examples: -3d, 2w, -1mo, 0d)")


def _clock(value: Any) -> Any:
    if isinstance(value, str):
        return sendtime.parse_clock(value)
    raise ValueError(f'{value!r} is not a time of day (write it quoted, e.g. at: "10:00")')


def _window(value: Any) -> Any:
    return sendtime.parse_window(value) if isinstance(value, str) else value


_QUIET_HELP = 'a local range ("21:00-08:00"), or false for none'


def _quiet_one(value: Any) -> sendtime.Window | Literal[False]:
    if value is False:
        return False
    if isinstance(value, sendtime.Window):
        return value
    if isinstance(value, str):
        return sendtime.parse_window(value)
    raise ValueError(f"{value!r} is not quiet hours ({_QUIET_HELP})")


def _quiet_hours(value: Any) -> Any:
    """A rule's ``quiet_hours``: one setting for all its channels, or one per channel."""
    if value is None:
        return None
    if isinstance(value, dict):
        out: dict[str, sendtime.Window | Literal[False]] = {}
        for channel, setting in value.items():
            if channel not in ("sms", "email"):
                raise ValueError(f'"{channel}" is not a channel (allowed: sms, email)')
            try:
                out[channel] = _quiet_one(setting)
            except ValueError as exc:
                raise ValueError(f"{channel}: {exc}") from None
        return out
    return _quiet_one(value)


def _priority(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ValueError(f"{value!r} is not a priority (a whole number; higher goes first; default 0)")


def _capped(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    raise ValueError(
        f"{value!r} is not allowed (caps: true, the default, counts this rule's messages against "
        "the frequency caps; caps: false exempts it)"
    )


QuietSetting = sendtime.Window | Literal[False]
QuietHours = Annotated[QuietSetting | dict[str, QuietSetting] | None, PlainValidator(_quiet_hours)]
Offset = Annotated[sendtime.Offset, BeforeValidator(_offset)]
Clock = Annotated[time, BeforeValidator(_clock)]
Window = Annotated[sendtime.Window, BeforeValidator(_window)]


@dataclass(frozen=True)
class Reply:
    """What a one-word SMS answer does: ``done`` or ``snooze`` by ``delay``."""

    action: Literal["done", "snooze"]
    delay: timedelta | None = None


def _reply(value: Any) -> Any:
    if isinstance(value, Reply):
        return value
    text = str(value).strip() if value is not None else ""
    if text == "done":
        return Reply("done")
    parts = text.split()
    if len(parts) == 2 and parts[0] == "snooze":
        try:
            return Reply("snooze", sendtime.parse_duration(parts[1]))
        except ValueError as exc:
            raise ValueError(f"snooze needs a delay: {exc}") from None
    raise ValueError(f'"{text}" is not a reply action (allowed: done, snooze 1d)')


def _checked_name(value: str, kind: str) -> str:
    if not NAME.match(value):
        raise ValueError(f'"{value}" is not a {kind} name (lowercase letters, digits and -)')
    return value


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class _Placed(_Model):
    """A rule, check or digest knows where it was written: its ``file``, its ``line`` and, per
    key, ``lines`` (set by the loader, for the problems found later)."""

    file: str = ""
    line: int = 0
    lines: dict[str, int] = Field(default_factory=dict)  # key -> its line

    def line_of(self, key: str) -> int:
        """The line of the item's ``key`` (``query``, ``rules``...), else the item's own."""
        return self.lines.get(key) or self.line


def _check_sql(value: str, what: str = "query") -> str:
    """One statement (a trailing ``;`` is dropped), not empty."""
    body = value.strip().rstrip(";").strip()
    if not body:
        raise ValueError(f"the {what} is empty")
    if ";" in _strip_sql_literals(body):
        raise ValueError(f"one statement only: remove the ';' inside the {what}")
    return body


def check_statement(value: str) -> str:
    """A write-back statement: one statement, not empty."""
    return _check_sql(value, "statement")


def _statements(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: check_statement(v) if isinstance(v, str) else v for k, v in value.items()}
    return value


def _strip_sql_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'|\"(?:[^\"])*\"|--[^\n]*", "", sql)


class Incremental(_Model):
    """How a rule's scans read only what changed: rows its query selects with ``:since``.

    An incremental scan binds ``:since`` to the start of the rule's last successful scan minus
    ``lookback`` (rows committed late, clocks apart); a full scan, at least every
    ``full_every``, binds 1970-01-01T00:00:00Z and is the only one that sees a row vanish.
    """

    full_every: Duration
    lookback: Duration = timedelta(minutes=10)

    @field_validator("full_every")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be a positive duration (e.g. 1d, 12h)")
        return value

    @field_validator("lookback")
    @classmethod
    def _not_negative(cls, value: timedelta) -> timedelta:
        if value < timedelta(0):
            raise ValueError("must be zero or a positive duration (e.g. 10m)")
        return value


class Rule(_Placed):
    """One reminder rule, as the business wrote it."""

    name: str
    description: str = ""
    # What the customer's page calls one reminder: a short template over the row
    # ("Refill of {{ drug_name }}"); the description is written for staff, never shown to them.
    label: str | None = None
    query: str
    occurrence: str
    due: str
    offsets: list[Offset] = Field(min_length=1)
    at: Clock | None = None
    send_window: Window | None = None
    grace: Duration = timedelta(days=1)
    check: str | None = None
    channels: list[str] = Field(min_length=1)
    template: str | None = None
    customer: dict[str, str] = Field(default_factory=dict)
    recurrence: str | None = None
    horizon: Duration = timedelta(days=60)
    incremental: Incremental | None = None
    replies: dict[str, Annotated[Reply, BeforeValidator(_reply)]] = Field(default_factory=dict)
    # Send-time limits (they never change a planned time, so not in the fingerprint): when a
    # customer has more due than the frequency caps allow, higher priorities go first; caps:
    # false exempts the rule (a fraud alert); quiet_hours overrides the channels' own.
    priority: Annotated[int, PlainValidator(_priority)] = 0
    caps: Annotated[bool, PlainValidator(_capped)] = True
    quiet_hours: QuietHours = None
    # What to write into the business DB when one of its reminders changes (reminders.outbox).
    writeback: Annotated[
        dict[Literal["sent", "delivered", "failed", "canceled", "replied", "done"], str],
        BeforeValidator(_statements),
    ] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name(value, "rule")

    def quiet_window(self, config: Config, channel: str) -> sendtime.Window | None:
        """The quiet hours of this rule's messages on ``channel``: the rule's own (one for all
        its channels, or per channel; false is none), else the channel's (SMS 21:00-08:00)."""
        setting = self.quiet_hours
        if isinstance(setting, dict):
            if channel not in setting:
                return config.quiet_hours(channel)
            setting = setting[channel]
        if setting is None:
            return config.quiet_hours(channel)
        return setting or None

    @field_validator("query", "check")
    @classmethod
    def _sql(cls, value: str | None) -> str | None:
        return None if value is None else _check_sql(value)

    @field_validator("query")
    @classmethod
    def _query_parameters(cls, value: str) -> str:
        unknown = sorted(parameters(value) - set(QUERY_PARAMETERS))
        if unknown:
            raise ValueError(
                f":{unknown[0]} is not a parameter a rule query may use (allowed: :now, the "
                "current time in UTC, :today, the date in the config's timezone, and :since, "
                "with incremental:)"
            )
        return value

    @field_validator("due")
    @classmethod
    def _due(cls, value: str) -> str:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", value):
            raise ValueError(f'"{value}" is not a column name of the query')
        return value

    @field_validator("offsets")
    @classmethod
    def _unique_offsets(cls, value: list[sendtime.Offset]) -> list[sendtime.Offset]:
        texts = [o.text for o in value]
        for text in texts:
            if texts.count(text) > 1:
                raise ValueError(f"offset {text} is listed twice")
        return value

    @field_validator("channels")
    @classmethod
    def _channels(cls, value: list[str]) -> list[str]:
        for name in value:
            if name not in ("sms", "email"):
                raise ValueError(f'"{name}" is not a channel (allowed: sms, email)')
        if len(set(value)) != len(value):
            raise ValueError("a channel is listed twice")
        return value

    @field_validator("customer")
    @classmethod
    def _customer(cls, value: dict[str, str]) -> dict[str, str]:
        for key in value:
            if key not in CUSTOMER_FIELDS:
                raise ValueError(
                    f'"{key}" is not a customer field (allowed: {", ".join(CUSTOMER_FIELDS)})'
                )
        return value

    @field_validator("recurrence")
    @classmethod
    def _recurrence(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            sendtime.check_recurrence(value)
        except sendtime.RecurrenceSyntaxError as exc:
            raise ValueError(
                f'"{value}" is not an RFC 5545 RRULE (e.g. FREQ=MONTHLY;BYMONTHDAY=1): {exc}'
            ) from None
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f'"{value}": {exc}') from None
        return value

    @field_validator("replies")
    @classmethod
    def _replies(cls, value: dict[str, Reply]) -> dict[str, Reply]:
        out = {}
        for word, reply in value.items():
            key = locales.fold(str(word).strip())
            if not re.match(r"^[^\W_]+$", key):
                raise ValueError(f'"{word}" is not a one-word keyword')
            if key in RESERVED_WORDS:
                raise ValueError(
                    f"{key} is the engine's own keyword (STOP, START, HELP and synonyms)"
                )
            out[key] = reply
        return out

    @field_validator("label")
    @classmethod
    def _label_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError('the label is empty (e.g. label: "Refill of {{ drug_name }}")')
        if len(value) > 200:
            raise ValueError("a label is a short title: at most 200 characters")
        from .render import FILTERS

        env = SandboxedEnvironment(undefined=StrictUndefined)
        env.filters.update(FILTERS)
        try:
            env.from_string(value)
        except TemplateSyntaxError as exc:
            raise ValueError(f'"{value}" is not a valid template: {exc.message}') from None
        return value

    @field_validator("occurrence")
    @classmethod
    def _occurrence_compiles(cls, value: str) -> str:
        compile_key(value)
        return value

    @property
    def template_name(self) -> str:
        return self.template or self.name

    @property
    def plain_name(self) -> str:
        """The rule's name for people: ``refill-due`` -> ``Refill due``."""
        return self.name.replace("-", " ").capitalize()

    @property
    def columns(self) -> dict[str, str]:
        """Customer field -> the query's column for it."""
        return {**DEFAULT_CUSTOMER, **self.customer}

    def fingerprint(self, config: Config) -> str:
        """A digest of everything that decides a reminder's schedule (rule and config defaults)."""
        parts = [
            self.occurrence,
            self.due,
            [o.text for o in self.offsets],
            str(self.at),
            str(self.send_window or config.send_window),
            str(self.grace),
            self.recurrence,
            str(self.horizon),
            json.dumps(self.columns, sort_keys=True),
            config.timezone,
        ]
        return hashlib.blake2b(json.dumps(parts, default=str).encode(), digest_size=8).hexdigest()


class CheckRule(_Placed):
    """A synchronous question to the business DB (the checkout's duplicate-purchase check)."""

    name: str
    description: str = ""
    query: str
    params: dict[str, Literal["int", "str", "float", "bool", "date", "datetime"]] = Field(
        min_length=1
    )
    message: str | None = None
    timeout: Duration = timedelta(milliseconds=200)
    # Optional: binds :since = now - window, so "within 30 days" is written in the query.
    # :now (UTC) and :today (config timezone) are bound as in rule queries, unless a param.
    window: Duration | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _checked_name(value, "check")

    @field_validator("query")
    @classmethod
    def _sql(cls, value: str) -> str:
        return _check_sql(value)

    @model_validator(mode="after")
    def _params_used(self) -> CheckRule:
        for param in self.params:
            if not re.search(rf"(?<!:):{re.escape(param)}\b", self.query):
                raise ValueError(f"param {param} is not used in the query (write :{param})")
        if self.timeout <= timedelta(0):
            raise ValueError("timeout must be more than 0 (e.g. 200ms)")
        bound = set(self.params) | {"now", "today"}
        if self.window is not None:
            bound.add("since")
        if self.window is not None and "since" in self.params:
            raise ValueError("since is bound by window (now - window): remove it from params")
        for used in sorted(parameters(self.query) - bound):
            hint = " (or set window: to bind :since)" if used == "since" else ""
            raise ValueError(
                f"the query uses :{used}, which is not in params (the engine binds :now, "
                f":today){hint}"
            )
        if self.window is not None and "since" not in parameters(self.query):
            raise ValueError("window binds :since: use it in the query (AND placed_at >= :since)")
        return self


DAY_WINDOW = "day"  # a digest's window: the same calendar day in the customer's zone


def _digest_window(value: Any) -> Any:
    if value == DAY_WINDOW:
        return value
    if isinstance(value, str | int) and not isinstance(value, bool):
        try:
            found = sendtime.parse_duration(str(value))
        except ValueError as exc:
            raise ValueError(f"{exc}; or day (the same local day)") from None
        if found <= timedelta(0):
            raise ValueError("window must be more than 0 (e.g. 1d, 12h), or day")
        return found
    raise ValueError(f"{value!r} is not a window (a duration such as 1d or 12h, or day)")


def _max_items(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 2:
        return value
    raise ValueError(f"{value!r} is not allowed (max_items: a whole number, 2 or more)")


class Digest(_Placed):
    """Several of a customer's reminders sent as one message (``digests:`` beside ``rules:``).

    When the earliest of a customer's pending reminders of ``rules`` on a channel is sent, the
    others of theirs due within ``window`` of it (a duration, or ``day``: the same local day) go
    in the same message, at most ``max_items`` in all, rendered by ``template``.
    """

    name: Annotated[str, AfterValidator(lambda v: _checked_name(v, "digest"))]
    rules: list[str] = Field(min_length=1)
    window: Annotated[timedelta | Literal["day"], PlainValidator(_digest_window)]
    max_items: Annotated[int, PlainValidator(_max_items)] = 10
    template: str | None = None

    @property
    def template_name(self) -> str:
        return self.template or self.name


class _RuleFile(_Model):
    rules: list[dict[str, Any]] = Field(default_factory=list)
    checks: list[dict[str, Any]] = Field(default_factory=list)
    digests: list[dict[str, Any]] = Field(default_factory=list)


@dataclass(frozen=True)
class RuleSet:
    rules: list[Rule]
    checks: list[CheckRule]
    warnings: list[Problem]
    digests: list[Digest] = field(default_factory=list)

    @cached_property
    def _by_name(self) -> dict[str, Rule]:
        return {rule.name: rule for rule in self.rules}

    @cached_property
    def _digest_of(self) -> dict[str, Digest]:
        return {name: digest for digest in self.digests for name in digest.rules}

    def digest_of(self, rule: str) -> Digest | None:
        """The digest rule ``rule``'s reminders are gathered in, or None."""
        return self._digest_of.get(rule)

    def digest(self, name: str) -> Digest:
        """The digest named ``name``; raises :class:`RuleError` listing the digests there are."""
        for digest in self.digests:
            if digest.name == name:
                return digest
        known = ", ".join(d.name for d in self.digests) or "none"
        raise RuleError(Problem(f'no digest named "{name}" (digests: {known})'))

    def get(self, name: str) -> Rule | None:
        """The rule named ``name``, or None (a reminder may outlive its rule)."""
        return self._by_name.get(name)

    def rule(self, name: str) -> Rule:
        """The rule named ``name``; raises :class:`RuleError` listing the rules there are."""
        found = self.get(name)
        if found is not None:
            return found
        known = ", ".join(r.name for r in self.rules) or "none"
        raise RuleError(Problem(f'no rule named "{name}" (rules: {known})'))

    def check(self, name: str) -> CheckRule:
        for check in self.checks:
            if check.name == name:
                return check
        known = ", ".join(c.name for c in self.checks) or "none"
        raise RuleError(Problem(f'no check named "{name}" (checks: {known})'))


def rule_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
    return [path]


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def load_rules(config: Config) -> RuleSet:
    """Load and validate every rule file. Raises :class:`RuleError` listing every problem."""
    problems: list[Problem] = []
    warnings: list[Problem] = []
    rules: list[Rule] = []
    checks: list[CheckRule] = []
    digests: list[Digest] = []
    files: list[Path] = []
    for path in config.rules_paths:
        if not path.exists():
            shown = _display(path, config.root)
            raise RuleError(Problem(f"no rules at {shown} (config key rules)"))
        found = rule_files(path)
        if not found:
            raise RuleError(Problem(f"no *.yaml rule files in {_display(path, config.root)}"))
        files.extend(f for f in found if f not in files)
    for file in files:
        try:
            doc = load(file, _display(file, config.root))
        except YamlError as exc:
            problems.append(exc.problem)
            continue
        found_rules, found_checks, found_digests, file_problems = _load_file(doc, config, warnings)
        rules.extend(found_rules)
        checks.extend(found_checks)
        digests.extend(found_digests)
        problems.extend(file_problems)
    seen: dict[str, Rule | CheckRule | Digest] = {}
    items: list[Rule | CheckRule | Digest] = [*rules, *checks, *digests]
    for item in items:
        if item.name in seen:
            first = seen[item.name]
            problems.append(
                Problem(
                    f'name "{item.name}" is used twice (first at {first.file}:{first.line})',
                    item.file,
                    item.line,
                )
            )
        seen[item.name] = item
    problems.extend(_digest_problems(digests, rules))
    if problems:
        raise RuleError(problems)
    return RuleSet(rules, checks, warnings, digests)


def _digest_problems(digests: list[Digest], rules: list[Rule]) -> list[Problem]:
    """A digest naming a rule that does not exist, or a rule that two digests claim."""
    known = {rule.name for rule in rules}
    claimed: dict[str, Digest] = {}
    found = []
    for digest in digests:
        for name in digest.rules:
            where = digest.line_of("rules")
            if name not in known:
                found.append(
                    Problem(
                        f'digest {digest.name}: no rule named "{name}" '
                        f"(rules: {', '.join(sorted(known)) or 'none'})",
                        digest.file,
                        where,
                    )
                )
            elif name in claimed:
                first = claimed[name]
                found.append(
                    Problem(
                        f"digest {digest.name}: rule {name} is already in digest {first.name} "
                        f"({first.file}:{first.line}); a rule goes in one digest at most",
                        digest.file,
                        where,
                    )
                )
            else:
                claimed[name] = digest
    return found


def _load_file(
    doc: Document, config: Config, warnings: list[Problem]
) -> tuple[list[Rule], list[CheckRule], list[Digest], list[Problem]]:
    if doc.data is None:
        return [], [], [], [doc.problem((), "the file is empty (expected a rules: list)")]
    if not isinstance(doc.data, dict):
        return [], [], [], [doc.problem((), "expected a mapping with a rules: list")]
    try:
        _RuleFile.model_validate(doc.data)
    except ValidationError as exc:
        return [], [], [], doc.problems_from(exc, model=_RuleFile)
    problems: list[Problem] = []
    rules: list[Rule] = []
    checks: list[CheckRule] = []
    digests: list[Digest] = []
    kinds: tuple[tuple[str, type[_Model], list[Any]], ...] = (
        ("rules", Rule, rules),
        ("checks", CheckRule, checks),
        ("digests", Digest, digests),
    )
    for kind, model, out in kinds:
        for index, raw in enumerate(doc.data.get(kind) or []):
            where = (kind, index)
            if not isinstance(raw, dict):
                problems.append(doc.problem(where, f"{kind}[{index}]: expected a mapping of keys"))
                continue
            for reserved in ("file", "line", "lines"):
                if reserved in raw:
                    message = f"{reserved}: {unknown_key(model, (), reserved)}"
                    problems.append(doc.problem((*where, reserved), message, key=True))
            lines = {
                str(key): doc.key_lines.get((*where, key)) or doc.line((*where, key)) or 0
                for key in raw
            }
            if isinstance(raw.get("writeback"), dict):  # each statement's own line
                for event in raw["writeback"]:
                    path = (*where, "writeback", event)
                    lines[f"writeback.{event}"] = doc.line(path) or lines["writeback"]
            data = dict(raw, file=doc.file, line=doc.line(where) or 0, lines=lines)
            try:
                item = model.model_validate(data)
            except ValidationError as exc:
                label = raw.get("name") if isinstance(raw.get("name"), str) else f"{kind}[{index}]"
                for problem in doc.problems_from(exc, where, model):
                    problems.append(
                        Problem(
                            f"{kind[:-1]} {label}: {problem.message}", problem.file, problem.line
                        )
                    )
                continue
            out.append(item)
            if isinstance(item, Rule):
                problems.extend(_against_config(item, doc, where, config, warnings))
    return rules, checks, digests, problems


def _incremental_problems(rule: Rule, doc: Document, where: tuple[str | int, ...]) -> list[Problem]:
    """``incremental:`` and ``:since`` in the query go together."""
    uses_since = "since" in parameters(rule.query)
    if rule.incremental is not None and not uses_since:
        return [
            doc.problem(
                (*where, "incremental"),
                f"rule {rule.name}: incremental: the query does not use :since; select the "
                "changed rows with it (e.g. WHERE p.updated_at >= :since) or remove incremental",
                key=True,
            )
        ]
    if rule.incremental is None and uses_since:
        return [
            doc.problem(
                (*where, "query"),
                f"rule {rule.name}: query: :since is bound only for a rule with incremental: "
                "(e.g. incremental: {full_every: 1d, lookback: 10m}); add it or remove :since",
                key=True,
            )
        ]
    return []


def _against_config(
    rule: Rule, doc: Document, where: tuple[str | int, ...], config: Config, warnings: list[Problem]
) -> list[Problem]:
    problems = _incremental_problems(rule, doc, where)
    configured = config.channel_names
    for index, channel in enumerate(rule.channels):
        if channel not in configured:
            problems.append(
                doc.problem(
                    (*where, "channels", index),
                    f"rule {rule.name}: channel {channel} is not configured in {config.file} "
                    f"(configured: {', '.join(configured) or 'none'})",
                )
            )
    if rule.writeback and config.writeback is None:
        problems.append(
            doc.problem(
                (*where, "writeback"),
                f"rule {rule.name}: writeback needs a writable connection: set writeback.url in "
                f"{config.file} (a role of its own; source.url stays read-only)",
                key=True,
            )
        )
    if config.caps is None:
        for key, unused in (("priority", rule.priority != 0), ("caps", not rule.caps)):
            if unused:
                warnings.append(
                    doc.problem(
                        (*where, key),
                        f"rule {rule.name}: {key} has no effect without frequency caps "
                        "(config key caps, e.g. caps: {per_day: 2, per_week: 5})",
                        warning=True,
                    )
                )
    window = rule.send_window or config.send_window
    if rule.at is not None and not window.contains(rule.at):
        warnings.append(
            doc.problem(
                (*where, "at"),
                f"rule {rule.name}: at {rule.at:%H:%M} is outside the send window "
                f"{window.start:%H:%M}-{window.end:%H:%M}; day reminders move to the next opening",
                warning=True,
            )
        )
    return problems


# --- occurrence keys ----------------------------------------------------------------------------

_SIMPLE = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")
_sandbox = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


def key_columns(source: str) -> tuple[list[str], list[str]] | None:
    """The literal texts and column names of a simple occurrence template, else None.

    ``"{{ rx_id }}:{{ runs_out_on }}"`` is ``(["", ":", ""], ["rx_id", "runs_out_on"])``: the key
    is the literals with each column's text between them. A template with anything more than
    ``{{ column }}`` pieces (filters, expressions, tags) is not simple.
    """
    if "{%" in source or "{#" in source:
        return None
    pieces = _SIMPLE.split(source)
    literals = pieces[0::2]
    if len(pieces) < 2 or any("{{" in p or "}}" in p for p in literals):
        return None
    return literals, pieces[1::2]


def compile_key(source: str) -> Callable[[Mapping[str, Any]], str]:
    """Compile an occurrence template into a function of the row.

    ``{{ column }}`` pieces with literal text between them (the common case) are formatted
    directly, without Jinja, because the scan calls this for every row; anything else runs in
    Jinja's sandbox. A missing column raises ``KeyError``.
    """
    simple = key_columns(source)
    if simple is not None:
        literals, names = simple

        def fast(row: Mapping[str, Any]) -> str:
            out = [literals[0]]
            for name, literal in zip(names, literals[1:], strict=True):
                value = row[name]
                if value is None:
                    raise KeyError(name)
                out.append(str(value))
                out.append(literal)
            return "".join(out)

        return fast
    try:
        template = _sandbox.from_string(source)
    except TemplateSyntaxError as exc:
        raise ValueError(f'"{source}" is not a valid template: {exc.message}') from None
    if "{{" not in source and "{%" not in source:
        raise ValueError(
            f'"{source}" names no column; name the row\'s columns, e.g. "{{{{ rx_id }}}}" '
            "(a constant would make every row the same occurrence)"
        )

    def slow(row: Mapping[str, Any]) -> str:
        return template.render(dict(row)).strip()

    return slow
