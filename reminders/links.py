"""Signed links in messages: one-click unsubscribe and the customer's preferences page.

A token names one customer (and, for unsubscribe, the channel and which of their addresses it
stops), is signed with ``REMINDERS_SECRET`` (HMAC, itsdangerous) and carries the time it was made,
on the engine's clock. It is valid for ``web.link_max_age`` (default 90 days: unsubscribe requests
arrive late, and the law asks for 30).

A token's payload is signed, not encrypted: anyone who sees the URL (mail logs, link scanners,
proxies) can read it. So it carries no personal data: the customer's id as the business keys
them, and for the address an opaque tag (a keyed HMAC of it, 96 bits) that only the server can
match, against the addresses it sent that customer messages at (:func:`match_address`).
Unsubscribe links made before the tag named the address itself; they are still honoured until
they expire (``read_unsubscribe`` reads both kinds), and no new one is made.

``REMINDERS_SECRET_PREVIOUS`` (optional) still verifies links signed before a key rotation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner, URLSafeTimedSerializer
from itsdangerous.signer import HMACAlgorithm

from . import clock
from .config import Config
from .errors import ConfigError, Problem, RemindersError

SECRET_ENV = "REMINDERS_SECRET"
PREVIOUS_SECRET_ENV = "REMINDERS_SECRET_PREVIOUS"
MIN_SECRET_LENGTH = 16
DEFAULT_MAX_AGE = timedelta(days=90)
UNSUBSCRIBE_PATH = "/unsubscribe/"
PREFERENCES_PATH = "/preferences/"

# A salt per purpose: an unsubscribe token is never accepted as a preferences token, or back.
_UNSUBSCRIBE = "reminders.unsubscribe.v2"
_PREFERENCES = "reminders.preferences.v1"
# Unsubscribe tokens whose payload was the address itself, read until they expire.
_UNSUBSCRIBE_V1 = "reminders.unsubscribe.v1"
_ADDRESS_TAG = b"reminders.unsubscribe.address\x00"


class LinkError(RemindersError):
    """A token that is not ours, was altered, or has expired (``expired`` says which)."""

    def __init__(self, message: str, *, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True)
class Unsubscribe:
    """What an unsubscribe token stops: one address on one channel, of one customer."""

    customer_id: str
    channel: str
    address: str


@dataclass(frozen=True)
class UnsubscribeLink:
    """What an unsubscribe token says: a customer, a channel, and the address as an opaque
    ``tag`` (see :func:`match_address`); a token made before tags has ``address`` instead."""

    customer_id: str
    channel: str
    tag: str | None = None
    address: str | None = None


def secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The signing keys, oldest first (the last one signs). Raises ``ConfigError`` when unset."""
    env = os.environ if env is None else env
    current = env.get(SECRET_ENV, "")
    if not current:
        raise ConfigError(
            Problem(
                f"environment variable {SECRET_ENV} is not set: links in messages are signed "
                "with it (set a long random value, e.g. the output of "
                "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        )
    if len(current) < MIN_SECRET_LENGTH:
        raise ConfigError(
            Problem(f"{SECRET_ENV} is too short: use at least {MIN_SECRET_LENGTH} characters")
        )
    previous = env.get(PREVIOUS_SECRET_ENV, "")
    return [previous, current] if previous else [current]


class _ClockSigner(TimestampSigner):
    """Timestamps on the engine's clock (``REMINDERS_NOW`` in tests), not the wall clock."""

    def __init__(self, *args: Any, now: datetime | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._now = now

    def get_timestamp(self) -> int:
        return int((self._now or clock.now()).timestamp())


class _ShortHMAC(HMACAlgorithm):
    """HMAC-SHA256 cut to 128 bits: ample for a MAC, and 21 characters shorter in every text."""

    def get_signature(self, key: bytes, value: bytes) -> bytes:
        return super().get_signature(key, value)[:16]


_ALGORITHM = _ShortHMAC(hashlib.sha256)


def _serializer(
    purpose: str, keys: list[str] | None, now: datetime | None
) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(
        keys if keys is not None else secrets(),
        salt=purpose,
        signer=_ClockSigner,
        signer_kwargs={"now": now, "digest_method": hashlib.sha256, "algorithm": _ALGORITHM},
    )


def _load(
    purpose: str,
    token: str,
    keys: list[str] | None,
    now: datetime | None,
    max_age: timedelta,
) -> Any:
    try:
        return _serializer(purpose, keys, now).loads(token, max_age=int(max_age.total_seconds()))
    except SignatureExpired:
        raise LinkError("this link has expired", expired=True) from None
    except BadSignature:
        raise LinkError("this link is not valid") from None


def _base(config: Config) -> str:
    if not config.web.public_url:
        raise ConfigError(
            Problem(
                "web.public_url is not set: links in messages need the address customers reach "
                "(e.g. web: {public_url: https://reminders.example.com})",
                config.file,
            )
        )
    return config.web.public_url


def address_tag(channel: str, address: str, key: str) -> str:
    """The opaque tag of ``address`` on ``channel`` under signing ``key`` (16 URL-safe characters).

    Keyed, so it cannot be reversed by hashing guessed addresses; the address is normalised
    first, so any spelling of one address has one tag.
    """
    data = _ADDRESS_TAG + f"{channel}\x00{normalize_address(channel, address)}".encode()
    mac = hmac.new(key.encode(), data, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:12]).decode()


def unsubscribe_token(
    customer_id: str,
    channel: str,
    address: str,
    *,
    keys: list[str] | None = None,
    now: datetime | None = None,
) -> str:
    """A signed token that unsubscribes ``address`` from ``channel`` for ``customer_id``; it
    carries the address only as an opaque tag."""
    keys = keys if keys is not None else secrets()
    payload = [str(customer_id), channel, address_tag(channel, address, keys[-1])]
    return str(_serializer(_UNSUBSCRIBE, keys, now).dumps(payload))


def unsubscribe_url(
    config: Config,
    customer_id: str,
    channel: str,
    address: str,
    *,
    now: datetime | None = None,
) -> str:
    """The one-click unsubscribe URL for a message (``List-Unsubscribe``, a footer link)."""
    token = unsubscribe_token(customer_id, channel, address, now=now)
    return f"{_base(config)}{UNSUBSCRIBE_PATH}{token}"


def read_unsubscribe(
    token: str,
    *,
    keys: list[str] | None = None,
    now: datetime | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> UnsubscribeLink:
    """Verify an unsubscribe token (of either kind); raises ``LinkError`` when forged, altered or
    expired. The address it names is found with :func:`match_address`."""
    try:
        payload = _load(_UNSUBSCRIBE, token, keys, now, max_age)
        current = True
    except LinkError as exc:
        if exc.expired:
            raise
        payload = _load(_UNSUBSCRIBE_V1, token, keys, now, max_age)
        current = False
    if (
        not isinstance(payload, list)
        or len(payload) != 3
        or not all(isinstance(p, str) and p for p in payload)
    ):
        raise LinkError("this link is not valid")
    customer_id, channel, third = payload
    if current:
        return UnsubscribeLink(customer_id, channel, tag=third)
    return UnsubscribeLink(customer_id, channel, address=third)


def match_address(
    link: UnsubscribeLink, addresses: Iterable[str], *, keys: list[str] | None = None
) -> Unsubscribe | None:
    """What ``link`` stops: the one of ``addresses`` (the customer's on the link's channel) whose
    tag it carries, under any signing key; None when none is. A token made before tags names
    its address and needs none."""
    if link.address is not None:
        return Unsubscribe(link.customer_id, link.channel, link.address)
    assert link.tag is not None
    keys = keys if keys is not None else secrets()
    for address in addresses:
        for key in keys:
            if hmac.compare_digest(address_tag(link.channel, address, key), link.tag):
                normal = normalize_address(link.channel, address)
                return Unsubscribe(link.customer_id, link.channel, normal)
    return None


def preferences_token(
    customer_id: str, *, keys: list[str] | None = None, now: datetime | None = None
) -> str:
    """A signed token that opens ``customer_id``'s preferences page."""
    return str(_serializer(_PREFERENCES, keys, now).dumps(str(customer_id)))


def preferences_url(config: Config, customer_id: str, *, now: datetime | None = None) -> str:
    """The URL of the customer's preferences page (upcoming reminders, on/off switches)."""
    return f"{_base(config)}{PREFERENCES_PATH}{preferences_token(customer_id, now=now)}"


def read_preferences(
    token: str,
    *,
    keys: list[str] | None = None,
    now: datetime | None = None,
    max_age: timedelta = DEFAULT_MAX_AGE,
) -> str:
    """Verify a preferences token and return its customer id; raises ``LinkError``."""
    payload = _load(_PREFERENCES, token, keys, now, max_age)
    if not isinstance(payload, str) or not payload:
        raise LinkError("this link is not valid")
    return payload


def form_nonce(token: str, *, keys: list[str] | None = None) -> str:
    """A nonce for the forms of a page opened by ``token``: a POST must carry it back.

    Derived from the token (HMAC with the current key), so a form cannot be replayed against
    another customer's page, and no server-side session is needed.
    """
    key = (keys if keys is not None else secrets())[-1]
    mac = hmac.new(key.encode(), b"form-nonce\x00" + token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac[:18]).decode()


def check_nonce(token: str, nonce: str | None, *, keys: list[str] | None = None) -> bool:
    """Whether ``nonce`` is the form nonce of ``token`` (constant-time)."""
    if not nonce:
        return False
    return hmac.compare_digest(form_nonce(token, keys=keys).encode(), nonce.encode())


def normalize_address(channel: str, address: str) -> str:
    """Addresses as consent compares and keeps them (opt-outs, unsubscribe tags): emails trimmed
    and lowercased, so any case matches; numbers trimmed."""
    text = (address or "").strip()
    return text.lower() if channel == "email" else text
