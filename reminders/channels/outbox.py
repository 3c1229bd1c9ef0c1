"""The outbox: messages written as JSON lines to a file instead of being sent.

The demo's and development's default provider, and a record tests can read. One JSON object a
line, with the keys ``reminder_id, rule, channel, to, subject, body, sent_at`` (``sent_at`` in UTC,
``2027-03-14T14:00:00Z``, from the engine's clock). The file is opened with ``O_APPEND`` and each
line goes out in a single ``write()``, so several processes may append to one outbox without their
lines interleaving; nothing is buffered in the process, so a batch is on disk (in the page cache)
as soon as ``send_many`` returns.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from reminders import clock
from reminders.channels.base import Channel, Message
from reminders.errors import TransientError
from reminders.process_metrics import SEND_SECONDS, timed

if TYPE_CHECKING:
    from reminders.config import Config, EmailConfig, SmsConfig


class OutboxChannel(Channel):
    """Appends each message to ``path`` (created with its folder when missing)."""

    def __init__(self, name: str, path: str | os.PathLike[str]) -> None:
        self.name = name
        self.path = Path(path)
        self._fd: int | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, name: str, cfg: SmsConfig | EmailConfig, config: Config) -> OutboxChannel:
        assert cfg.path is not None  # the config defaults it to outbox.jsonl
        return cls(name, config.path(cfg.path))

    def _open(self) -> int:
        if self._fd is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return self._fd

    @staticmethod
    def line(message: Message) -> bytes:
        """The JSON line written for ``message``, newline included."""
        record = {
            "reminder_id": message.reminder_id,
            "rule": message.rule,
            "channel": message.channel,
            "to": message.to,
            "subject": message.subject,
            "body": message.body,
            "sent_at": clock.iso_utc(clock.now()),
        }
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")

    def send(self, message: Message) -> str:
        data = self.line(message)
        try:
            with timed(SEND_SECONDS, message.channel), self._lock:
                fd = self._open()
                written = os.write(fd, data)
                while written < len(data):  # a short write: only on a full disk or a signal
                    written += os.write(fd, data[written:])
        except OSError as exc:
            raise TransientError(f"cannot append to the outbox {self.path}: {exc}") from exc
        return f"outbox-{uuid.uuid4()}"

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
