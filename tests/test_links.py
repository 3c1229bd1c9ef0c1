"""Signed links: round trips, forgery, expiry on the engine clock, purposes, the secret."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reminders import links
from reminders.config import load_config
from reminders.errors import ConfigError

KEYS = ["k" * 32]
T0 = datetime(2027, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def config(tmp_path: Path):  # type: ignore[no-untyped-def]
    file = tmp_path / "config.yaml"
    file.write_text(
        "source: {url: sqlite:///business.db}\nweb: {public_url: https://r.example.com/}\n"
    )
    return load_config(file)


def test_unsubscribe_round_trip_finds_the_address_in_any_case() -> None:
    token = links.unsubscribe_token("42", "email", "  Jane.Doe@Example.COM ", keys=KEYS, now=T0)
    got = links.read_unsubscribe(token, keys=KEYS, now=T0 + timedelta(days=1))
    assert (got.customer_id, got.channel, got.address) == ("42", "email", None)
    mine = ["other@example.com", "jane.doe@example.com"]
    found = links.match_address(got, mine, keys=KEYS)
    assert found == links.Unsubscribe("42", "email", "jane.doe@example.com")
    assert links.match_address(got, ["other@example.com", "jane@example.com"], keys=KEYS) is None


def _payload(token: str) -> str:
    return base64.urlsafe_b64decode(token.split(".")[0] + "==").decode()


def test_an_unsubscribe_token_carries_no_address() -> None:
    email = links.unsubscribe_token("183", "email", "chloe.walker@example.com", keys=KEYS, now=T0)
    sms = links.unsubscribe_token("183", "sms", "+14155552671", keys=KEYS, now=T0)
    assert "chloe" not in _payload(email) and "example" not in _payload(email)
    assert "4155552671" not in _payload(sms)
    assert json.loads(_payload(email))[:2] == ["183", "email"]
    # the tag is keyed: without the secret, hashing guessed addresses finds nothing
    tag = json.loads(_payload(email))[2]
    assert tag == links.address_tag("email", "Chloe.Walker@example.com", KEYS[0])
    assert tag != links.address_tag("email", "chloe.walker@example.com", "z" * 32)
    assert len(email) < 80  # short enough for a text


def test_a_tag_made_before_a_key_rotation_still_matches() -> None:
    old, new = "o" * 32, "n" * 32
    token = links.unsubscribe_token("42", "email", "jane@example.com", keys=[old], now=T0)
    link = links.read_unsubscribe(token, keys=[old, new], now=T0)
    assert links.match_address(link, ["jane@example.com"], keys=[new]) is None
    assert links.match_address(link, ["jane@example.com"], keys=[old, new]) is not None


# Made before links carried no address: ["42","email","jane@example.com"] signed with KEYS at T0.
OLD_STYLE = "WyI0MiIsImVtYWlsIiwiamFuZUBleGFtcGxlLmNvbSJd.a4VdwA.kToPCUYXxuk5i3snPoFqFw"


def test_a_link_made_before_tags_is_read_until_it_expires() -> None:
    link = links.read_unsubscribe(OLD_STYLE, keys=KEYS, now=T0 + timedelta(days=89))
    assert link.address == "jane@example.com" and link.tag is None
    found = links.match_address(link, [], keys=KEYS)
    assert found == links.Unsubscribe("42", "email", "jane@example.com")
    with pytest.raises(links.LinkError) as caught:
        links.read_unsubscribe(OLD_STYLE, keys=KEYS, now=T0 + timedelta(days=91))
    assert caught.value.expired
    with pytest.raises(links.LinkError):
        links.read_unsubscribe(OLD_STYLE, keys=["z" * 32], now=T0)


def test_url_uses_public_url_and_secret_from_environment(
    config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(links.SECRET_ENV, KEYS[0])
    url = links.unsubscribe_url(config, "42", "email", "jane@example.com", now=T0)
    assert url.startswith("https://r.example.com/unsubscribe/")
    token = url.rsplit("/", 1)[1]
    found = links.match_address(links.read_unsubscribe(token, now=T0), ["jane@example.com"])
    assert found is not None and found.address == "jane@example.com"
    prefs = links.preferences_url(config, "42", now=T0)
    assert prefs.startswith("https://r.example.com/preferences/")
    assert links.read_preferences(prefs.rsplit("/", 1)[1], now=T0) == "42"


def test_token_is_url_safe_and_short_enough_for_a_text() -> None:
    token = links.preferences_token("1234567", keys=KEYS, now=T0)
    assert all(c.isalnum() or c in "-_." for c in token)
    assert len(token) < 50


def test_valid_for_90_days_then_expired() -> None:
    token = links.preferences_token("7", keys=KEYS, now=T0)
    assert links.read_preferences(token, keys=KEYS, now=T0 + timedelta(days=89)) == "7"
    with pytest.raises(links.LinkError) as caught:
        links.read_preferences(token, keys=KEYS, now=T0 + timedelta(days=91))
    assert caught.value.expired


def test_forged_and_altered_tokens_are_refused() -> None:
    token = links.unsubscribe_token("42", "email", "jane@example.com", keys=KEYS, now=T0)
    other = ["z" * 32]
    for bad in (
        links.unsubscribe_token("42", "email", "jane@example.com", keys=other, now=T0),
        token[:-2] + ("AA" if not token.endswith("AA") else "BB"),
        token.replace(".", "", 1),
        "not-a-token",
        "",
    ):
        with pytest.raises(links.LinkError) as caught:
            links.read_unsubscribe(bad, keys=KEYS, now=T0)
        assert not caught.value.expired


def test_a_token_of_one_purpose_is_not_accepted_for_the_other() -> None:
    prefs = links.preferences_token("42", keys=KEYS, now=T0)
    unsub = links.unsubscribe_token("42", "email", "jane@example.com", keys=KEYS, now=T0)
    with pytest.raises(links.LinkError):
        links.read_unsubscribe(prefs, keys=KEYS, now=T0)
    with pytest.raises(links.LinkError):
        links.read_preferences(unsub, keys=KEYS, now=T0)


def test_previous_secret_still_verifies_after_rotation(monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = "o" * 32, "n" * 32
    token = links.preferences_token("42", keys=[old], now=T0)
    monkeypatch.setenv(links.SECRET_ENV, new)
    monkeypatch.delenv(links.PREVIOUS_SECRET_ENV, raising=False)
    with pytest.raises(links.LinkError):
        links.read_preferences(token, now=T0)
    monkeypatch.setenv(links.PREVIOUS_SECRET_ENV, old)
    assert links.read_preferences(token, now=T0) == "42"
    # new links are signed with the current key only
    fresh = links.preferences_token("42", now=T0)
    assert links.read_preferences(fresh, keys=[new], now=T0) == "42"


def test_missing_or_short_secret_is_a_clear_error(config, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(links.SECRET_ENV, raising=False)
    with pytest.raises(ConfigError, match="REMINDERS_SECRET is not set"):
        links.preferences_url(config, "42")
    monkeypatch.setenv(links.SECRET_ENV, "short")
    with pytest.raises(ConfigError, match="too short"):
        links.preferences_url(config, "42")


def test_missing_public_url_is_a_clear_error(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("source: {url: sqlite:///business.db}\n")
    with pytest.raises(ConfigError, match=r"web\.public_url is not set"):
        links.preferences_url(load_config(file), "42")


def test_link_max_age_below_60_days_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "config.yaml"
    file.write_text("source: {url: sqlite:///b.db}\nweb: {link_max_age: 30d}\n")
    with pytest.raises(ConfigError, match="60 days"):
        load_config(file)


def test_form_nonce_is_bound_to_the_token() -> None:
    a = links.preferences_token("1", keys=KEYS, now=T0)
    b = links.preferences_token("2", keys=KEYS, now=T0)
    nonce = links.form_nonce(a, keys=KEYS)
    assert links.check_nonce(a, nonce, keys=KEYS)
    assert not links.check_nonce(b, nonce, keys=KEYS)
    assert not links.check_nonce(a, "", keys=KEYS)
    assert not links.check_nonce(a, None, keys=KEYS)
