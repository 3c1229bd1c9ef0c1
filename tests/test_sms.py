from __future__ import annotations

import pytest

from reminders.sms import SegmentInfo, describe_offending, segments


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
    ],
)
def test_segments(text: str, expected: SegmentInfo) -> None:
    assert segments(text) == expected


def test_describe_offending_names_the_character() -> None:
    warning = describe_offending(segments("It’s due"))
    assert "’" in warning and "U+2019" in warning and "UCS-2" in warning
    assert describe_offending(segments("It's due")) == ""
