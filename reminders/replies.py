"""Inbound SMS: the engine's keywords (STOP, START, HELP) and the rules' own (``replies:``).

A one-word answer applies to the most recent message sent to that number. STOP and its synonyms
stop every SMS to the number (all of the business's rules); START, YES, UNSTOP undo it; HELP and
INFO answer the business's help text (``web.help_text``). Each language may add its own words
for these (``keywords: {es: {stop: [BAJA], start: [ALTA], help: [AYUDA]}}``); the English ones
carriers require always work. HELP is answered in the language of the word sent (AYUDA: es),
else in that of the last message sent to the number (its template variant's locale), else
``default``. Keywords compare without case or accents (SÍ is SI). Twilio answers STOP, START and
HELP itself on a Messaging Service with default opt-out handling, so those get an empty answer (HELP
too, unless a help text is configured). A rule's keyword either cancels the occurrence's open
reminders (``done``) or moves its next open one by a delay (``snooze``), and gets a short
confirmation; any other text gets the list of keywords.

Each inbound message is handled once: its ``MessageSid`` is recorded first (``inbound`` is unique
on it), in the same transaction as what it does, so a retried webhook changes nothing twice.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from babel.dates import format_timedelta
from babel.lists import format_list
from sqlalchemy.engine import Connection

from . import consent, locales, outbox, state_db
from .config import Config
from .lifecycle import CANCELED, OPEN, PENDING, move
from .models import inbound, message, reminder
from .phone import mask
from .rules import HELP_WORDS, START_WORDS, STOP_WORDS, Rule, RuleSet

log = logging.getLogger(__name__)

STOP, START, HELP, DONE, SNOOZE, UNKNOWN = "stop", "start", "help", "done", "snooze", "unknown"
# The reason a snoozed reminder carries until it is sent: the customer asked for it later, so
# nothing sends it earlier (a digest leaves it out).
SNOOZED = "snoozed: "
MAX_BODY = 1600  # Twilio's longest message; anything longer is kept cut


@dataclass(frozen=True)
class Answer:
    """What an inbound message did, and the text to answer (None: an empty ``<Response/>``)."""

    action: str
    text: str | None
    reminder_id: int | None = None
    duplicate: bool = False


def keyword(body: str) -> str:
    """The one word a customer sent, uppercased and without accents, without surrounding spaces
    and punctuation (¡ and ¿ included).

    Several words come back whole (uppercased), so they match no keyword.
    """
    text = (body or "").strip()
    text = re.sub(r"^[\s\"'“”‘’.!?¡¿,;:()\-]+|[\s\"'“”‘’.!?¡¿,;:()\-]+$", "", text)
    return locales.fold(" ".join(text.split()))


def engine_keyword(word: str, config: Config) -> tuple[str | None, str | None]:
    """(stop, start or help, the language whose word it is: None for English), or (None, None)."""
    if word in STOP_WORDS:
        return STOP, None
    if word in START_WORDS:
        return START, None
    if word in HELP_WORDS:
        return HELP, None
    for language, words in config.keywords.items():
        for action, listed in ((STOP, words.stop), (START, words.start), (HELP, words.help)):
            if word in listed:
                return action, language
    return None, None


# The engine's own answers to the rules' reply words, by language ("default": English); a
# business overrides or adds languages with ``web.reply_text``. {later}: when, in the customer's
# language; {words}: the rule's reply words (STOP and HELP work in every language).
TEXTS: dict[str, dict[str, str]] = {
    "done": {
        "default": "Thanks! You won't get more reminders about this.",
        "es": "¡Gracias! No recibirá más recordatorios sobre esto.",
    },
    "snooze": {
        "default": "OK, we'll remind you again {later}.",
        "es": "De acuerdo, se lo recordaremos de nuevo {later}.",
    },
    "nothing_to_move": {
        "default": "There is no upcoming reminder to move.",
        "es": "No hay ningún recordatorio próximo que mover.",
    },
    "unknown": {
        "default": "Sorry, we didn't understand. Reply {words}HELP for help, or STOP to opt out.",
        "es": "Perdón, no lo entendimos. Responda {words}HELP para ayuda, "
        "o STOP para no recibir más.",
    },
}


def localized(
    config: Config, texts: dict[str, str] | None, locale: str | None
) -> tuple[str | None, str | None]:
    """The text of ``texts`` for ``locale`` (exact, language, ``default_locale``'s), else its
    ``default``, with the locale chosen (None: the default); (None, None) without texts."""
    if not texts:
        return None, None
    chosen = locales.choose([k for k in texts if k != "default"], locale, config.default_locale)
    return (texts[chosen], chosen) if chosen else (texts.get("default"), None)


def help_text(config: Config, locale: str | None) -> str | None:
    """``web.help_text`` for ``locale`` (exact, language, ``default_locale``'s), else its
    ``default``; None when none is configured."""
    return localized(config, config.web.help_text, locale)[0]


def reply_text(
    config: Config, kind: str, locale: str | None, words: list[str], delay: timedelta | None
) -> str | None:
    """The answer of ``kind`` (stop, start, done, snooze, nothing_to_move, unknown) for
    ``locale``: the business's ``web.reply_text``, else the engine's; None: an empty answer."""
    texts = {**TEXTS.get(kind, {}), **config.web.reply_text.get(kind, {})}  # type: ignore[call-overload]
    text, chosen = localized(config, texts, locale)
    if text is None:
        return None
    language = chosen or config.default_locale or "en"
    if "{later}" in text and delay is not None:
        text = text.replace("{later}", _later(delay, language))
    if "{words}" in text:
        listed = f"{format_list(words, style='or', locale=_babel(language))}, " if words else ""
        text = text.replace("{words}", listed)
    return text


@dataclass(frozen=True)
class _Latest:
    reminder_id: int
    rule: str
    occurrence: str
    customer_id: str
    locale: str | None  # the template variant of that message


def latest_to(conn: Connection, number: str) -> _Latest | None:
    """The reminder of the most recent SMS sent to ``number`` (E.164), or None."""
    row = conn.execute(
        sa.select(
            reminder.c.id,
            reminder.c.rule,
            reminder.c.occurrence,
            reminder.c.customer_id,
            message.c.locale,
        )
        .select_from(message.join(reminder, reminder.c.id == message.c.reminder_id))
        .where(message.c.channel == "sms", message.c.to_address == number)
        .order_by(message.c.created_at.desc(), message.c.id.desc())
        .limit(1)
    ).first()
    if row is None:
        return None
    return _Latest(row.id, row.rule, row.occurrence, row.customer_id, row.locale)


def handle(
    conn: Connection,
    ruleset: RuleSet,
    config: Config,
    number: str,
    body: str,
    message_sid: str,
    now: datetime,
) -> Answer:
    """Handle one inbound SMS inside the caller's transaction; returns what to answer."""
    word = keyword(body)
    latest = latest_to(conn, number)
    rule = ruleset.get(latest.rule) if latest else None
    reply = rule.replies.get(word) if rule is not None else None
    found, language = engine_keyword(word, config)
    locale = language or (latest.locale if latest else None)
    if found is not None:
        action = found
    elif reply is not None:
        action = DONE if reply.action == "done" else SNOOZE
    else:
        action = UNKNOWN
    reminder_id = latest.reminder_id if latest and action in (DONE, SNOOZE) else None
    row = {
        "from_address": number[:32],
        "body": (body or "")[:MAX_BODY],
        "provider_id": message_sid,
        "action": action,
        "reminder_id": reminder_id,
        "created_at": now,
    }
    if state_db.insert_ignoring_conflicts(conn, inbound, [row]) == 0:
        # A retried webhook: answer as before, change nothing.
        stored = conn.execute(
            sa.select(inbound.c.action).where(inbound.c.provider_id == message_sid)
        ).scalar_one()
        return Answer(
            stored, _text(stored, config, rule, word, locale), reminder_id, duplicate=True
        )

    customer_id = latest.customer_id if latest else None
    if latest is not None and action in (DONE, SNOOZE):
        outbox.on_reply(conn, latest.reminder_id, "replied", word, f"replied {word}", now)
    if action == STOP:
        consent.opt_out(conn, "sms", number, consent.STOP, f"replied {word}", now, customer_id)
    elif action == START:
        consent.opt_in(conn, "sms", number, consent.START, f"replied {word}", now, customer_id)
    elif action == DONE and latest is not None:
        cancel_occurrence(conn, latest.rule, latest.occurrence, f"done: replied {word}", now)
        # The customer says it is done: the reminder answered, whatever was still open.
        outbox.on_reply(conn, latest.reminder_id, "done", word, f"done: replied {word}", now)
    elif action == SNOOZE and latest is not None and reply is not None and reply.delay:
        moved = snooze_occurrence(
            conn, latest.rule, latest.occurrence, reply.delay, f"{SNOOZED}replied {word}", now
        )
        if moved is None:
            log.info("inbound %s from %s: nothing open to move", word, mask(number))
            text = reply_text(config, "nothing_to_move", locale, [], None)
            return Answer(action, text, reminder_id)
    log.info("inbound %s from %s", action, mask(number))
    return Answer(action, _text(action, config, rule, word, locale), reminder_id)


def _text(
    action: str, config: Config, rule: Rule | None, word: str, locale: str | None
) -> str | None:
    """The answer to ``action`` in the customer's language (the word's, else that of the last
    message sent to them, else the default)."""
    if action == HELP:
        return help_text(config, locale)
    if action in (STOP, START, DONE):
        return reply_text(config, action, locale, [], None)
    reply = rule.replies.get(word) if rule is not None else None
    if action == SNOOZE and reply is not None and reply.delay:
        return reply_text(config, SNOOZE, locale, [], reply.delay)
    words = list(rule.replies) if rule is not None else []
    return reply_text(config, UNKNOWN, locale, words, None)


def _babel(tag: str) -> str:
    """A locale tag as Babel takes it (es-MX -> es_MX); English for one it does not know."""
    from babel import Locale, UnknownLocaleError

    try:
        return str(Locale.parse(tag.replace("-", "_")))
    except (UnknownLocaleError, ValueError):
        return "en"


def _later(delay: timedelta, language: str) -> str:
    """``in 1 day``, ``in 36 hours``, ``dentro de 2 semanas``: in the largest unit that divides
    ``delay`` exactly."""
    seconds = int(delay.total_seconds())
    unit: Literal["week", "day", "hour", "minute", "second"] = "second"
    units: tuple[tuple[Literal["week", "day", "hour", "minute"], int], ...] = (
        ("week", 604800),
        ("day", 86400),
        ("hour", 3600),
        ("minute", 60),
    )
    for name, size in units:
        if seconds >= size and seconds % size == 0:
            unit = name
            break
    return format_timedelta(
        delay, granularity=unit, threshold=1e9, add_direction=True, locale=_babel(language)
    )


def _open(conn: Connection, rule: str, occurrence: str) -> list[Any]:
    return list(
        conn.execute(
            sa.select(reminder.c.id, reminder.c.status, reminder.c.send_at)
            .where(
                reminder.c.rule == rule,
                reminder.c.occurrence == occurrence,
                reminder.c.status.in_(OPEN),
            )
            .order_by(reminder.c.send_at, reminder.c.id)
        )
    )


def cancel_occurrence(
    conn: Connection, rule: str, occurrence: str, why: str, now: datetime
) -> list[int]:
    """Cancel an occurrence's open reminders; returns their ids. Each change is recorded."""
    rows = _open(conn, rule, occurrence)
    canceled: list[int] = []
    for status in OPEN:  # conditional on the status read: a worker may be claiming one
        ids = [row.id for row in rows if row.status == status]
        canceled += move(conn, ids, source=status, target=CANCELED, now=now, reason=why)
    return sorted(canceled)


def snooze_occurrence(
    conn: Connection, rule: str, occurrence: str, delay: timedelta, why: str, now: datetime
) -> datetime | None:
    """Move an occurrence's next open reminder by ``delay`` (not earlier than now + ``delay``).

    Its planned time stays, so a rescan does not undo the move. A queued one goes back to pending
    (its queued job then finds nothing to claim) and is dispatched again at the new time. Returns
    the new send time, or None when nothing was open.
    """
    for row in _open(conn, rule, occurrence):
        new_time = max(row.send_at, now) + delay
        values = {"send_at": new_time, "job_id": None, "queued_at": None}
        if move(
            conn, [row.id], source=row.status, target=PENDING, now=now, reason=why, values=values
        ):
            return new_time
    return None
