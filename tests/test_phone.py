from __future__ import annotations

from typing import Any

import pytest

from reminders.errors import PermanentError
from reminders.phone import mask, mask_email, mask_numbers_in, normalize


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("+15005550006", "US", "+15005550006"),
        ("(415) 555-2671", "US", "+14155552671"),
        ("415.555.2671", "US", "+14155552671"),
        ("1-415-555-2671", "US", "+14155552671"),
        ("  +1 415 555 2671  ", None, "+14155552671"),
        ("+44 7911 123456", "US", "+447911123456"),
        ("07911 123456", "GB", "+447911123456"),
        ("06 12 34 56 78", "FR", "+33612345678"),
        ("+33 6 12 34 56 78", None, "+33612345678"),
        ("0151 23456789", "DE", "+4915123456789"),
    ],
)
def test_normalize(raw: str, region: str | None, expected: str) -> None:
    assert normalize(raw, region) == expected


@pytest.mark.parametrize(
    ("raw", "region", "reason", "shown"),
    [
        ("", "US", "no phone number", ""),
        ("   ", "US", "no phone number", ""),
        ("call me", "US", "is not a phone number", "***"),
        ("555-0006", "US", "not a valid number for US", "****006"),
        ("(415) 555-267", "US", "not a valid number", "*****5267"),
        ("+1 415 555 26710", None, "not a valid number", "+1*******6710"),
        ("+999 1234 5678", "US", "unknown country code", "+*******5678"),
        ("415 555 2671", None, "has no country code", "******2671"),
        ("07911 12345", "GB", "not a valid number for GB", "******2345"),
    ],
)
def test_normalize_rejects_without_showing_the_number(
    raw: str, region: str | None, reason: str, shown: str
) -> None:
    with pytest.raises(PermanentError) as caught:
        normalize(raw, region)
    error = caught.value
    assert error.permanent and error.code == "invalid_number" and not error.opt_out
    assert reason in error.message
    assert shown in error.message
    digits = "".join(c for c in raw if c.isdigit())
    if len(digits) >= 6:
        assert digits not in "".join(c for c in error.message if c.isdigit() or c == " ")


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+15005550006", "+1******0006"),
        ("+447911123456", "+44******3456"),
        ("+33612345678", "+33*****5678"),
        ("(415) 555-2671", "******2671"),
        ("5550006", "****006"),
        ("12345", "***45"),
        ("12", "**"),
        ("", "***"),
        ("no digits", "***"),
    ],
)
def test_mask(number: str, masked: str) -> None:
    assert mask(number) == masked


@pytest.mark.parametrize(
    ("address", "masked"),
    [
        ("jane.doe@example.com", "j*******@example.com"),
        ("a@example.com", "a*@example.com"),
        ("@example.com", "***@example.com"),
        ("not-an-address", "***"),
        ("", "***"),
    ],
)
def test_mask_email(address: str, masked: str) -> None:
    assert mask_email(address) == masked


def test_mask_numbers_in_provider_text() -> None:
    text = "The 'To' number +15005550001 is not a valid phone number. Error 21211."
    assert mask_numbers_in(text) == (
        "The 'To' number +1******0001 is not a valid phone number. Error 21211."
    )


def test_a_number_or_address_checked_again_gets_the_same_answer_from_the_cache() -> None:
    """The outcome of a check is kept (the console's forecast checks every pending reminder's
    number and address): a second check of the same text answers the same, a failure raises a
    new error each time, and the kept answer is used."""
    from reminders import email_address, phone

    def outcome(check: Any, raw: str) -> tuple[str, str]:
        try:
            return "ok", str(check(raw))
        except PermanentError as exc:
            return exc.code or "", str(exc)

    cases = [
        (lambda raw: normalize(raw, "US"), "(415) 555-2671", phone._checked),
        (lambda raw: normalize(raw, "US"), "+1 415 000 0999", phone._checked),
        (lambda raw: normalize(raw, "US"), "call me", phone._checked),
        (email_address.check, "Chloe@Example.COM", email_address._validated),
        (email_address.check, "chloe..x@example.com", email_address._validated),
    ]
    for check, raw, cache in cases:
        first = outcome(check, raw)
        hits = cache.cache_info().hits
        assert outcome(check, raw) == first
        assert cache.cache_info().hits == hits + 1, raw
    assert outcome(*cases[0][:2]) == ("ok", "+14155552671")
    assert outcome(*cases[1][:2])[0] == "invalid_number"
    assert outcome(*cases[3][:2]) == ("ok", "Chloe@example.com")
    assert outcome(*cases[4][:2])[0] == "invalid_address"
