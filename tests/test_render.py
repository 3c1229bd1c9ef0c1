from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from reminders.errors import Problem, TemplateError
from reminders.render import RenderedEmail, Renderer

NOW = datetime(2027, 3, 11, 23, 30, tzinfo=UTC)  # already 12 March in Paris, 11 March in New York


def write(folder: Path, files: dict[str, str]) -> Renderer:
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return Renderer(folder)


def customer(locale: str | None = None, timezone: str | None = None) -> dict[str, Any]:
    return {"first_name": "Jane", "locale": locale, "timezone": timezone}


# -- filters, in the customer's locale and zone -------------------------------------------------

FILTER_CASES = [
    # (template, customer locale, customer zone, value, expected)
    ("{{ v|date }}", "en_US", "America/New_York", date(2027, 3, 14), "Mar 14, 2027"),
    ("{{ v|date }}", "fr_FR", "Europe/Paris", date(2027, 3, 14), "14 mars 2027"),
    ("{{ v|date }}", "de-DE", "Europe/Berlin", date(2027, 3, 14), "14.03.2027"),
    ("{{ v|date('full') }}", "en_US", None, date(2027, 3, 14), "Sunday, March 14, 2027"),
    ("{{ v|date('EEEE d MMMM') }}", "fr_FR", None, date(2027, 3, 14), "dimanche 14 mars"),
    ("{{ v|date }}", "en_US", None, "2027-03-14", "Mar 14, 2027"),
    # an aware datetime is shown on the customer's local calendar day
    ("{{ v|date }}", "en_US", "America/New_York", NOW, "Mar 11, 2027"),
    ("{{ v|date }}", "en_US", "Europe/Paris", NOW, "Mar 12, 2027"),
    ("{{ v|date }}", "en_US", "Europe/Paris", "2027-03-11T23:30:00Z", "Mar 12, 2027"),
    # a naive datetime is customer-local already
    (
        "{{ v|datetime('short') }}",
        "en_US",
        "Asia/Tokyo",
        datetime(2027, 3, 14, 9, 5),
        "3/14/27, 9:05\u202fAM",
    ),
    ("{{ v|datetime('short') }}", "en_GB", "Europe/London", NOW, "11/03/2027, 23:30"),
    ("{{ v|datetime('short') }}", "de_DE", "Europe/Berlin", NOW, "12.03.27, 00:30"),
    # across the DST change (New York springs forward on 14 March 2027)
    (
        "{{ v|time }}",
        "en_US",
        "America/New_York",
        datetime(2027, 3, 13, 15, 0, tzinfo=UTC),
        "10:00\u202fAM",
    ),
    (
        "{{ v|time }}",
        "en_US",
        "America/New_York",
        datetime(2027, 3, 15, 15, 0, tzinfo=UTC),
        "11:00\u202fAM",
    ),
    ("{{ v|time }}", "fr_FR", "Europe/Paris", "2027-03-15T08:45:00+00:00", "09:45"),
    ("{{ v|money }}", "en_US", None, Decimal("1234.5"), "$1,234.50"),
    ("{{ v|money('EUR') }}", "fr_FR", None, 1234.5, "1\u202f234,50\u00a0€"),
    ("{{ v|money('EUR') }}", "de_DE", None, "19.9", "19,90\u00a0€"),
    ("{{ v|money('JPY') }}", "ja_JP", None, 1200, "￥1,200"),
    # days from the customer's today (NOW is the 12th in Paris, the 11th in New York)
    ("{{ v|days_until }}", "en_US", "Europe/Paris", date(2027, 3, 14), "2"),
    ("{{ v|days_until }}", "en_US", "America/New_York", date(2027, 3, 14), "3"),
    ("{{ v|days_until }}", "en_US", "America/New_York", date(2027, 3, 10), "-1"),
    ("{{ v|days_until }}", "en_US", "Europe/Paris", datetime(2027, 3, 12, 1, 0), "0"),
    ("{{ v|days_until }}", "en_US", "Europe/Paris", "2027-03-20", "8"),
]


@pytest.mark.parametrize(("source", "locale", "zone", "value", "expected"), FILTER_CASES)
def test_filters(
    tmp_path: Path, source: str, locale: str, zone: str | None, value: Any, expected: str
) -> None:
    renderer = write(tmp_path, {"t.sms.j2": source})
    context = {"customer": customer(locale, zone), "v": value, "now": NOW}
    assert renderer.render_sms("t", context) == expected


@pytest.mark.parametrize(
    ("customer_fields", "defaults", "expected"),
    [
        # the customer's own locale and zone win
        ({"locale": "fr_FR", "timezone": "Europe/Paris"}, {}, "12 mars 2027"),
        # an unknown or missing customer value falls back to the context defaults
        ({"locale": "xx_YY", "timezone": "Mars/Olympus"}, {}, "Mar 11, 2027"),
        (
            {"locale": None, "timezone": None},
            {"default_locale": "de_DE", "default_timezone": "Europe/Berlin"},
            "12.03.2027",
        ),
        (
            {"locale": "nope", "timezone": ""},
            {"default_locale": "es_ES", "default_timezone": "America/Los_Angeles"},
            "11 mar 2027",
        ),
        # then en_US and UTC
        ({}, {}, "Mar 11, 2027"),
    ],
)
def test_locale_and_zone_fall_back(
    tmp_path: Path, customer_fields: dict[str, Any], defaults: dict[str, str], expected: str
) -> None:
    renderer = write(tmp_path, {"t.sms.j2": "{{ v|date }}"})
    context: dict[str, Any] = {"v": NOW, "customer": customer_fields, **defaults}
    assert renderer.render_sms("t", context) == expected


def test_filters_without_customer_or_now(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMINDERS_NOW", "2027-03-10T12:00:00Z")
    renderer = write(tmp_path, {"t.sms.j2": "{{ v|date }} in {{ v|days_until }} days"})
    assert renderer.render_sms("t", {"v": date(2027, 3, 14)}) == "Mar 14, 2027 in 4 days"


def test_customer_may_be_an_object(tmp_path: Path) -> None:
    class Customer:
        locale = "fr_FR"
        timezone = "Europe/Paris"

    renderer = write(tmp_path, {"t.sms.j2": "{{ v|date }}"})
    assert renderer.render_sms("t", {"v": NOW, "customer": Customer()}) == "12 mars 2027"


# -- SMS, email, checks -----------------------------------------------------------------------


def test_render_sms_strips_and_trims_blocks(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {
            "refill-due.sms.j2": (
                "\n  Hi {{ customer.first_name }},\n"
                "{% if days_left <= 0 %}\nyour {{ drug }} runs out today.\n"
                "{% else %}\nyour {{ drug }} runs out in {{ days_left }} days.\n{% endif %}\n"
                "Reply DONE if refilled.\n\n"
            )
        },
    )
    text = renderer.render_sms(
        "refill-due", {"customer": customer(), "drug": "Amoxicillin", "days_left": 3}
    )
    assert text == "Hi Jane,\nyour Amoxicillin runs out in 3 days.\nReply DONE if refilled."


def test_sms_is_not_escaped(tmp_path: Path) -> None:
    renderer = write(tmp_path, {"t.sms.j2": "{{ a }} & {{ b }}"})
    assert renderer.render_sms("t", {"a": "<Tom & Jerry>", "b": "'x'"}) == "<Tom & Jerry> & 'x'"


EMAIL = """\
{% set who = customer.first_name|title %}
{% block subject %}
  Your {{ drug }} refill,
  {{ who }}
{% endblock %}
{% block text %}
Hello {{ who }},

your {{ drug }} runs out on {{ due|date }}.
Stop these: {{ link }}
{% endblock %}
{% block html %}
<p>Hello {{ who }},</p>
<p>your {{ drug }} runs out on {{ due|date }}. <a href="{{ link }}">Stop these</a></p>
{% endblock %}
"""


def test_render_email(tmp_path: Path) -> None:
    renderer = write(tmp_path, {"refill-due.email.j2": EMAIL})
    context = {
        "customer": customer("en_US", "America/New_York"),
        "drug": "Tom & Jerry's <pills>",
        "due": date(2027, 3, 14),
        "link": "https://r.example.com/u/abc?x=1&y=2",
    }
    assert renderer.render_email("refill-due", context) == RenderedEmail(
        subject="Your Tom & Jerry's <pills> refill, Jane",
        text=(
            "Hello Jane,\n\nyour Tom & Jerry's <pills> runs out on Mar 14, 2027.\n"
            "Stop these: https://r.example.com/u/abc?x=1&y=2"
        ),
        html=(
            "<p>Hello Jane,</p>\n<p>your Tom &amp; Jerry&#39;s &lt;pills&gt; runs out on "
            'Mar 14, 2027. <a href="https://r.example.com/u/abc?x=1&amp;y=2">Stop these</a></p>'
        ),
    )


def test_email_without_html_and_with_a_block_in_a_branch(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {
            "t.email.j2": (
                "{% block subject %}Hi {{ name }}{% endblock %}\n"
                "{% if false %}{% block text %}Body for {{ name }}{% endblock %}{% endif %}\n"
                "ignored text outside blocks\n"
            )
        },
    )
    assert renderer.render_email("t", {"name": "Ann"}) == RenderedEmail(
        "Hi Ann", "Body for Ann", None
    )


def test_html_block_includes_stay_escaped(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {
            "footer.j2": "<small>{{ company }}</small>",
            "t.email.j2": (
                "{% block subject %}S{% endblock %}{% block text %}{% include 'footer.j2' %}"
                "{% endblock %}{% block html %}{% include 'footer.j2' %}{% endblock %}"
            ),
        },
    )
    email = renderer.render_email("t", {"company": "A&B"})
    assert email.text == "<small>A&B</small>"
    assert email.html == "<small>A&amp;B</small>"


def test_render_check(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {"already-owned.check.j2": "You bought {{ title }} on {{ placed_at|date('long') }}.\n"},
    )
    text = renderer.render_check(
        "already-owned", {"title": "Dune", "placed_at": datetime(2027, 3, 3, 15, 0, tzinfo=UTC)}
    )
    assert text == "You bought Dune on March 3, 2027."


def test_templates_are_compiled_once_per_process(tmp_path: Path) -> None:
    first = write(tmp_path, {"t.sms.j2": "one"})
    assert first.render_sms("t", {}) == "one"
    (tmp_path / "t.sms.j2").write_text("two", encoding="utf-8")
    # a second renderer on the same folder shares the compiled template
    assert Renderer(tmp_path).render_sms("t", {}) == "one"


# -- errors name the template file and line -----------------------------------------------------

RENDER_ERRORS = [
    # (files, render call, file, line, words in the message)
    ({"t.sms.j2": "Hi\n{{ customer.first_nme }}\n"}, ("sms", "t"), "t.sms.j2", 2, "first_nme"),
    ({"t.sms.j2": "a\nb\n{{ nope }}"}, ("sms", "t"), "t.sms.j2", 3, "'nope' is undefined"),
    ({"t.sms.j2": "{{ drug.__class__ }}"}, ("sms", "t"), "t.sms.j2", 1, "unsafe"),
    ({"t.sms.j2": "\n{{ 'x'|date }}"}, ("sms", "t"), "t.sms.j2", 2, "date filter needs a date"),
    ({"t.sms.j2": "{{ 'abc'|money }}"}, ("sms", "t"), "t.sms.j2", 1, "money filter needs a number"),
    ({"t.sms.j2": "{{ 1 / 0 }}"}, ("sms", "t"), "t.sms.j2", 1, "ZeroDivisionError"),
    ({"t.sms.j2": "{% if x %}\nopen"}, ("sms", "t"), "t.sms.j2", 2, "endif"),
    ({"t.sms.j2": "{{ x|nosuchfilter }}"}, ("sms", "t"), "t.sms.j2", 1, "nosuchfilter"),
    ({}, ("sms", "missing"), "missing.sms.j2", None, "missing"),
    (
        {
            "t.email.j2": (
                "{% block subject %}S{% endblock %}\n{% block text %}\n\n{{ gone }}{% endblock %}"
            )
        },
        ("email", "t"),
        "t.email.j2",
        4,
        "'gone' is undefined",
    ),
    (
        {
            "t.email.j2": (
                "{% block subject %}S{% endblock %}{% block text %}T{% endblock %}\n"
                "{% block html %}\n<p>{{ gone }}</p>{% endblock %}"
            )
        },
        ("email", "t"),
        "t.email.j2",
        3,
        "'gone' is undefined",
    ),
    (
        {"t.email.j2": "{% block text %}T{% endblock %}"},
        ("email", "t"),
        "t.email.j2",
        None,
        "subject",
    ),
    (
        {"footer.j2": "ok\n{{ nope }}", "t.check.j2": "{% include 'footer.j2' %}"},
        ("check", "t"),
        "footer.j2",
        2,
        "'nope' is undefined",
    ),
]


@pytest.mark.parametrize(("files", "call", "file", "line", "words"), RENDER_ERRORS)
def test_render_errors(
    tmp_path: Path,
    files: dict[str, str],
    call: tuple[str, str],
    file: str,
    line: int | None,
    words: str,
) -> None:
    renderer = write(tmp_path, files)
    kind, name = call
    with pytest.raises(TemplateError) as caught:
        getattr(renderer, f"render_{kind}")(name, {"drug": "x", "customer": customer()})
    [problem] = caught.value.problems
    assert problem.file == str(tmp_path / file)
    assert problem.line == line
    assert words in problem.message
    assert str(caught.value).startswith(
        f"{tmp_path / file}:{line}: " if line else f"{tmp_path / file}: "
    )


def test_relative_folder_is_reported_relative(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "templates").mkdir()
    write(tmp_path / "templates", {"t.sms.j2": "\n{{ nope }}"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TemplateError) as caught:
        Renderer(Path("templates")).render_sms("t", {})
    assert str(caught.value) == "templates/t.sms.j2:2: rendering failed: 'nope' is undefined"


# -- validation -------------------------------------------------------------------------------


def test_problems(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {
            "ok.sms.j2": "Hi {{ name }}",
            "ok.email.j2": "{% block subject %}S{% endblock %}{% block text %}T{% endblock %}",
            "ok.check.j2": "Bought {{ title }}",
            "bad.sms.j2": "Hi\n{{ name }\n",
            "bad.email.j2": "{% block text %}T{% endblock %}",
            "curly.sms.j2": "Hi {{ name }},\nit’s due {{ when }}.\n",
            "badhtml.email.j2": (
                "{% block subject %}S{% endblock %}{% block text %}T{% endblock %}"
                "{% block html %}\n{% for %}{% endblock %}"
            ),
        },
    )
    assert renderer.problems("ok", ["sms", "email", "check"]) == []
    assert renderer.problems("missing", ["sms", "email"]) == [
        Problem("template file is missing", str(tmp_path / "missing.sms.j2")),
        Problem("template file is missing", str(tmp_path / "missing.email.j2")),
    ]
    [syntax] = renderer.problems("bad", ["sms"])
    assert (syntax.file, syntax.line, syntax.warning) == (str(tmp_path / "bad.sms.j2"), 2, False)
    [blocks] = renderer.problems("bad", ["email"])
    assert "{% block subject %}" in blocks.message and blocks.file == str(tmp_path / "bad.email.j2")
    [curly] = renderer.problems("curly", ["sms"])
    assert curly.warning and curly.line == 2 and "’" in curly.message and "UCS-2" in curly.message
    [html] = renderer.problems("badhtml", ["email"])
    assert html.line == 2 and html.file == str(tmp_path / "badhtml.email.j2")
    [kind] = renderer.problems("ok", ["fax"])
    assert "fax" in kind.message and "sms, email, check" in kind.message


# -- budgets: what one render may do --------------------------------------------------------------

BUDGET_ERRORS = [
    # (template, line or None when only the file is known, words in the message)
    (
        "{% set l = range(1000)|list %}\n{% for a in l %}{% for b in l %}{% endfor %}{% endfor %}",
        2,
        "more than 100,000 loop iterations in one render",
    ),
    (
        "{% for i in range(20000) %}{{ 'x' * 100 }}{% endfor %}",
        None,
        "more than 1,000,000 characters of output",
    ),
    (
        "{% set ns = namespace(s='x') %}\n{% for i in range(64) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        2,
        "more than 1,000,000 characters",
    ),
    (
        "{% set ns = namespace(s='x') %}\n\n{% for i in range(64) %}"
        "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}",
        3,
        "more than 1,000,000 characters",
    ),
    ("{{ 'x' * 10**9 }}", 1, "more than 1,000,000 characters"),
    ("{{ range(10)|list * 10**7 }}", 1, "more than 1,000,000 items"),
    ("\n{{ 2 ** (10 ** 9) }}", 2, "a number of more than 10,000 bits"),
    ("{{ '%0999999999d'|format(1) }}", 1, "a width of 999999999"),
    ("{{ '%0999999999d' % 1 }}", 1, "a width of 999999999"),
    ("{{ '{:>999999999}'.format(1) }}", 1, "a width of 999999999"),
    ("{{ 'x'|center(999999999) }}", 1, "more than 1,000,000 characters"),
    ("{{ ('x' * 1000)|replace('x', 'y' * 1001) }}", 1, "more than 1,000,000 characters"),
    ("{{ ('x' * 1000).replace('x', 'y' * 1001) }}", 1, "more than 1,000,000 characters"),
]


@pytest.mark.parametrize(("template", "line", "words"), BUDGET_ERRORS)
def test_a_render_past_its_budget_fails_naming_the_template(
    tmp_path: Path, template: str, line: int | None, words: str
) -> None:
    renderer = write(tmp_path, {"t.sms.j2": template})
    with pytest.raises(TemplateError) as caught:
        renderer.render_sms("t", {})
    [problem] = caught.value.problems
    assert (problem.file, problem.line) == (str(tmp_path / "t.sms.j2"), line)
    assert words in problem.message


def test_a_render_past_its_time_budget_fails(tmp_path: Path) -> None:
    # A budget of no time at all: the first loop step or call is past it, however fast the machine.
    write(tmp_path, {"t.sms.j2": "\n{% for i in range(3) %}{{ i }}{% endfor %}"})
    renderer = Renderer(tmp_path, max_seconds=0)
    with pytest.raises(TemplateError) as caught:
        renderer.render_sms("t", {})
    assert str(caught.value) == (
        f"{tmp_path / 't.sms.j2'}:2: rendering failed: took longer than 0 s (the time budget of "
        "one render)"
    )


def test_the_budget_is_per_render_and_leaves_ordinary_templates_alone(tmp_path: Path) -> None:
    renderer = write(
        tmp_path,
        {
            "t.sms.j2": "{% for a in range(300) %}{% for b in range(300) %}{% endfor %}{% endfor %}"
            "{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ '%5d' % 42 }} {{ '{:>4}'.format(7) }} {{ 'a' + 'b' }}",
        },
    )
    # 90,300 iterations each time: under the budget every time, so nothing carries over.
    for _ in range(3):
        assert renderer.render_sms("t", {}) == "ababab 1024    42    7 ab"


def test_a_template_file_over_1_mib_is_refused_before_it_is_compiled(tmp_path: Path) -> None:
    renderer = write(
        tmp_path, {"t.sms.j2": "x" * (2 * 1024 * 1024), "u.sms.j2": "{% include 't.sms.j2' %}"}
    )
    expected = "the template is 2.0 MiB, more than the 1 MiB a template may be"
    with pytest.raises(TemplateError) as caught:
        renderer.render_sms("t", {})
    assert str(caught.value) == f"{tmp_path / 't.sms.j2'}: {expected}"
    assert [str(p) for p in renderer.problems("t", ["sms"])] == [
        f"{tmp_path / 't.sms.j2'}: {expected}"
    ]
    with pytest.raises(TemplateError) as included:
        renderer.render_sms("u", {})
    assert expected in str(included.value)
