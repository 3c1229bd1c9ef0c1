"""Rule files: loaded whole or not at all, every problem with its file and line."""

from __future__ import annotations

from datetime import date, time, timedelta

import pytest

from reminders.config import load_config
from reminders.errors import RuleError
from reminders.rules import Reply, RuleSet, compile_key, load_rules
from tests.rules_fixtures import REFILLS, Project, lite

__all__ = ["lite"]


def _load(project: Project) -> RuleSet:
    return load_rules(load_config(project.root / "config.yaml"))


def _problems(project: Project, rules: str) -> list[str]:
    project.write("rules/refills.yaml", rules)
    with pytest.raises(RuleError) as err:
        _load(project)
    return [str(p) for p in err.value.problems]


def _after_due(extra: str) -> str:
    """The default rule with ``extra`` lines inserted after its ``due:`` line (line 11)."""
    return REFILLS.replace("    due: runs_out_on\n", "    due: runs_out_on\n" + extra)


def test_the_default_rule_loads_with_its_values(lite: Project) -> None:
    ruleset = _load(lite)
    (rule,) = ruleset.rules
    assert rule.name == "refill-due"
    assert [o.text for o in rule.offsets] == ["-3d", "0d"]
    assert rule.at == time(10)
    assert rule.grace == timedelta(days=1)
    assert rule.channels == ["sms", "email"]
    assert (rule.file, rule.line) == ("rules/refills.yaml", 2)
    assert ruleset.warnings == []
    assert "SELECT rx.id" in rule.query and not rule.query.endswith("\n")


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        (
            REFILLS.replace("[-3d, 0d]", "[-3d, 3 dayz]"),
            'rules/refills.yaml:12: rule refill-due: offsets[1]: "3 dayz" is not an offset '
            "(examples: -3d, 2w, -1mo, 0d)",
        ),
        (
            _after_due("    offest: [1d]\n"),
            "rules/refills.yaml:12: rule refill-due: offest: unknown key",
        ),
        (
            _after_due("    extras:\n      a: 1\n"),
            "rules/refills.yaml:12: rule refill-due: extras: unknown key",
        ),
        (
            _after_due("    customer:\n      mobile: phone\n"),
            'rules/refills.yaml:13: rule refill-due: customer: "mobile" is not a customer field',
        ),
        (
            REFILLS.replace("refill-due\n    desc", "Refill_Due\n    desc"),
            'rules/refills.yaml:2: rule Refill_Due: name: "Refill_Due" is not a rule name '
            "(lowercase letters, digits and -)",
        ),
        (
            REFILLS.replace("[sms, email]", "[sms, fax]"),
            'rules/refills.yaml:14: rule refill-due: channels: "fax" is not a channel '
            "(allowed: sms, email)",
        ),
        (
            _after_due('    send_window: "9 to 5"\n'),
            'rules/refills.yaml:12: rule refill-due: send_window: "9 to 5" is not a time window',
        ),
        (
            REFILLS.replace('    at: "10:00"\n', "    at: 1000\n"),
            "rules/refills.yaml:13: rule refill-due: at: 1000 is not a time of day "
            '(write it quoted, e.g. at: "10:00")',
        ),
        (
            REFILLS.replace('    at: "10:00"\n', "    at: 25:00\n"),
            'rules/refills.yaml:13: rule refill-due: at: "25:00" is not a time of day',
        ),
        (
            REFILLS.replace('"{{ rx_id }}"', '"{{ rx_id "'),
            "rules/refills.yaml:10: rule refill-due: occurrence: ",
        ),
        (
            REFILLS.replace('"{{ rx_id }}"', '"same"'),
            'rules/refills.yaml:10: rule refill-due: occurrence: "same" names no column',
        ),
        (
            REFILLS.replace("ORDER BY rx.id", "ORDER BY rx.id; DELETE FROM patients"),
            "rules/refills.yaml:4: rule refill-due: query: one statement only",
        ),
        (
            REFILLS.replace("    due: runs_out_on\n", ""),
            "rules/refills.yaml:2: rule refill-due: due: required key is missing",
        ),
        (
            REFILLS.replace("    due: runs_out_on\n", "    due: runs out\n"),
            'rules/refills.yaml:11: rule refill-due: due: "runs out" is not a column name',
        ),
        (
            _after_due("    recurrence: FREQ=SOMETIMES\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=SOMETIMES" is not an '
            "RFC 5545 RRULE",
        ),
        (
            _after_due("    recurrence: FREQ=MONTHLY;BYMONTHDAY=32\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=MONTHLY;BYMONTHDAY=32": '
            "BYMONTHDAY=32 is out of range (1 to 31, or -31 to -1 counting from the month's end)",
        ),
        (
            _after_due("    recurrence: FREQ=YEARLY;BYMONTH=13\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=YEARLY;BYMONTH=13": '
            "BYMONTH=13 is out of range (1 to 12)",
        ),
        (
            _after_due("    recurrence: FREQ=YEARLY;BYMONTH=2;BYMONTHDAY=30\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=YEARLY;BYMONTH=2;'
            'BYMONTHDAY=30": never yields a date',
        ),
        (
            _after_due("    recurrence: FREQ=DAILY;BYHOUR=24\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=DAILY;BYHOUR=24": '
            "BYHOUR=24 is out of range (0 to 23)",
        ),
        (
            _after_due("    recurrence: FREQ=MONTHLY;DTSTART=20270101T000000\n"),
            'rules/refills.yaml:12: rule refill-due: recurrence: "FREQ=MONTHLY;'
            'DTSTART=20270101T000000" is not an RFC 5545 RRULE',
        ),
        (
            _after_due("    grace: 1 day\n"),
            'rules/refills.yaml:12: rule refill-due: grace: "1 day" is not a duration',
        ),
        (
            _after_due("    replies:\n      LATER: snooze soon\n"),
            "rules/refills.yaml:13: rule refill-due: replies.LATER: snooze needs a delay",
        ),
        (
            _after_due("    replies:\n      STOP: done\n"),
            "rules/refills.yaml:13: rule refill-due: replies: STOP is the engine's own keyword",
        ),
        (
            REFILLS.replace("[-3d, 0d]", "[-3d, -3d]"),
            "rules/refills.yaml:12: rule refill-due: offsets: offset -3d is listed twice",
        ),
        (
            REFILLS.replace("rules:", "rulez:"),
            "rules/refills.yaml:1: rulez: unknown key",
        ),
        (
            REFILLS.replace('    at: "10:00"\n', '    at: "10:00\n'),
            "rules/refills.yaml:16: not valid YAML: found unexpected end of stream "
            "(while scanning a quoted scalar, from line 13)",
        ),
        (
            REFILLS.replace("    offsets:", "  offsets:"),
            "rules/refills.yaml:12: not valid YAML: ",
        ),
        ("", "rules/refills.yaml:1: the file is empty (expected a rules: list)"),
        ("- a\n", "rules/refills.yaml:1: expected a mapping with a rules: list"),
    ],
    ids=[
        "bad-offset",
        "unknown-key",
        "unknown-key-with-a-block",
        "unknown-customer-field",
        "bad-name",
        "unknown-channel",
        "bad-window",
        "at-a-number",
        "at-not-a-time",
        "occurrence-syntax",
        "occurrence-constant",
        "two-statements",
        "no-due",
        "due-not-a-column",
        "bad-rrule",
        "rrule-bymonthday-32",
        "rrule-bymonth-13",
        "rrule-no-date",
        "rrule-byhour-24",
        "rrule-dtstart",
        "bad-grace",
        "bad-reply",
        "reserved-reply",
        "offset-twice",
        "unknown-top-key",
        "unterminated-quote",
        "bad-indent",
        "empty-file",
        "not-a-mapping",
    ],
)
def test_each_problem_names_the_file_and_line(lite: Project, rules: str, expected: str) -> None:
    problems = _problems(lite, rules)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems[0]


def test_every_rule_and_every_file_is_checked_before_failing(lite: Project) -> None:
    lite.write("rules/a.yaml", REFILLS.replace("refill-due", "rule-a").replace("-3d,", "-3 d,"))
    problems = _problems(lite, REFILLS.replace("[sms, email]", "[sms, pager]"))
    assert [p.split(":")[0:2] for p in problems] == [
        ["rules/a.yaml", "12"],
        ["rules/refills.yaml", "14"],
    ]


def test_duplicate_names_across_files_name_both_places(lite: Project) -> None:
    lite.write("rules/more.yaml", "\n\n" + REFILLS)
    assert _problems(lite, REFILLS) == [
        'rules/refills.yaml:2: name "refill-due" is used twice (first at rules/more.yaml:4)'
    ]


def test_a_channel_the_config_does_not_configure_is_named(lite: Project) -> None:
    lite.write_config(
        "source:\n  url: {source}\nstate:\n  url: {state}\n"
        "channels:\n  sms:\n    provider: outbox\n"
    )
    assert _problems(lite, REFILLS) == [
        "rules/refills.yaml:14: rule refill-due: channel email is not configured in "
        f"{lite.root / 'config.yaml'} (configured: sms)"
    ]


def test_an_unquoted_time_of_day_means_that_time(lite: Project) -> None:
    """YAML 1.1 reads ``at: 10:00`` as the number 600; the rule means ten o'clock."""
    lite.write("rules/refills.yaml", REFILLS.replace('at: "10:00"', "at: 10:00"))
    assert _load(lite).rules[0].at == time(10)
    lite.write("rules/refills.yaml", REFILLS.replace('at: "10:00"', "at: 9:30"))
    assert _load(lite).rules[0].at == time(9, 30)


def test_at_outside_the_send_window_is_a_warning_not_an_error(lite: Project) -> None:
    lite.write("rules/refills.yaml", REFILLS.replace('at: "10:00"', 'at: "07:30"'))
    ruleset = _load(lite)
    assert len(ruleset.rules) == 1
    assert [str(w) for w in ruleset.warnings] == [
        "rules/refills.yaml:13: warning: rule refill-due: at 07:30 is outside the send window "
        "09:00-20:00; day reminders move to the next opening"
    ]


def test_no_rules_folder_and_no_rule_files_are_errors(lite: Project) -> None:
    (lite.root / "rules" / "refills.yaml").unlink()
    with pytest.raises(RuleError, match=r"no \*\.yaml rule files in rules"):
        _load(lite)
    (lite.root / "rules").rmdir()
    with pytest.raises(RuleError, match=r"no rules at rules \(config key rules\)"):
        _load(lite)


def test_rules_may_be_one_file(lite: Project) -> None:
    config = lite.read("config.yaml").replace("rules: rules/", "rules: rules/refills.yaml")
    lite.write("config.yaml", config)
    assert [r.name for r in _load(lite).rules] == ["refill-due"]


def test_replies_customer_mapping_recurrence_and_checks(lite: Project) -> None:
    lite.write(
        "rules/refills.yaml",
        _after_due(
            "    customer: {id: patient_id, phone: mobile}\n"
            "    recurrence: FREQ=MONTHLY;BYMONTHDAY=1\n"
            "    replies:\n      done: done\n      Later: snooze 1d\n"
        )
        + """\
checks:
  - name: already-owned
    query: SELECT id FROM orders WHERE customer_id = :customer_id AND sku = :sku
    params: {customer_id: int, sku: str}
    timeout: 150ms
""",
    )
    ruleset = _load(lite)
    rule = ruleset.rules[0]
    assert rule.columns["id"] == "patient_id" and rule.columns["phone"] == "mobile"
    assert rule.columns["email"] == "email"
    assert rule.replies == {"DONE": Reply("done"), "LATER": Reply("snooze", timedelta(days=1))}
    assert rule.recurrence == "FREQ=MONTHLY;BYMONTHDAY=1"
    check = ruleset.check("already-owned")
    assert check.params == {"customer_id": "int", "sku": "str"}
    assert check.timeout == timedelta(milliseconds=150)


def test_a_check_param_the_query_does_not_use_is_an_error(lite: Project) -> None:
    problems = _problems(
        lite,
        REFILLS + "checks:\n  - name: c\n    query: SELECT 1 WHERE x = :a\n"
        "    params: {a: int, b: str}\n",
    )
    assert problems == [
        "rules/refills.yaml:17: check c: param b is not used in the query (write :b)"
    ]


def test_an_unknown_rule_name_lists_the_known_ones(lite: Project) -> None:
    with pytest.raises(RuleError, match=r'no rule named "nope" \(rules: refill-due\)'):
        _load(lite).rule("nope")


def test_a_rule_is_found_by_name_or_is_none(lite: Project) -> None:
    ruleset = _load(lite)
    assert ruleset.get("refill-due") is ruleset.rule("refill-due") is ruleset.rules[0]
    assert ruleset.get("nope") is None


def test_the_fingerprint_changes_with_what_decides_a_schedule(lite: Project) -> None:
    config = load_config(lite.root / "config.yaml")
    rule = _load(lite).rules[0]
    same = rule.model_copy(update={"description": "other words", "template": "other"})
    later = rule.model_copy(update={"at": time(11)})
    assert rule.fingerprint(config) == same.fingerprint(config)
    assert rule.fingerprint(config) != later.fingerprint(config)


@pytest.mark.parametrize(
    ("source", "row", "expected"),
    [
        ("{{ rx_id }}", {"rx_id": 7}, "7"),
        (
            "{{rx_id}}:{{ runs_out_on }}",
            {"rx_id": 7, "runs_out_on": date(2027, 3, 17)},
            "7:2027-03-17",
        ),
        ("rx-{{ rx_id }}", {"rx_id": "a b"}, "rx-a b"),
        ("{{ rx_id ~ '/' ~ (n + 1) }}", {"rx_id": 7, "n": 1}, "7/2"),
        ("{% if n %}{{ n }}{% endif %}x", {"n": 3}, "3x"),
    ],
)
def test_occurrence_keys(source: str, row: dict[str, object], expected: str) -> None:
    assert compile_key(source)(row) == expected


@pytest.mark.parametrize("source", ["{{ rx_id }}", "{{ rx_id ~ '' }}"])
def test_an_occurrence_column_that_is_missing_or_null_raises(source: str) -> None:
    key = compile_key(source)
    with pytest.raises(Exception, match="rx_id"):
        key({})
    if "~" not in source:
        with pytest.raises(KeyError, match="rx_id"):
            key({"rx_id": None})


def test_a_label_is_checked_when_the_rules_load(lite: Project) -> None:
    assert _problems(lite, _after_due('    label: "Refill of {{ drug_name | nope }}"\n')) == [
        'rules/refills.yaml:12: rule refill-due: label: "Refill of {{ drug_name | nope }}" is '
        "not a valid template: No filter named 'nope'."
    ]
    assert _problems(lite, _after_due('    label: "  "\n')) == [
        "rules/refills.yaml:12: rule refill-due: label: the label is empty "
        '(e.g. label: "Refill of {{ drug_name }}")'
    ]
    lite.write("rules/refills.yaml", _after_due('    label: "Refill of {{ drug_name }}"\n'))
    (rule,) = _load(lite).rules
    assert (rule.label, rule.plain_name) == ("Refill of {{ drug_name }}", "Refill due")


def test_an_unknown_key_in_a_rule_a_check_or_the_file_names_the_nearest(lite: Project) -> None:
    rules = _after_due("    ofsets: [1d]\n").replace("    offsets: [-3d, 0d]\n", "")
    rules += (
        "checks:\n  - name: owned\n    query: SELECT 1 FROM rx WHERE id = :id\n"
        "    params: {id: int}\n    timout: 100ms\n"
    )
    problems = _problems(lite, rules)
    assert [p.split(" (allowed: ")[0] for p in problems] == [
        "rules/refills.yaml:2: rule refill-due: offsets: required key is missing",
        "rules/refills.yaml:12: rule refill-due: ofsets: unknown key; did you mean offsets?",
        "rules/refills.yaml:20: check owned: timout: unknown key; did you mean timeout?",
    ]
    assert problems[2].endswith(
        "(allowed: name, description, query, params, message, timeout, window)"
    )
    (file_level,) = _problems(lite, REFILLS + "rulse: []\n")
    assert file_level == (
        "rules/refills.yaml:16: rulse: unknown key; did you mean rules? "
        "(allowed: rules, checks, digests)"
    )
