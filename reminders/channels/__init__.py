"""Channels: one interface (:mod:`.base`), one small module per provider.

``PROVIDERS`` maps the ``provider:`` name of ``config.yaml`` to the class that implements it, and
each class builds itself from its channel's section (:meth:`Channel.from_config`):
:func:`reminders.compose.open_channel` asks nothing else. Provider modules are imported when
first asked for, so commands that send nothing do not pay for importing the Twilio library.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from reminders.channels.base import Channel, Message

if TYPE_CHECKING:
    from reminders.channels.outbox import OutboxChannel
    from reminders.channels.smtp import SmtpChannel
    from reminders.channels.twilio import TwilioChannel

_NAMES = {"twilio": "TwilioChannel", "smtp": "SmtpChannel", "outbox": "OutboxChannel"}
_CLASSES = {
    "TwilioChannel": "reminders.channels.twilio",
    "SmtpChannel": "reminders.channels.smtp",
    "OutboxChannel": "reminders.channels.outbox",
}


class _Providers(Mapping[str, type[Channel]]):
    """Provider name -> channel class, each module imported on first use."""

    def __getitem__(self, name: str) -> type[Channel]:
        cls: type[Channel] = __getattr__(_NAMES[name])
        return cls

    def __iter__(self) -> Iterator[str]:
        return iter(_NAMES)

    def __len__(self) -> int:
        return len(_NAMES)

    def __repr__(self) -> str:
        return f"PROVIDERS({', '.join(_NAMES)})"


PROVIDERS: Mapping[str, type[Channel]] = _Providers()


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(_CLASSES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["PROVIDERS", "Channel", "Message", "OutboxChannel", "SmtpChannel", "TwilioChannel"]
