"""SMS length and encoding: how many parts a text is billed as, and what forces UCS-2.

A text made only of GSM 03.38 characters is sent as GSM-7: 160 characters in one part, 153 per part
once it is split (the rest of each part carries the concatenation header). Characters of the GSM
extension table (``€ [ ] { } ^ ~ | \\`` and form feed) take two septets (an escape and the
character). A single character outside both tables (an emoji, a curly quote, a non-breaking space)
switches the whole message to UCS-2: 70 UTF-16 code units in one part, 67 per part (an emoji outside
the Basic Multilingual Plane is two code units).

What a reader sees as one character is never split across parts: an escape sequence, a surrogate
pair, and a whole grapheme cluster (a letter and its combining accent, a flag, a keycap, an emoji
with its skin tone, a ZWJ sequence), as Twilio's own calculator packs them (npm
``sms-segments-calculator``, the tests' oracle). Clusters follow today's Unicode rules (the
``regex`` module's ``\\X``); CR LF counts as two characters, as GSM 03.38 and the calculator have
it. A cluster longer than a part cannot stay whole and is split between its characters.

See https://www.twilio.com/docs/glossary/what-sms-character-limit.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Literal

import regex

# GSM 03.38 basic character set (ESC, 0x1B, left out: it introduces the extension table).
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# GSM 03.38 extension table: each costs two septets.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")
GSM7_ALL = GSM7_BASIC | GSM7_EXTENSION

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67

Encoding = Literal["GSM-7", "UCS-2"]

_CLUSTER = regex.compile(r"\X")


@dataclass(frozen=True)
class SegmentInfo:
    """How a text is sent: its encoding, its billed parts, its length in the encoding's units.

    ``length`` counts septets for GSM-7 (extension characters count 2) and UTF-16 code units for
    UCS-2. ``offending`` holds, once each and in order of appearance, the characters that forced
    UCS-2 (empty for GSM-7).
    """

    encoding: Encoding
    segments: int
    length: int
    offending: str


def clusters(text: str) -> list[str]:
    """Split ``text`` into what a reader sees as characters (extended grapheme clusters).

    CR LF, one cluster for Unicode, is two characters here, as GSM 03.38 has both.
    """
    found: list[str] = _CLUSTER.findall(text)
    if "\r\n" not in text:
        return found
    split: list[str] = []
    for cluster in found:
        if cluster == "\r\n":
            split.extend(cluster)
        else:
            split.append(cluster)
    return split


def _units(chars: str, encoding: Encoding) -> int:
    """Length of ``chars`` in septets (GSM-7) or UTF-16 code units (UCS-2)."""
    if len(chars) == 1:  # most clusters: answered without a loop
        if encoding == "GSM-7":
            return 2 if chars in GSM7_EXTENSION else 1
        return 2 if chars > "\uffff" else 1
    if encoding == "GSM-7":
        return len(chars) + sum(1 for c in chars if c in GSM7_EXTENSION)
    return len(chars) + sum(1 for c in chars if c > "\uffff")


def _sizes(text: str, encoding: Encoding, per_part: int) -> list[int]:
    """The units of each piece that must stay in one part: clusters, and the characters of a
    cluster too long for any part."""
    sizes: list[int] = []
    for cluster in clusters(text):
        size = _units(cluster, encoding)
        if size > per_part:
            sizes.extend(_units(c, encoding) for c in cluster)
        else:
            sizes.append(size)
    return sizes


def _parts(sizes: list[int], single: int, per_part: int) -> int:
    """Count parts, packing whole pieces (never splitting one) ``per_part`` units a part."""
    total = sum(sizes)
    if total == 0:
        return 0
    if total <= single:
        return 1
    parts, used = 1, 0
    for size in sizes:
        if used + size > per_part:
            parts, used = parts + 1, 0
        used += size
    return parts


def segments(text: str) -> SegmentInfo:
    """Return the encoding, number of billed parts and length of ``text`` sent as an SMS.

    An empty text is zero parts.
    """
    present = set(text)
    if present <= GSM7_ALL:
        encoding: Encoding = "GSM-7"
        offending = ""
        length = len(text) + sum(text.count(c) for c in present & GSM7_EXTENSION)
        single, per_part = GSM7_SINGLE, GSM7_PART
    else:
        encoding = "UCS-2"
        offending = "".join(dict.fromkeys(c for c in text if c not in GSM7_ALL))
        length = len(text) + sum(text.count(c) for c in present if ord(c) > 0xFFFF)  # surrogates
        single, per_part = UCS2_SINGLE, UCS2_PART
    if length <= single:  # one part (or none): no need to pack characters into parts
        count = 1 if length else 0
    else:
        count = _parts(_sizes(text, encoding, per_part), single, per_part)
    return SegmentInfo(encoding=encoding, segments=count, length=length, offending=offending)


def describe_offending(info: SegmentInfo) -> str:
    """A warning naming what forced UCS-2, for ``validate`` and ``preview``; empty for GSM-7.

    E.g. ``’ (U+2019 RIGHT SINGLE QUOTATION MARK) forces UCS-2: 70 characters a part instead of
    160``.
    """
    if not info.offending:
        return ""
    names = ", ".join(
        f"{c if c.isprintable() else repr(c)} (U+{ord(c):04X} {unicodedata.name(c, 'unnamed')})"
        for c in info.offending
    )
    verb = "forces" if len(info.offending) == 1 else "force"
    return f"{names} {verb} UCS-2: {UCS2_SINGLE} characters a part instead of {GSM7_SINGLE}"
