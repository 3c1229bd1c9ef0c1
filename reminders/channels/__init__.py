"""Channels: one interface (:mod:`.base`), one small module per provider.

``PROVIDERS`` maps the ``provider:`` name of ``config.yaml`` to the class that implements it.
"""

from __future__ import annotations

from reminders.channels.base import Channel, Message
from reminders.channels.outbox import OutboxChannel
from reminders.channels.smtp import SmtpChannel
from reminders.channels.twilio import TwilioChannel

PROVIDERS: dict[str, type[Channel]] = {
    "twilio": TwilioChannel,
    "smtp": SmtpChannel,
    "outbox": OutboxChannel,
}

__all__ = ["PROVIDERS", "Channel", "Message", "OutboxChannel", "SmtpChannel", "TwilioChannel"]
