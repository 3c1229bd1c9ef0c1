from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from reminders.sms import SegmentInfo, clusters, describe_offending, segments
from tests.sms_oracle import Calculator


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", SegmentInfo("GSM-7", 0, 0, "")),
        ("Your refill is due Friday.", SegmentInfo("GSM-7", 1, 26, "")),
        ("a" * 160, SegmentInfo("GSM-7", 1, 160, "")),
        ("a" * 161, SegmentInfo("GSM-7", 2, 161, "")),
        ("a" * 306, SegmentInfo("GSM-7", 2, 306, "")),
        ("a" * 307, SegmentInfo("GSM-7", 3, 307, "")),
        # extension characters take two septets
        ("€", SegmentInfo("GSM-7", 1, 2, "")),
        ("a" * 158 + "€", SegmentInfo("GSM-7", 1, 160, "")),
        ("a" * 159 + "€", SegmentInfo("GSM-7", 2, 161, "")),
        ("[{~^|}]\\", SegmentInfo("GSM-7", 1, 16, "")),
        # an escape sequence is never split across parts: 152 + (2) does not fit 153
        ("a" * 152 + "€" + "a" * 153, SegmentInfo("GSM-7", 3, 307, "")),
        # the GSM basic set is more than ASCII
        ("Grüße, ça coûte 5£ ¿Qué? Ñ ΔΣ", SegmentInfo("UCS-2", 1, 29, "çû")),
        ("Ärger über Öl: 5 € @ 10:00 Ü é è à ù ì ò ø å Å", SegmentInfo("GSM-7", 1, 47, "")),
        # one non-GSM character switches the whole message
        ("It’s due", SegmentInfo("UCS-2", 1, 8, "’")),
        ("a" * 70 + "’", SegmentInfo("UCS-2", 2, 71, "’")),
        ("a" * 69 + "’", SegmentInfo("UCS-2", 1, 70, "’")),
        ("a" * 133 + "’", SegmentInfo("UCS-2", 2, 134, "’")),
        ("a" * 134 + "’", SegmentInfo("UCS-2", 3, 135, "’")),
        ("a" * 133 + "’" + "a", SegmentInfo("UCS-2", 3, 135, "’")),
        ("Due\u00a0Friday", SegmentInfo("UCS-2", 1, 10, "\u00a0")),
        # emoji outside the BMP are two UTF-16 code units, never split across parts
        ("😀" * 35, SegmentInfo("UCS-2", 1, 70, "😀")),
        ("😀" * 36, SegmentInfo("UCS-2", 2, 72, "😀")),
        ("a" + "😀" * 33 + "b", SegmentInfo("UCS-2", 1, 68, "😀")),
        ("a" * 66 + "😀" + "a" * 4, SegmentInfo("UCS-2", 2, 72, "😀")),
        ("“Hi” 😀 ’", SegmentInfo("UCS-2", 1, 9, "“”😀’")),
        # a grapheme cluster is never split across parts (a flag is two regional indicators)
        ("a" * 65 + "🇫🇷" + "a" * 65, SegmentInfo("UCS-2", 3, 134, "🇫🇷")),
        ("a" * 65 + "🇫🇷" + "a" * 63, SegmentInfo("UCS-2", 2, 132, "🇫🇷")),
        # ... nor a combining accent from its letter, a keycap, a skin tone, a ZWJ sequence
        ("a" * 66 + "e\u0301" + "a" * 66, SegmentInfo("UCS-2", 3, 134, "\u0301")),
        ("a" * 65 + "1\ufe0f\u20e3" + "a" * 65, SegmentInfo("UCS-2", 3, 133, "\ufe0f\u20e3")),
        ("a" * 65 + "👍🏽" + "a" * 65, SegmentInfo("UCS-2", 3, 134, "👍🏽")),
        (
            "a" * 63 + "👨\u200d👩\u200d👧" + "a" * 63,
            SegmentInfo("UCS-2", 3, 134, "👨\u200d👩👧"),
        ),
        # CR LF is two characters, as in GSM 03.38 and Twilio's calculator
        ("\r\n" * 80, SegmentInfo("GSM-7", 1, 160, "")),
        ("a" * 66 + "\r\n" + "a" * 65 + "’", SegmentInfo("UCS-2", 2, 134, "’")),
        # a cluster longer than a part cannot stay whole: it is split between characters
        ("e" + "\u0301" * 80, SegmentInfo("UCS-2", 2, 81, "\u0301")),
        ("e" + "\u0301" * 150, SegmentInfo("UCS-2", 3, 151, "\u0301")),
    ],
)
def test_segments(text: str, expected: SegmentInfo) -> None:
    assert segments(text) == expected


def test_describe_offending_names_the_character() -> None:
    warning = describe_offending(segments("It’s due"))
    assert "’" in warning and "U+2019" in warning and "UCS-2" in warning
    assert describe_offending(segments("It's due")) == ""


def test_clusters_keep_what_a_reader_sees_as_one_character() -> None:
    assert clusters("e\u0301🇫🇷1\ufe0f\u20e3👍🏽👨\u200d👩\u200d👧\r\n") == [
        "e\u0301",
        "🇫🇷",
        "1\ufe0f\u20e3",
        "👍🏽",
        "👨\u200d👩\u200d👧",
        "\r",
        "\n",
    ]


# Texts for the oracle are made of pieces whose grapheme clusters both sides split alike: the
# calculator's grapheme-splitter follows Unicode 9's rules, the ``regex`` module today's (Unicode
# 11 made any character before a skin tone, and ZWJ before any pictograph, one cluster; Unicode
# 15.1 joined Indic conjuncts). Those newer clusters are what handsets show as one character.
PIECES = [
    *"abcxyz019 .,!?@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉÄÖÑÜ§¿äöñüà",  # GSM 03.38 basic set
    *"\n\r",
    "\r\n",
    *"€[]{}^~|\\\f",  # the extension table: two septets each
    *"’“”\u00a0çûЖжλ中文한",  # outside GSM 03.38, one UTF-16 unit each
    "😀",
    "🎉",
    "👍🏽",  # skin tone
    "🇫🇷",
    "🇩🇪",  # flags
    "1\ufe0f\u20e3",
    "#\ufe0f\u20e3",  # keycaps
    "e\u0301",
    "a\u0308\u0301",  # combining accents
    "👨\u200d👩\u200d👧",
    "👩\u200d❤\ufe0f\u200d👨",  # ZWJ sequences
    "❤\ufe0f",
]


def _agree(calculator: Calculator, text: str) -> None:
    answer = calculator.count(text)
    ours = segments(text)
    assert answer.graphemes == clusters(text), "the oracle splits this text differently"
    assert (ours.encoding, ours.segments) == (answer.encoding, answer.segments)


@pytest.mark.parametrize(
    "text",
    [
        "Your refill is due Friday.",
        "a" * 153 + "€" + "a" * 153,
        "a" * 65 + "🇫🇷" + "a" * 65,
        "a" * 66 + "e\u0301" + "a" * 66,
        "a" * 65 + "1\ufe0f\u20e3" + "a" * 65,
        "a" * 65 + "👍🏽" + "a" * 65,
        "a" * 63 + "👨\u200d👩\u200d👧" + "a" * 63,
        "\r\n" * 80,
        "a" * 66 + "\r\n" + "a" * 65 + "’",
        "Hi Chloé, your prescription 💊 runs out Friday 🇫🇷 — reply DONE or LATER",
    ],
)
def test_segments_agree_with_twilios_calculator(twilio_calculator: Calculator, text: str) -> None:
    _agree(twilio_calculator, text)


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Runs of a piece reach every part boundary from short lists (which Hypothesis shrinks well).
@given(
    runs=st.lists(st.tuples(st.sampled_from(PIECES), st.integers(1, 80)), min_size=1, max_size=12)
)
@example(runs=[("a", 65), ("🇫🇷", 1), ("a", 65)])
def test_segments_property_against_twilios_calculator(
    twilio_calculator: Calculator, runs: list[tuple[str, int]]
) -> None:
    _agree(twilio_calculator, "".join(piece * count for piece, count in runs))
