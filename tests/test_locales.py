"""Templates per locale: which variant a customer gets, the filters that follow the locale,
variants checked by validate and shown by preview, the choice recorded on the message, and
replies per language."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from reminders import clock, locales, models, replies
from reminders.app import App
from reminders.config import Config, load_config
from reminders.errors import ConfigError
from reminders.render import Renderer
from tests.rules_fixtures import REFILLS, Project, lite, project

__all__ = ["lite", "project"]

# --- resolution: exact, language, config default, default ----------------------------------------

VARIANTS = {"es", "fr-CA", "fr", "pt-BR", "zh-Hant"}

RESOLUTION = [
    # customer's locale, config.default_locale, the variant chosen (None: the default template)
    ("fr-CA", None, "fr-CA"),  # exact
    ("fr_CA", None, "fr-CA"),  # POSIX separator
    ("FR-ca", None, "fr-CA"),  # case
    ("fr_ca", "es", "fr-CA"),
    (" fr-CA ", None, "fr-CA"),
    ("fr_CA.UTF-8", None, "fr-CA"),  # a POSIX locale with its charset
    ("fr-BE", None, "fr"),  # the language alone
    ("es-MX", None, "es"),
    ("ES_419", None, "es"),
    ("zh_hant", None, "zh-Hant"),  # a script subtag
    ("pt", None, None),  # a language does not pick one of its regional variants
    ("de-DE", "es", "es"),  # config default
    ("de", "es-MX", "es"),  # config default's language
    ("de", "fr_ca", "fr-CA"),
    ("de", None, None),  # the default template
    ("de", "it", None),
    (None, "es", "es"),  # no locale: config default
    (None, None, None),
    ("", None, None),
    ("not a locale!", None, None),  # unknown: the default, never an error
    ("x", "es", "es"),
    ("en_US", "fr-CA", "fr-CA"),
    (42, None, None),
]


@pytest.mark.parametrize(("customer", "default", "chosen"), RESOLUTION)
def test_the_customers_locale_chooses_the_variant(
    customer: object, default: str | None, chosen: str | None
) -> None:
    assert locales.choose(VARIANTS, customer, default) == chosen


@pytest.mark.parametrize(
    ("text", "tag"),
    [
        ("fr_CA", "fr-CA"),
        ("FR-ca", "fr-CA"),
        ("es", "es"),
        ("ES", "es"),
        ("es-419", "es-419"),
        ("zh_hant_tw", "zh-Hant-TW"),
        ("en_US.UTF-8", "en-US"),
        ("de_DE@euro", "de-DE"),
        ("", None),
        ("e", None),
        ("français", None),
        ("fr--CA", None),
        (None, None),
    ],
)
def test_locales_are_normalized_to_one_spelling(text: str | None, tag: str | None) -> None:
    assert locales.normalize(text) == tag


def test_keywords_compare_without_case_or_accents() -> None:
    assert locales.fold("sí") == locales.fold("SI") == "SI"
    assert replies.keyword("  ¡Ayuda! ") == "AYUDA"
    assert replies.keyword("Más tarde") == "MAS TARDE"


# --- rendering a variant -------------------------------------------------------------------------


def _templates(root: Path, files: dict[str, str]) -> Renderer:
    folder = root / "templates"
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return Renderer(folder)


def test_variants_are_found_whatever_the_spelling_of_their_locale(tmp_path: Path) -> None:
    renderer = _templates(
        tmp_path,
        {
            "refill-due.sms.j2": "Hi",
            "refill-due.es.sms.j2": "Hola",
            "refill-due.fr_CA.email.j2": "{% block subject %}s{% endblock %}"
            "{% block text %}t{% endblock %}",
            "refill-due.email.j2": "",
            "_footer.html.j2": "",  # a partial, not a variant
            "other.de.sms.j2": "Hallo",
        },
    )
    assert renderer.variants("refill-due", "sms") == {"es": "refill-due.es.sms.j2"}
    assert renderer.variants("refill-due", "email") == {"fr-CA": "refill-due.fr_CA.email.j2"}
    assert renderer.variants("_footer", "html") == {}
    assert renderer.choose("refill-due", "email", "FR-ca") == "fr-CA"
    assert renderer.choose("refill-due", "sms", "fr-CA") is None
    assert renderer.choose("refill-due", "sms", "fr-CA", "es-MX") == "es"
    assert renderer.render_sms("refill-due", {}, "es") == "Hola"
    assert renderer.render_email("refill-due", {}, "fr-CA").subject == "s"


PLURALS = [
    ("es", 1, "1 día"),
    ("es", 3, "3 días"),
    ("es", 1234, "1.234 días"),
    ("fr-CA", 0, "0 jour"),  # French counts 0 as one
    ("fr", 2, "2 jours"),
    ("en", 0, "0 days"),
    ("ru", 1, "1 день"),
    ("ru", 3, "3 дня"),
    ("ru", 5, "5 дней"),
    ("ru", 21, "21 день"),
    ("xx-unknown", 1, "1 day"),  # an unknown locale: the fall-back's rules (en_US)
]


@pytest.mark.parametrize(("locale", "n", "text"), PLURALS)
def test_plural_follows_cldr_rules_in_the_customers_locale(
    tmp_path: Path, locale: str, n: int, text: str
) -> None:
    forms = {
        "es": 'one="# día", other="# días"',
        "fr": 'one="# jour", other="# jours"',
        "en": 'one="# day", other="# days"',
        "ru": 'one="# день", few="# дня", many="# дней", other="# дня"',
        "xx": 'one="# day", other="# days"',
    }[locale[:2]]
    renderer = _templates(tmp_path, {"t.sms.j2": f"{{{{ n|plural({forms}) }}}}"})
    assert renderer.render_sms("t", {"n": n, "customer": {"locale": locale}}) == text


def test_number_follows_the_locale_and_a_variant_keeps_one_language(tmp_path: Path) -> None:
    renderer = _templates(
        tmp_path,
        {
            "t.sms.j2": "{{ x|number }} {{ d|date('long') }}",
            "t.es.sms.j2": "{{ x|number }} {{ d|date('long') }} {{ x|number('#,##0.00') }}",
        },
    )
    context = {"x": 1234.5, "d": "2027-03-17", "customer": {"locale": "es_MX"}}
    assert renderer.render_sms("t", context) == "1,234.5 17 de marzo de 2027"
    assert renderer.render_sms("t", context, "es") == "1,234.5 17 de marzo de 2027 1,234.50"
    # A German customer given the Spanish variant of default_locale reads Spanish throughout.
    german = {**context, "customer": {"locale": "de"}, "template_locale": "es"}
    assert renderer.render_sms("t", german, "es") == "1.234,5 17 de marzo de 2027 1.234,50"
    # With the default template, the customer's own locale formats, as before.
    assert renderer.render_sms("t", {**german, "template_locale": None}) == "1.234,5 17. März 2027"


def test_plural_refuses_forms_cldr_does_not_have(tmp_path: Path) -> None:
    renderer = _templates(
        tmp_path,
        {
            "a.sms.j2": '{{ 2|plural(one="x", plenty="y", other="z") }}',
            "b.sms.j2": "{{ 2|plural(one='x') }}",
        },
    )
    with pytest.raises(Exception, match=r"a.sms.j2:1: .*no form plenty \(CLDR's categories"):
        renderer.render_sms("a", {})
    with pytest.raises(Exception, match=r"b.sms.j2:1: .*needs other="):
        renderer.render_sms("b", {})


# --- validate, preview, delivery on a business project -------------------------------------------

ES_SMS = "Hola {{ first_name }}, su {{ drug_name }} se acaba el {{ runs_out_on|date('long') }}.\n"
ES_EMAIL = """\
{% block subject %}Su {{ drug_name }} se acaba pronto{% endblock %}
{% block text %}Hola {{ first_name }}, su {{ drug_name }} se acaba en
{{ 3|plural(one="# día", other="# días") }}.
{% endblock %}
"""
HTML_EMAIL = """\
{% block subject %}Your {{ drug_name }} runs out soon{% endblock %}
{% block text %}Hi {{ first_name }}.{% endblock %}
{% block html %}<p>Hi {{ first_name }}.</p>{% endblock %}
"""
LOCALE_RULES = REFILLS.replace("p.timezone\n", "p.timezone, p.locale\n")


def _with_locales(p: Project, locales_by_patient: dict[int, str | None]) -> None:
    """Patients get a locale column; every prescription runs out on 2027-03-17, in New York."""
    p.write("rules/refills.yaml", LOCALE_RULES.replace("[-3d, 0d]", "[-3d]"))
    p.sql("ALTER TABLE patients ADD COLUMN locale VARCHAR(35)")
    p.sql("UPDATE patients SET timezone = NULL")
    p.sql("UPDATE prescriptions SET runs_out_on = :due", {"due": p.due("2027-03-17")})
    for patient, locale in locales_by_patient.items():
        p.sql("UPDATE patients SET locale = :l WHERE id = :id", {"l": locale, "id": patient})


def test_validate_checks_each_variant_like_its_default(lite: Project) -> None:
    _with_locales(lite, {})
    lite.write("templates/refill-due.email.j2", HTML_EMAIL)
    lite.write("templates/refill-due.es.sms.j2", "Hola {{ first_name }}, {{ dias }} días.\n")
    lite.write("templates/refill-due.es.email.j2", ES_EMAIL)
    lite.write("templates/refill-due.fr.sms.j2", "Bonjour\n{% if %}\n")
    result = lite.run("validate")
    assert result.code == 2, result
    lines = result.err.splitlines()
    assert (
        "templates/refill-due.fr.sms.j2:2: Expected an expression, got 'end of statement block'"
        in lines
    )
    assert (
        "templates/refill-due.es.sms.j2:1: warning: í (U+00ED LATIN SMALL LETTER I WITH ACUTE) "
        "forces UCS-2: 70 characters a part instead of 160"
    ) in lines
    assert (
        "templates/refill-due.es.email.j2: warning: the es variant has no {% block html %}, "
        "which refill-due.email.j2 has"
    ) in lines
    # Without the syntax error, the names each variant uses are checked against the query.
    (lite.root / "templates/refill-due.fr.sms.j2").unlink()
    lines = lite.run("validate").err.splitlines()
    assert [line.split(" (")[0] for line in lines if "is not a column" in line] == [
        "templates/refill-due.es.sms.j2:1: dias is not a column of rule refill-due's query"
    ]
    lite.write("templates/refill-due.es.sms.j2", ES_SMS)
    done = lite.run("validate")
    assert done.code == 0, done


def test_two_spellings_of_one_locale_are_an_error(lite: Project) -> None:
    lite.write("templates/refill-due.es.sms.j2", "Hola\n")
    lite.write("templates/refill-due.ES.sms.j2", "Hola\n")
    result = lite.run("validate", "--offline")
    assert result.code == 2
    assert (
        "templates/refill-due.es.sms.j2: the same locale as refill-due.ES.sms.j2: one variant a "
        "locale (fr-CA, fr_CA and FR-ca are one locale)"
    ) in result.err.splitlines()


def test_preview_renders_a_variant_for_real_rows(lite: Project) -> None:
    _with_locales(lite, {1: "en_US"})
    lite.write("templates/refill-due.es.sms.j2", ES_SMS)
    items = lite.ok("preview", "refill-due", "--locale", "ES_mx", "--limit", "1", "--json")
    sms, email = items.json_lines()
    assert (sms["locale"], sms["text"]) == (
        "es",
        "Hola Ann, su Lisinopril se acaba el 17 de marzo de 2027.",
    )
    assert (email["locale"], email["subject"]) == (None, "Your Lisinopril runs out soon")
    text = lite.ok("preview", "refill-due", "--locale", "es", "--limit", "1").out
    assert "== refill-due 1 (customer 1) sms, offset -3d at 2027-03-14T14:00:00Z, in es" in text
    assert "note: templates/refill-due.email.j2 has no variant for es" in text
    default = lite.ok("preview", "refill-due", "--limit", "1", "--json").json_lines()
    assert default[0]["locale"] is None and default[0]["text"].startswith("Hi Ann")
    missing = lite.run("preview", "refill-due", "--locale", "de")
    assert missing.code == 2
    assert "templates/refill-due.sms.j2 has no variant for de (its variants: es;" in missing.err
    bad = lite.run("preview", "refill-due", "--locale", "not a locale")
    assert (bad.code, bad.err) == (
        2,
        '--locale: "not a locale" is not a locale (examples: es, fr-CA)\n',
    )


SEND = "2027-03-14T14:00:00Z"  # 10:00 in New York, three days before 2027-03-17
HELP_CONFIG = """\
default_locale: en-US
web:
  help_text:
    default: Acme Pharmacy. Reply STOP to opt out.
    es: Farmacia Acme. Responda BAJA para no recibir más mensajes.
keywords:
  es: {stop: [baja, alto], start: [alta], help: [ayuda]}
"""


def test_each_customer_gets_the_variant_their_locale_chooses_recorded_on_the_message(
    project: Project, redis_url: str
) -> None:
    """Ann (es-MX) gets Spanish, Bob (FR_ca, no French variant) and Cy (no locale) the default;
    the choice is on each message and in ``list --json``; HELP answers in the message's language,
    AYUDA in Spanish, BAJA opts out."""
    _with_locales(project, {1: "es-MX", 2: "FR_ca", 3: None})
    project.write("templates/refill-due.es.sms.j2", ES_SMS)
    project.write("templates/refill-due.es.email.j2", ES_EMAIL)
    config = project.root / "config.yaml"
    config.write_text(config.read_text() + f"redis:\n  url: {redis_url}\n" + HELP_CONFIG)
    for step in (["db", "upgrade"], ["scan"], ["dispatch"], ["worker", "--burst"]):
        project.ok(*step, now=SEND)
    outbox = (project.root / "outbox.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["body"] for line in outbox) == [
        "Hi Bob, your Metformin runs out on 2027-03-17.",
        "Hi Cy, your Atorvastatin runs out on 2027-03-17.",
        "Hola Ann, su Lisinopril se acaba el 17 de marzo de 2027.",
    ]
    messages = {m["reminder_id"]: m["locale"] for m in project.rows(models.message)}
    listed = {r["id"]: r["locale"] for r in project.ok("list", "--json", now=SEND).json_lines()}
    by_customer = {r["customer_id"]: r["id"] for r in project.reminders()}
    assert {c: messages[rid] for c, rid in by_customer.items()} == {"1": "es", "2": None, "3": None}
    assert listed == messages

    app = App(config)
    now = clock.parse_instant(SEND)
    ann, bob = "+15005550006", "+15005550007"

    def answer(body: str, number: str = ann) -> replies.Answer:
        sid = f"SM{body.encode().hex()}{number}"
        with app.state.begin() as conn:
            return replies.handle(conn, app.ruleset, app.config, number, body, sid, now)

    spanish = "Farmacia Acme. Responda BAJA para no recibir más mensajes."
    assert answer("HELP").text == spanish  # the language of Ann's last message
    assert answer("¡Ayuda!").text == spanish
    assert answer("help", bob).text == "Acme Pharmacy. Reply STOP to opt out."
    assert answer("ayuda", bob).text == spanish  # the language of the word
    stopped = answer("Baja")
    assert (stopped.action, stopped.text) == ("stop", None)
    assert [(o["channel"], o["address"]) for o in project.rows(models.optout)] == [("sms", ann)]
    assert answer("alta").action == "start"
    assert project.rows(models.optout) == []


# --- config: default_locale, help texts and keywords per language ---------------------------------

BASE = "source:\n  url: sqlite:///business.db\n"


def _config(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(BASE + text)
    return load_config(path, env={})


def _config_error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, text)
    return str(err.value).replace(str(tmp_path / "config.yaml"), "config.yaml")


def test_help_text_is_one_string_or_one_a_language(tmp_path: Path) -> None:
    plain = _config(tmp_path, "web:\n  help_text: Acme. Reply STOP to opt out.\n")
    assert plain.web.help_text == {"default": "Acme. Reply STOP to opt out."}
    assert replies.help_text(plain, "es") == "Acme. Reply STOP to opt out."
    assert replies.help_text(_config(tmp_path, ""), "es") is None
    both = _config(
        tmp_path,
        "default_locale: fr_ca\nweb:\n  help_text: {default: Acme., es_MX: Acme MX., ES: Acme ES.,"
        " fr-CA: Acme QC.}\n",
    )
    assert both.default_locale == "fr-CA"
    assert both.web.help_text == {
        "default": "Acme.",
        "es-MX": "Acme MX.",
        "es": "Acme ES.",
        "fr-CA": "Acme QC.",
    }
    said = {loc: replies.help_text(both, loc) for loc in ("es-mx", "es_AR", "de", None)}
    assert said == {"es-mx": "Acme MX.", "es_AR": "Acme ES.", "de": "Acme QC.", None: "Acme QC."}


def test_reply_confirmations_are_answered_in_the_customers_language(tmp_path: Path) -> None:
    config = _config(
        tmp_path,
        "web:\n  reply_text:\n"
        "    stop: {default: Acme. You will get no more texts., es: Acme. No recibirá más.}\n"
        "    done: {fr: Merci !}\n",
    )

    def said(kind: str, locale: str | None, words: list[str] = (), delay: Any = None) -> Any:
        return replies.reply_text(config, kind, locale, list(words), delay)

    assert said("stop", "es-MX") == "Acme. No recibirá más."
    assert said("stop", "de") == "Acme. You will get no more texts."
    assert said("start", "es") is None  # not set: an empty answer, as Twilio answers START
    assert said("done", "fr-CA") == "Merci !"  # the business's own language
    assert said("done", "es") == "¡Gracias! No recibirá más recordatorios sobre esto."
    assert said("done", None) == "Thanks! You won't get more reminders about this."
    assert said("snooze", "es", delay=timedelta(days=2)) == (
        "De acuerdo, se lo recordaremos de nuevo dentro de 2 días."
    )
    assert said("snooze", None, delay=timedelta(hours=36)) == (
        "OK, we'll remind you again in 36 hours."
    )
    assert said("unknown", "es", ["LISTO", "MAS"]) == (
        "Perdón, no lo entendimos. Responda LISTO o MAS, HELP para ayuda, "
        "o STOP para no recibir más."
    )
    assert said("unknown", None, ["DONE", "LATER", "SKIP"]) == (
        "Sorry, we didn't understand. Reply DONE, LATER, or SKIP, HELP for help, "
        "or STOP to opt out."
    )
    assert said("unknown", None) == (
        "Sorry, we didn't understand. Reply HELP for help, or STOP to opt out."
    )
    bad = _config_error(tmp_path, "web:\n  reply_text: {stopp: Bye}\n")
    assert bad.startswith("config.yaml:4: web.reply_text")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            "default_locale: español\n",
            'config.yaml:3: default_locale: "español" is not a locale (examples: en, es, fr-CA, '
            "pt_BR)",
        ),
        (
            "web:\n  help_text: {default: Hi, 'e s': Hola}\n",
            'config.yaml:4: web.help_text: "e s" is not a locale (examples: en, es, fr-CA, pt_BR)',
        ),
        (
            "keywords:\n  es: {stop: [BAJA], start: [baja]}\n",
            "config.yaml:4: keywords: es: BAJA is a start word here but means stop elsewhere "
            "(a keyword means one thing in every language)",
        ),
        (
            "keywords:\n  es: {start: [STOP]}\n",
            "config.yaml:4: keywords: es: STOP is a start word here but means stop elsewhere "
            "(a keyword means one thing in every language)",
        ),
        (
            "keywords:\n  es: {stop: [no más]}\n",
            'config.yaml:4: keywords.es.stop: "no más" is not a one-word keyword',
        ),
        ("keywords:\n  es: {unsubscribe: [BAJA]}\n", "config.yaml:4: keywords.es.unsubscribe"),
    ],
)
def test_bad_locale_settings_name_their_line(tmp_path: Path, text: str, problem: str) -> None:
    assert _config_error(tmp_path, text).startswith(problem)


def test_a_rules_reply_word_in_any_language_and_not_a_languages_keyword(lite: Project) -> None:
    rules = LOCALE_RULES + "    replies:\n      Listo: done\n      más: snooze 1d\n"
    lite.write("rules/refills.yaml", rules)
    app = App(lite.root / "config.yaml")
    assert sorted(app.ruleset.rule("refill-due").replies) == ["LISTO", "MAS"]
    config = lite.root / "config.yaml"
    config.write_text(config.read_text() + "keywords:\n  es: {stop: [listo]}\n")
    result = lite.run("validate", "--offline")
    assert result.code == 2
    assert result.err == (
        "rules/refills.yaml:16: rule refill-due: replies: LISTO is the es stop keyword "
        "(config keywords.es.stop); choose another word\n"
    )


def test_a_variant_in_a_locale_babel_does_not_know_is_a_warning(tmp_path: Path) -> None:
    renderer = _templates(tmp_path, {"t.sms.j2": "Hi", "t.qq.sms.j2": "Qq"})
    (problem,) = renderer.problems("t", ["sms"])
    assert problem.warning and problem.file == str(tmp_path / "templates" / "t.qq.sms.j2")
    assert problem.message.startswith("qq is not a locale Babel knows")
    assert renderer.choose("t", "sms", "qq-ZZ") == "qq"  # still chosen: the business wrote it
