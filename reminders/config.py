"""config.yaml: read once, validated into typed objects.

``${VAR}`` takes a value from the environment (a missing variable is an error naming it and its
line). Relative paths, SQLite URLs included, are relative to the config file's folder. Unknown keys
are errors. Secrets (the Twilio token, the SMTP password, ``REMINDERS_SECRET``) come only from the
environment.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from . import mysql, sendtime
from .errors import ConfigError, Problem
from .yamlfile import Document, YamlError, load, unknown_key

CONFIG_ENV = "REMINDERS_CONFIG"
DEFAULT_CONFIG = "config.yaml"
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _text(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


def _window(value: Any) -> Any:
    return sendtime.parse_window(value) if isinstance(value, str) else value


def _duration(value: Any) -> Any:
    return sendtime.parse_duration(_text(value)) if isinstance(value, str | int) else value


def _zone(value: Any) -> Any:
    if isinstance(value, str):
        sendtime.zone(value)  # raises ValueError with the name
    return value


def _locale(value: Any) -> Any:
    if isinstance(value, str):
        from . import locales

        tag = locales.normalize(value)
        if tag is None:
            raise ValueError(f'"{value}" is not a locale (examples: en, es, fr-CA, pt_BR)')
        return tag
    return value


Window = Annotated[sendtime.Window, BeforeValidator(_window)]
LocaleTag = Annotated[str, BeforeValidator(_locale)]
Duration = Annotated[timedelta, BeforeValidator(_duration)]
ZoneName = Annotated[str, BeforeValidator(_zone)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


class SourceConfig(_Model):
    url: str
    query_timeout: Duration | None = None


class StateConfig(_Model):
    url: str = "sqlite:///reminders.db"
    # How long a worker that sent messages keeps trying to record them while the state DB does
    # not answer; past it, it leaves them in Redis for the next dispatch to record.
    record_patience: Duration = timedelta(seconds=60)
    # How long finished reminders (with their messages and events), old replies and old scan runs
    # are kept, counted from their last change; the scheduler deletes what is older (see
    # reminders.prune). null: keep everything.
    retention: Duration | None = timedelta(days=180)


class RedisConfig(_Model):
    url: str | None = None


class SmsConfig(_Model):
    provider: Literal["twilio", "outbox"]
    account_sid: str | None = None
    auth_token: str | None = None
    from_: str | None = Field(default=None, alias="from")
    messaging_service_sid: str | None = None
    api_url: str | None = None
    quiet_hours: Window | None = sendtime.parse_window("21:00-08:00")
    rate_limit: float | None = Field(default=None, gt=0)
    max_segments: int = Field(default=3, ge=1)
    concurrency: int = Field(default=64, ge=1, le=512)
    # One request's connect and read timeout; past it the outcome is unknown (reconciled).
    timeout: Duration = timedelta(seconds=10)
    # How long after an unanswered send to wait before deciding from Twilio's records that it
    # was not sent (Twilio's own processing window), and sending it again.
    reconcile_after: Duration = timedelta(minutes=1)
    path: Path | None = None

    @field_validator("timeout", "reconcile_after")
    @classmethod
    def _positive(cls, value: timedelta) -> timedelta:
        if value <= timedelta(0):
            raise ValueError("must be more than 0 (e.g. 10s, 1m)")
        return value

    @model_validator(mode="after")
    def _provider_needs(self) -> SmsConfig:
        if self.provider == "twilio":
            missing = [k for k in ("account_sid", "auth_token") if not getattr(self, k)]
            if missing:
                raise ValueError(
                    f"provider twilio needs {' and '.join(missing)} "
                    "(e.g. account_sid: ${TWILIO_ACCOUNT_SID})"
                )
            if not self.from_ and not self.messaging_service_sid:
                raise ValueError("provider twilio needs from (a number) or messaging_service_sid")
        if self.provider == "outbox" and self.path is None:
            object.__setattr__(self, "path", Path("outbox.jsonl"))
        return self


class EmailConfig(_Model):
    provider: Literal["smtp", "outbox"]
    host: str = "127.0.0.1"
    port: int = Field(default=25, ge=1, le=65535)
    from_: str | None = Field(default=None, alias="from")
    username: str | None = None
    password: str | None = None
    security: Literal["none", "starttls", "ssl"] = "none"
    timeout: Duration = timedelta(seconds=10)
    quiet_hours: Window | None = None
    # Subject, text and HTML together, UTF-8; a larger message fails instead of being sent.
    max_bytes: int = Field(default=1_000_000, ge=1_000)
    # A message whose data went out without the server's answer may have been delivered; SMTP
    # has no way to ask. false: it is not resent (at most once; ops see it with its Message-ID);
    # true: it is resent once, reconcile_after later (at least once).
    resend_unknown: bool = False
    reconcile_after: Duration = timedelta(minutes=1)
    path: Path | None = None

    @model_validator(mode="after")
    def _provider_needs(self) -> EmailConfig:
        if self.provider == "smtp" and not self.from_:
            raise ValueError('provider smtp needs from (e.g. "Acme <care@example.com>")')
        # Caught here, not at the first message: the server would refuse every one of them.
        if self.provider == "smtp" and self.username and not self.password:
            raise ValueError(
                "provider smtp has a username but no password (e.g. password: ${SMTP_PASSWORD})"
            )
        if self.provider == "smtp" and self.password and not self.username:
            raise ValueError(
                "provider smtp has a password but no username (e.g. username: ${SMTP_USERNAME})"
            )
        if self.provider == "outbox" and self.path is None:
            object.__setattr__(self, "path", Path("outbox.jsonl"))
        return self


class ChannelsConfig(_Model):
    sms: SmsConfig | None = None
    email: EmailConfig | None = None


HelpText = Annotated[str, Field(max_length=320)]


def _help_texts(value: Any) -> Any:
    """One string means the default; a mapping's keys other than ``default`` are locales."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, dict):
        out = {}
        for key, text in value.items():
            tag = key if key == "default" else _locale(str(key))
            if tag in out:
                raise ValueError(f"{key}: the same locale is listed twice")
            out[tag] = text
        return out
    return value


def _word_list(value: Any) -> Any:
    from . import locales

    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        words = []
        for word in value:
            text = str(word).strip()
            if not re.match(r"^[^\W_]+$", text):
                raise ValueError(f'"{word}" is not a one-word keyword')
            words.append(locales.fold(text))
        return words
    return value


Words = Annotated[list[str], BeforeValidator(_word_list)]


class LanguageKeywords(_Model):
    """A language's own words for the engine's keywords, besides the English ones carriers
    require (STOP and synonyms, START/UNSTOP/YES, HELP/INFO), which always work."""

    stop: Words = []
    start: Words = []
    help: Words = []


class WebConfig(_Model):
    public_url: str | None = None
    # Shown on the customer's pages (unsubscribe, preferences).
    business_name: str | None = None
    # The answer to HELP/INFO: one text, or one a language ({default: ..., es: ...}).
    # Unset: an empty <Response/> (a Messaging Service answers itself).
    help_text: Annotated[dict[str, HelpText] | None, BeforeValidator(_help_texts)] = None
    # The answers to STOP, START and the rules' reply words, each like help_text (one text, or
    # one a language): stop, start (unset: an empty answer, as for HELP), done, snooze (may say
    # {later}), nothing_to_move, unknown (may say {words}: the rule's reply words). The engine
    # has English and Spanish texts of its own for done, snooze, nothing_to_move and unknown.
    reply_text: dict[
        Literal["stop", "start", "done", "snooze", "nothing_to_move", "unknown"],
        Annotated[dict[str, HelpText], BeforeValidator(_help_texts)],
    ] = {}
    # How long links in messages (unsubscribe, preferences) stay valid: unsubscribe requests
    # arrive late, and the law asks for at least 30 days.
    link_max_age: Duration = timedelta(days=90)

    @field_validator("public_url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f'"{value}" is not an http(s) URL')
        return value.rstrip("/") if value else value

    @field_validator("link_max_age")
    @classmethod
    def _link_age(cls, value: timedelta) -> timedelta:
        if value < timedelta(days=60):
            raise ValueError("links must stay valid at least 60 days (e.g. 90d)")
        return value


class ConsoleConfig(_Model):
    # A bearer key GET /metrics asks for (e.g. metrics_key: ${REMINDERS_METRICS_KEY}); unset,
    # /metrics answers anyone who reaches the console's internal port.
    metrics_key: str | None = Field(default=None, min_length=16)


class RetryConfig(_Model):
    max_attempts: int = Field(default=5, ge=1, le=100)
    backoff: Duration = timedelta(seconds=30)
    max_backoff: Duration = timedelta(hours=1)


class SchedulerConfig(_Model):
    scan_every: Duration = timedelta(minutes=5)
    dispatch_every: Duration = timedelta(seconds=10)


class ScanConfig(_Model):
    """What a scan may do on its own: ``max_cancel`` is the share of a rule's open reminders
    (when it has at least ``MASS_CANCEL_FLOOR``) that one scan may cancel because their
    occurrences vanished from the query; past it, the scan cancels none of them (see
    :mod:`reminders.scan`)."""

    max_cancel: float = Field(default=0.5, gt=0, le=1)


class CapsConfig(_Model):
    """Frequency caps: at most ``per_day`` and ``per_week`` messages to one customer, across every
    rule, counted in the customer's local days and weeks (weeks start on ``week_starts``).

    The messages beyond a cap are deferred, not dropped (see :mod:`reminders.caps`). A rule with
    ``caps: false`` is outside the caps: never deferred by them, and not counted.
    """

    per_day: int | None = Field(default=None, ge=1)
    per_week: int | None = Field(default=None, ge=1)
    week_starts: Literal["monday", "sunday"] = "monday"

    @model_validator(mode="after")
    def _some_cap(self) -> CapsConfig:
        if self.per_day is None and self.per_week is None:
            raise ValueError(
                "caps needs per_day or per_week (e.g. caps: {per_day: 2, per_week: 5})"
            )
        if self.per_day is not None and self.per_week is not None and self.per_week < self.per_day:
            raise ValueError(
                f"per_week ({self.per_week}) is less than per_day ({self.per_day}): "
                "a week holds at least a day"
            )
        return self


# What the engine tells the business: write-back statements and webhooks (reminders.outbox).
CONSENT_EVENTS = ("opted_out", "opted_in")
REMINDER_EVENTS = ("sent", "delivered", "failed", "canceled", "replied", "done")
WEBHOOK_TYPES = (
    *(f"reminder.{name}" for name in REMINDER_EVENTS),
    *(f"customer.{name}" for name in CONSENT_EVENTS),
)


def _consent_statement(value: Any) -> Any:
    if isinstance(value, str):
        from .outbox import CONSENT_BINDS, unknown_binds
        from .rules import check_statement

        value = check_statement(value)
        unknown = unknown_binds(value, CONSENT_BINDS)
        if unknown:
            raise ValueError(
                f":{unknown[0]} is not bound by opted_out and opted_in (they bind "
                f":{', :'.join(CONSENT_BINDS)})"
            )
    return value


ConsentStatement = Annotated[str, BeforeValidator(_consent_statement)]


class WritebackConfig(_Model):
    """``writeback:``: a writable connection to the business DB (a role of its own: scans and
    checks keep the read-only ``source.url``) and the statements run on consent changes."""

    url: str
    when: dict[Literal["opted_out", "opted_in"], ConsentStatement] = {}


class WebhookConfig(_Model):
    """One endpoint of ``webhooks:``: signed JSON POSTs of the events it names (``*``: all)."""

    url: str
    events: list[str] = Field(min_length=1)
    secret: str = Field(min_length=16)
    include_addresses: bool = False

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f'"{value}" is not an http(s) URL (https is recommended)')
        return value

    @field_validator("events")
    @classmethod
    def _types(cls, value: list[str]) -> list[str]:
        for name in value:
            if name != "*" and name not in WEBHOOK_TYPES:
                raise ValueError(
                    f'"{name}" is not an event type (types: {", ".join(WEBHOOK_TYPES)}, or "*")'
                )
        return value

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events


class Config(_Model):
    """The validated config. ``root`` is the folder relative paths are resolved against."""

    timezone: ZoneName = "UTC"
    # The locale of customers whose row names none or one without a template variant: its
    # variant is chosen before the default template (see reminders.locales).
    default_locale: LocaleTag | None = None
    send_window: Window = sendtime.parse_window("09:00-20:00")
    default_region: str = "US"
    source: SourceConfig
    state: StateConfig = StateConfig()
    redis: RedisConfig = RedisConfig()
    # A folder of *.yaml rule files, or one file, or a list of them (rules/ and a digest's file).
    rules: Path | list[Path] = Path("rules")
    templates: Path = Path("templates")
    channels: ChannelsConfig = ChannelsConfig()
    web: WebConfig = WebConfig()
    # Inbound SMS keywords per language ({es: {stop: [BAJA], start: [ALTA], help: [AYUDA]}}).
    keywords: dict[LocaleTag, LanguageKeywords] = {}
    console: ConsoleConfig = ConsoleConfig()
    requeue_after: Duration = timedelta(minutes=5)
    batch_size: int = Field(default=100, ge=1, le=10_000)
    retries: RetryConfig = RetryConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    scan: ScanConfig = ScanConfig()
    caps: CapsConfig | None = None  # unset: no frequency caps
    writeback: WritebackConfig | None = None  # unset: nothing is written to the business DB
    webhooks: list[WebhookConfig] = []
    # A file of NAME=value lines read into the environment at start (the environment wins): the
    # demo keeps its generated REMINDERS_SECRET there. Only its owner may read it (chmod 600).
    env_file: Path | None = None
    root: Path = Path(".")
    file: str = DEFAULT_CONFIG

    @field_validator("keywords")
    @classmethod
    def _keywords(cls, value: dict[str, LanguageKeywords]) -> dict[str, LanguageKeywords]:
        from .rules import HELP_WORDS, START_WORDS, STOP_WORDS

        meaning = {
            **dict.fromkeys(STOP_WORDS, "stop"),
            **dict.fromkeys(START_WORDS, "start"),
            **dict.fromkeys(HELP_WORDS, "help"),
        }
        for language, words in value.items():
            for action in ("stop", "start", "help"):
                for word in getattr(words, action):
                    said = meaning.setdefault(word, action)
                    if said != action:
                        raise ValueError(
                            f"{language}: {word} is a {action} word here but means {said} "
                            "elsewhere (a keyword means one thing in every language)"
                        )
        return value

    @field_validator("webhooks")
    @classmethod
    def _one_endpoint_a_url(cls, value: list[WebhookConfig]) -> list[WebhookConfig]:
        seen: set[str] = set()
        for hook in value:
            if hook.url in seen:
                raise ValueError(
                    f"{hook.url} is listed twice: list its events once (events: [...])"
                )
            seen.add(hook.url)
        return value

    @field_validator("default_region")
    @classmethod
    def _region(cls, value: str) -> str:
        import phonenumbers

        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f'"{value}" is not a region code (examples: US, GB, DE)')
        return value.upper()

    @field_validator("source", mode="before")
    @classmethod
    def _source(cls, value: Any) -> Any:
        if isinstance(value, dict) and not value.get("url"):
            raise ValueError(
                "source.url is required: the business database (e.g. sqlite:///shop.db)"
            )
        return value

    @property
    def channel_names(self) -> list[str]:
        return [name for name in ("sms", "email") if getattr(self.channels, name) is not None]

    def channel(self, name: str) -> SmsConfig | EmailConfig:
        found = getattr(self.channels, name, None)
        if found is None:
            raise ConfigError(Problem(f"channel {name} is not configured", self.file))
        return found

    @property
    def outbox_used(self) -> bool:
        """Whether anything leaves through the outbox (write-back or webhooks)."""
        return self.writeback is not None or bool(self.webhooks)

    @property
    def writeback_url(self) -> str | None:
        return None if self.writeback is None else resolve_url(self.writeback.url, self.root)

    @property
    def state_url(self) -> str:
        return resolve_url(self.state.url, self.root)

    @cached_property
    def source_url(self) -> str:
        return resolve_url(self.source.url, self.root)  # parsed once: every check asks for it

    @property
    def rules_path(self) -> Path:
        """The first (usually the one) place of rules."""
        return self.rules_paths[0]

    @property
    def rules_paths(self) -> list[Path]:
        """Every place of rules: a folder or a file each, in the order given."""
        found = self.rules if isinstance(self.rules, list) else [self.rules]
        return [self.root / path for path in found] or [self.root / "rules"]

    @property
    def templates_path(self) -> Path:
        return self.root / self.templates

    def path(self, relative: Path) -> Path:
        return relative if relative.is_absolute() else self.root / relative

    @property
    def data_dir(self) -> Path:
        """The engine's own folder beside the config (embedded Redis data, locks)."""
        return self.root / ".reminders"

    def quiet_hours(self, channel: str) -> sendtime.Window | None:
        cfg = getattr(self.channels, channel, None)
        return cfg.quiet_hours if cfg is not None else None

    def tz(self) -> Any:
        return sendtime.zone(self.timezone)


def retention_text(value: timedelta) -> str:
    """A retention as written in the config: whole days (``180d``), else seconds."""
    if value % timedelta(days=1):
        return f"{int(value.total_seconds())}s"
    return f"{value.days}d"


def resolve_url(url: str, root: Path) -> str:
    """Make a relative SQLite URL relative to ``root``; other URLs pass unchanged."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:" and not database.startswith("file:"):
            path = Path(database)
            if not path.is_absolute():
                parsed = parsed.set(database=str((root / path).resolve()))
        return parsed.render_as_string(hide_password=False)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _substitute(doc: Document, env: dict[str, str]) -> list[Problem]:
    """Replace ``${VAR}`` in every string, in place; return a problem per missing variable."""
    problems: list[Problem] = []

    def walk(value: Any, path: tuple[str | int, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*path, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*path, i)) for i, v in enumerate(value)]
        if isinstance(value, str) and "${" in value:

            def repl(match: re.Match[str]) -> str:
                name = match.group(1)
                if name not in env:
                    problems.append(doc.problem(path, f"environment variable {name} is not set"))
                    return ""
                return env[name]

            return _VAR.sub(repl, value)
        return value

    doc.data = walk(doc.data, ())
    return problems


def _plain_secrets(doc: Document) -> list[Problem]:
    """A webhook secret written into the file instead of read from the environment."""
    hooks = doc.data.get("webhooks") if isinstance(doc.data, dict) else None
    found = []
    for index, hook in enumerate(hooks if isinstance(hooks, list) else []):
        secret = hook.get("secret") if isinstance(hook, dict) else None
        if isinstance(secret, str) and not _VAR.fullmatch(secret.strip()):
            found.append(
                doc.problem(
                    ("webhooks", index, "secret"),
                    f"webhooks[{index}].secret: read it from the environment "
                    "(secret: ${REMINDERS_WEBHOOK_SECRET}), never from the file",
                )
            )
    return found


_ENV_LINE = re.compile(r"^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$")


def read_env_file(doc: Document, root: Path) -> dict[str, str]:
    """The variables of the config's ``env_file`` (``NAME=value`` lines, ``#`` comments, values
    optionally quoted: the format of systemd's ``EnvironmentFile``)."""
    value = doc.data["env_file"]
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(doc.problem(("env_file",), "env_file: a file name (e.g. .env)"))
    path = Path(value) if Path(value).is_absolute() else root / value
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(doc.problem(("env_file",), f"env_file: {path} does not exist")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            doc.problem(("env_file",), f"env_file: cannot read {path}: {exc}")
        ) from None
    if mode & 0o077:
        raise ConfigError(
            doc.problem(
                ("env_file",),
                f"env_file: {path} holds secrets but others may read it "
                f"(mode {mode & 0o777:o}): chmod 600 {path}",
            )
        )
    found: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _ENV_LINE.match(line)
        if match is None:
            # The line itself is not shown: it may hold a secret.
            raise ConfigError(Problem("not a NAME=value line", str(path), number))
        name, item = match.group(1), match.group(2).strip()
        if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
            item = item[1:-1]
        found[name] = item
    return found


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Where the config is: ``-c`` wins, then ``REMINDERS_CONFIG``, then ./config.yaml."""
    return Path(explicit or os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)


def load_config(
    path: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> Config:
    """Read, substitute and validate a config file; :class:`ConfigError` lists every problem."""
    file = config_path(path)
    display = str(file)
    if not file.exists():
        raise ConfigError(
            Problem(f"no config file here (pass -c PATH or set {CONFIG_ENV})", display)
        )
    try:
        doc = load(file, display)
    except YamlError as exc:
        raise ConfigError(exc.problem) from None
    if not isinstance(doc.data, dict):
        raise ConfigError(doc.problem((), "the config must be a mapping of keys (see README)"))
    environment = dict(os.environ) if env is None else dict(env)
    env_file = doc.data.get("env_file")
    if env_file is not None:
        found = read_env_file(doc, file.resolve().parent)
        for name, value in found.items():
            environment.setdefault(name, value)
            if env is None:
                # Links are signed with REMINDERS_SECRET read from the environment, by this
                # process and the workers it starts: the file's values join it (never replace).
                os.environ.setdefault(name, value)
    problems = _plain_secrets(doc)
    problems += _substitute(doc, environment)
    if problems:
        raise ConfigError(problems)
    for reserved in ("root", "file"):
        if reserved in doc.data:
            message = f"{reserved}: {unknown_key(Config, (), reserved)}"
            raise ConfigError(doc.problem((reserved,), message, key=True))
    data = dict(doc.data, root=file.resolve().parent, file=display)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(doc.problems_from(exc, model=Config)) from None
    for key, url in (("source", config.source.url), ("state", config.state.url)):
        try:
            make_url(url)
        except ArgumentError:
            raise ConfigError(
                doc.problem(
                    (key, "url"), f'{key}.url: "{url}" is not a database URL (e.g. sqlite:///x.db)'
                )
            ) from None
    kept, links = config.state.retention, config.web.link_max_age
    if kept is not None and kept < links:
        raise ConfigError(
            doc.problem(
                ("state", "retention"),
                f"state.retention ({retention_text(kept)}) is shorter than web.link_max_age "
                f"({retention_text(links)}): an unsubscribe link finds its address among the "
                "messages sent, so they are kept while a link is valid (e.g. retention: 180d)",
            )
        )
    if mysql.is_mysql(config.state.url):
        raise ConfigError(doc.problem(("state", "url"), f"state.url: {mysql.STATE_UNSUPPORTED}"))
    return config
