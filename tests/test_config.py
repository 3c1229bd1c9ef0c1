"""config.yaml: every problem names the file and line; paths are relative to the config's folder."""

from __future__ import annotations

import os
from datetime import time, timedelta
from pathlib import Path

import pytest

from reminders.config import config_path, load_config, resolve_url
from reminders.errors import ConfigError

BASE = "source:\n  url: sqlite:///business.db\n"


def _load(tmp_path: Path, text: str, env: dict[str, str] | None = None, name: str = "config.yaml"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return load_config(path, env=env or {})


def _problem(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text, env)
    return str(err.value).replace(str(tmp_path / "config.yaml"), "config.yaml")


def test_the_documented_example_loads(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        """\
timezone: America/New_York
send_window: "09:00-20:00"
source:
  url: sqlite:///business.db
state:
  url: sqlite:///reminders.db
redis:
  url: redis://127.0.0.1:6379/0
rules: rules/
templates: templates/
channels:
  sms:
    provider: twilio
    account_sid: ${TWILIO_ACCOUNT_SID}
    auth_token: ${TWILIO_AUTH_TOKEN}
    from: "+15005550006"
    api_url: http://127.0.0.1:4010
    quiet_hours: "21:00-08:00"
    rate_limit: 1
  email:
    provider: smtp
    host: 127.0.0.1
    port: 1025
    from: "Acme Pharmacy <care@example.com>"
web:
  public_url: https://reminders.example.com/
""",
        env={"TWILIO_ACCOUNT_SID": "AC123", "TWILIO_AUTH_TOKEN": "secret"},
    )
    assert config.timezone == "America/New_York"
    assert (config.send_window.start, config.send_window.end) == (time(9), time(20))
    assert config.channel_names == ["sms", "email"]
    sms = config.channels.sms
    assert sms is not None
    assert (sms.account_sid, sms.auth_token, sms.from_) == ("AC123", "secret", "+15005550006")
    assert sms.quiet_hours is not None and sms.quiet_hours.start == time(21)
    assert config.channels.email is not None and config.channels.email.port == 1025
    assert config.web.public_url == "https://reminders.example.com"
    assert config.redis.url == "redis://127.0.0.1:6379/0"


def test_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, BASE)
    assert config.timezone == "UTC"
    assert (config.send_window.start, config.send_window.end) == (time(9), time(20))
    assert config.requeue_after == timedelta(minutes=5)
    assert config.redis.url is None
    assert config.channel_names == []
    assert config.state_url == f"sqlite:///{tmp_path.resolve() / 'reminders.db'}"


def test_relative_paths_are_relative_to_the_config_folder_not_the_working_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = _load(
        tmp_path,
        BASE + "state:\n  url: sqlite:///data/state.db\nrules: my-rules\ntemplates: tpl/\n"
        "channels:\n  sms:\n    provider: outbox\n    path: out/sms.jsonl\n",
        name="project/config.yaml",
    )
    project = (tmp_path / "project").resolve()
    assert config.source_url == f"sqlite:///{project / 'business.db'}"
    assert config.state_url == f"sqlite:///{project / 'data' / 'state.db'}"
    assert config.rules_path.resolve() == project / "my-rules"
    assert config.templates_path.resolve() == project / "tpl"
    sms = config.channels.sms
    assert sms is not None and sms.path is not None
    assert config.path(sms.path).resolve() == project / "out" / "sms.jsonl"


def test_absolute_paths_and_other_databases_pass_unchanged(tmp_path: Path) -> None:
    assert resolve_url("sqlite:////var/db/x.db", tmp_path) == "sqlite:////var/db/x.db"
    assert resolve_url("sqlite://", tmp_path) == "sqlite://"
    assert (
        resolve_url("postgresql://u:p%40ss@db:5432/shop", tmp_path)
        == "postgresql+psycopg://u:p%40ss@db:5432/shop"
    )


def test_environment_variables_are_substituted(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "source:\n  url: postgresql://shop:${DB_PASSWORD}@db/shop\n",
        env={"DB_PASSWORD": "s3cret"},
    )
    assert config.source_url == "postgresql+psycopg://shop:s3cret@db/shop"


def test_the_process_environment_is_read_by_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDERS_TEST_ZONE", "Europe/Berlin")
    (tmp_path / "config.yaml").write_text(BASE + "timezone: ${REMINDERS_TEST_ZONE}\n")
    assert load_config(tmp_path / "config.yaml").timezone == "Europe/Berlin"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            BASE + "channels:\n  sms:\n    provider: twilio\n    account_sid: ${SID}\n"
            "    auth_token: ${TOKEN}\n    from: '+15005550006'\n",
            "config.yaml:6: environment variable SID is not set\n"
            "config.yaml:7: environment variable TOKEN is not set",
        ),
        (
            BASE + "colour: blue\n",
            "config.yaml:3: colour: unknown key (allowed: timezone, default_locale, send_window, "
            "default_region, source, state, redis, rules, templates, channels, web, keywords, "
            "console, requeue_after, batch_size, retries, scheduler, scan, caps, writeback, "
            "webhooks, env_file)",
        ),
        (
            BASE + "channels:\n  email:\n    provider: outbox\n    pth: x.jsonl\n",
            "config.yaml:6: channels.email.pth: unknown key",
        ),
        (
            BASE + "root: /etc\n",
            "config.yaml:3: root: unknown key",
        ),
        (
            BASE + 'send_window: "9-17"\n',
            'config.yaml:3: send_window: "9-17" is not a time window '
            "(expected HH:MM-HH:MM, e.g. 09:00-20:00)",
        ),
        (
            BASE + "send_window: 09:00-09:00\n",
            'config.yaml:3: send_window: "09:00-09:00" is not a time window: it starts and ends',
        ),
        (
            BASE + "channels:\n  sms:\n    provider: outbox\n    quiet_hours: 21-8\n",
            'config.yaml:6: channels.sms.quiet_hours: "21-8" is not a time window',
        ),
        (
            "timezone: Mars/Olympus\n" + BASE,
            'config.yaml:1: timezone: unknown time zone "Mars/Olympus"',
        ),
        (
            BASE + "requeue_after: 5 minutes\n",
            'config.yaml:3: requeue_after: "5 minutes" is not a duration',
        ),
        (
            "timezone: UTC\n",
            "config.yaml:1: source: required key is missing",
        ),
        (
            "source:\n  url: ''\n",
            "config.yaml:2: source: source.url is required: the business database",
        ),
        (
            "source:\n  url: not a url\n",
            'config.yaml:2: source.url: "not a url" is not a database URL (e.g. sqlite:///x.db)',
        ),
        (
            BASE + "state:\n  url: mysql://reminders@db/reminders\n",
            "config.yaml:4: state.url: MySQL and MariaDB can hold the business DB (source.url) "
            "but not the engine's own tables: use SQLite or PostgreSQL for state.url",
        ),
        (
            BASE + "state:\n  url: mariadb+pymysql://reminders@db/reminders\n",
            "config.yaml:4: state.url: MySQL and MariaDB can hold the business DB",
        ),
        (
            BASE + "channels:\n  sms:\n    provider: nexmo\n",
            "config.yaml:5: channels.sms.provider: Input should be 'twilio' or 'outbox' "
            "(got 'nexmo')",
        ),
        (
            BASE + "channels:\n  sms:\n    provider: twilio\n",
            "config.yaml:5: channels.sms: provider twilio needs account_sid and auth_token",
        ),
        (
            BASE + "channels:\n  email:\n    provider: smtp\n    from: a@b.c\n    username: ann\n",
            "config.yaml:5: channels.email: provider smtp has a username but no password "
            "(e.g. password: ${SMTP_PASSWORD})",
        ),
        (
            BASE + "web:\n  public_url: example.com\n",
            'config.yaml:4: web.public_url: "example.com" is not an http(s) URL',
        ),
        (
            BASE + "source:\n  url: sqlite:///other.db\n",
            "config.yaml:3: duplicate key 'source'",
        ),
        (
            "source:\n  url: sqlite:///b.db\n bad: [\n",
            "config.yaml:3: not valid YAML: ",
        ),
        ("- a\n- b\n", "config.yaml:1: the config must be a mapping of keys"),
        ("", "config.yaml:1: the config must be a mapping of keys"),
    ],
    ids=[
        "missing-var",
        "unknown-key",
        "unknown-nested-key",
        "reserved-key",
        "bad-window",
        "empty-window",
        "bad-quiet-hours",
        "bad-zone",
        "bad-duration",
        "no-source",
        "no-source-url",
        "bad-url",
        "mysql-state",
        "mariadb-state",
        "bad-provider",
        "twilio-without-credentials",
        "smtp-username-without-password",
        "bad-public-url",
        "duplicate-key",
        "yaml-syntax",
        "not-a-mapping",
        "empty",
    ],
)
def test_each_problem_names_the_file_and_line(tmp_path: Path, text: str, expected: str) -> None:
    assert _problem(tmp_path, text).startswith(expected)


def test_every_problem_is_reported_not_only_the_first(tmp_path: Path) -> None:
    message = _problem(tmp_path, BASE + "colour: blue\ntimezone: Nowhere/Land\n")
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("config.yaml:3: colour: unknown key")
    assert lines[1].startswith('config.yaml:4: timezone: unknown time zone "Nowhere/Land"')


def test_a_missing_config_file_says_how_to_name_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no config file here \(pass -c PATH or set"):
        load_config(tmp_path / "nope.yaml")


def test_the_config_path_comes_from_the_option_then_the_environment_then_the_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert config_path(None) == Path("config.yaml")
    monkeypatch.setenv("REMINDERS_CONFIG", "/srv/env.yaml")
    assert config_path(None) == Path("/srv/env.yaml")
    assert config_path("given.yaml") == Path("given.yaml")
    assert os.environ["REMINDERS_CONFIG"] == "/srv/env.yaml"


def test_an_unconfigured_channel_is_named(tmp_path: Path) -> None:
    config = _load(tmp_path, BASE)
    with pytest.raises(ConfigError, match="channel sms is not configured"):
        config.channel("sms")


def test_unquoted_times_are_read_as_times_not_sexagesimal_numbers(tmp_path: Path) -> None:
    """YAML 1.1 reads 21:00 as the number 75600; the config means the time of day."""
    config = _load(
        tmp_path, BASE + "channels:\n  sms:\n    provider: outbox\n    quiet_hours: 21:00-8:00\n"
    )
    sms = config.channels.sms
    assert sms is not None and sms.quiet_hours is not None
    assert (sms.quiet_hours.start, sms.quiet_hours.end) == (time(21), time(8))


def _env_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / ".env"
    path.write_text(text)
    path.chmod(mode)
    return path


def test_an_env_file_joins_the_environment_which_wins(tmp_path: Path) -> None:
    _env_file(
        tmp_path,
        "# secrets\nexport TOKEN=\"from-file\"\nFROM=+15005550006\n\nONLY_FILE='quoted value'\n",
    )
    config = _load(
        tmp_path,
        BASE + "env_file: .env\nweb: {public_url: 'https://x.example/${ONLY_FILE}', "
        "help_text: '${TOKEN} ${FROM}'}\n",
        env={"TOKEN": "from-environment"},
    )
    assert config.web.help_text == {"default": "from-environment +15005550006"}
    assert config.web.public_url == "https://x.example/quoted value"


def test_an_env_file_sets_what_the_process_environment_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REMINDERS_TEST_ENV_FILE_SET", "kept")
    monkeypatch.setenv("REMINDERS_TEST_ENV_FILE_NEW", "placeholder")
    monkeypatch.delenv("REMINDERS_TEST_ENV_FILE_NEW")  # restored as absent after the test
    _env_file(tmp_path, "REMINDERS_TEST_ENV_FILE_SET=replaced\nREMINDERS_TEST_ENV_FILE_NEW=new\n")
    (tmp_path / "config.yaml").write_text(BASE + "env_file: .env\n")
    load_config(tmp_path / "config.yaml")
    assert os.environ["REMINDERS_TEST_ENV_FILE_SET"] == "kept"
    assert os.environ["REMINDERS_TEST_ENV_FILE_NEW"] == "new"


def test_an_env_file_others_may_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    path = _env_file(tmp_path, "REMINDERS_SECRET=x\n", mode=0o644)
    message = _problem(tmp_path, BASE + "env_file: .env\n")
    assert message == (
        f"config.yaml:3: env_file: {path} holds secrets but others may read it (mode 644): "
        f"chmod 600 {path}"
    )


def test_a_missing_env_file_or_a_bad_line_is_named_without_its_value(tmp_path: Path) -> None:
    assert _problem(tmp_path, BASE + "env_file: nowhere.env\n") == (
        f"config.yaml:3: env_file: {tmp_path / 'nowhere.env'} does not exist"
    )
    path = _env_file(tmp_path, "OK=1\nthis is the secret-ish line\n")
    message = _problem(tmp_path, BASE + "env_file: .env\n")
    assert message == f"{path}:2: not a NAME=value line"


def test_an_unknown_key_names_the_nearest_and_the_allowed_ones(tmp_path: Path) -> None:
    message = _problem(
        tmp_path,
        BASE + "timezon: UTC\nweb:\n  business: Acme\nchannels:\n  sms:\n"
        "    provider: outbox\n    ratelimit: 1\n",
    )
    assert message.splitlines() == [
        "config.yaml:3: timezon: unknown key; did you mean timezone? (allowed: timezone, "
        "default_locale, send_window, default_region, source, state, redis, rules, templates, "
        "channels, web, keywords, console, requeue_after, batch_size, retries, scheduler, scan, "
        "caps, writeback, webhooks, env_file)",
        "config.yaml:5: web.business: unknown key; did you mean business_name? (allowed: "
        "public_url, business_name, help_text, reply_text, link_max_age)",
        "config.yaml:9: channels.sms.ratelimit: unknown key; did you mean rate_limit? (allowed: "
        "provider, account_sid, auth_token, from, messaging_service_sid, api_url, quiet_hours, "
        "rate_limit, max_segments, concurrency, timeout, reconcile_after, path)",
    ]
