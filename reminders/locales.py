"""Which language a message is written in: a customer's locale against the template variants.

A template may have variants beside its default, ``<name>.<locale>.<channel>.j2``
(``refill-due.es.sms.j2``, ``refill-due.fr-CA.email.j2``). The customer's ``locale`` column
chooses, in this order: the exact locale, then its language alone, then ``default_locale``
(config) exactly, then its language alone, then the default template. ``fr-CA``, ``fr_CA`` and
``FR-ca`` are one locale (BCP 47 tags compare case-insensitively; ``_`` is the POSIX spelling of
``-``). A locale that is empty, malformed or has no variant falls through to the next step: a
customer's row never fails a message for its locale (Knock does the same: fr-BE -> fr -> default).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Collection

# A language (2-3 letters, or 5-8 registered), then subtags of 1-8 letters or digits.
_TAG = re.compile(r"^[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*$")


def normalize(value: object) -> str | None:
    """A locale as one canonical tag (``fr_CA``, ``FR-ca`` -> ``fr-CA``), None if it is not one.

    The language is lowercased, a four-letter script title-cased (``zh-Hant``), a region
    uppercased (``es-419`` stays); the tag keeps its subtags in their order.
    """
    if not isinstance(value, str):
        return None
    text = value.strip()
    if "." in text:  # a POSIX locale's charset: en_US.UTF-8
        text = text.split(".", 1)[0]
    if "@" in text:
        text = text.split("@", 1)[0]
    if not _TAG.match(text):
        return None
    language, *rest = re.split(r"[-_]", text)
    parts = [language.lower()]
    for part in rest:
        if len(part) == 4 and part.isalpha():
            parts.append(part.title())
        elif len(part) in (2, 3) and (part.isalpha() or part.isdigit()):
            parts.append(part.upper())
        else:
            parts.append(part.lower())
    return "-".join(parts)


def language(tag: str) -> str:
    """The language of a canonical tag: ``fr-CA`` -> ``fr``."""
    return tag.split("-", 1)[0]


def candidates(customer: object, default: object = None) -> list[str]:
    """The variants to look for, best first: the customer's tag, its language, then the
    default's tag and its language (each once)."""
    found: list[str] = []
    for value in (customer, default):
        tag = normalize(value)
        if tag is None:
            continue
        for candidate in (tag, language(tag)):
            if candidate not in found:
                found.append(candidate)
    return found


def choose(available: Collection[str], customer: object, default: object = None) -> str | None:
    """The variant (a canonical tag among ``available``) for a customer, or None for the
    default template."""
    for candidate in candidates(customer, default):
        if candidate in available:
            return candidate
    return None


def fold(word: str) -> str:
    """A keyword as compared: uppercased, accents dropped (``sí`` and ``SI`` are one word: phones
    and customers leave accents out as often as they type them)."""
    decomposed = unicodedata.normalize("NFKD", word.upper())
    return "".join(c for c in decomposed if not unicodedata.combining(c))
