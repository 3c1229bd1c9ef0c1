"""The one interface every channel provider implements.

A provider takes a rendered :class:`Message` and either returns the provider's id for it or raises
:class:`~reminders.errors.TransientError` (retry later) or :class:`~reminders.errors.PermanentError`
(try the next channel). Which of the two a provider failure is gets decided in one function per
provider, next to the provider's code.

Adding a provider: subclass :class:`Channel`, implement :meth:`Channel.send` (and
:meth:`Channel.send_many` when the provider can do better than one call after another) and
:meth:`Channel.from_config`, map the provider's errors in one place, and register the class in
``reminders.channels.PROVIDERS`` under the ``provider:`` name config.yaml gives it.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING

from reminders.errors import ChannelError

if TYPE_CHECKING:
    from reminders.config import Config, EmailConfig, SmsConfig


@dataclass
class Message:
    """One rendered message for one recipient."""

    reminder_id: int
    rule: str
    channel: str
    to: str  # an E.164 phone number for SMS, an email address for email
    body: str  # the SMS text, or the email's plain text part
    subject: str | None = None
    html: str | None = None
    # email: sent as List-Unsubscribe (with List-Unsubscribe-Post for RFC 8058 one-click)
    unsubscribe_url: str | None = None
    unsubscribe_mailto: str | None = None
    # SMS: Twilio's StatusCallback URL for delivery reports
    status_callback: str | None = None


def body_digest(body: str) -> str:
    """The SHA-256 of a message's text, hex: what reconciliation matches a provider's record on
    (the text itself is not kept)."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


class Channel(ABC):
    """Sends messages through one provider. Instances may be reused for many batches."""

    name: str  # "sms" or "email": the channel this instance serves

    @classmethod
    @abstractmethod
    def from_config(cls, name: str, cfg: SmsConfig | EmailConfig, config: Config) -> Channel:
        """This provider for channel ``name`` as ``cfg``, its section of config.yaml, sets it
        up (``config`` resolves relative paths). The config was validated when loaded."""

    @abstractmethod
    def send(self, message: Message) -> str:
        """Send one message; return the provider's id for it.

        Raises ``TransientError`` or ``PermanentError`` (both ``ChannelError``); any other
        exception is a bug or a configuration mistake and is not caught here.
        """

    def send_many(self, messages: list[Message]) -> list[str | ChannelError]:
        """Send each message on its own; return, in order, its provider id or its error.

        One message failing does not stop the others. The default sends one after another;
        providers override it where they can do better (concurrency, a reused connection).
        """
        results: list[str | ChannelError] = []
        for message in messages:
            try:
                results.append(self.send(message))
            except ChannelError as exc:
                results.append(exc)
        return results

    def close(self) -> None:  # noqa: B027 - optional hook, most providers hold nothing
        """Release connections and threads. The channel must not be used afterwards."""

    def __enter__(self) -> Channel:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
