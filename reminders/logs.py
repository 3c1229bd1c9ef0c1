"""The processes' log lines: text by default, or one JSON object a line for a log pipeline.

``--log-format json`` (or ``REMINDERS_LOG_FORMAT=json``) makes every line of the engine's loggers,
and of RQ's in a worker, an object with ``ts``, ``level``, ``logger`` and ``message``, and the
fields a line is about where they apply (:data:`FIELDS`, passed by the caller as ``extra=``). The
message is the text line's message: phone numbers and addresses are masked where the line is
written (:mod:`reminders.phone`), the same in both formats; a template's context or a message's
body is never logged.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from typing import Any

ENV = "REMINDERS_LOG_FORMAT"
FORMATS = ("text", "json")
# What a line may be about, besides its message (``log.info(..., extra={"reminder_id": 7})``).
FIELDS = (
    "reminder_id",
    "rule",
    "channel",
    "customer_id",
    "attempt",
    "provider_id",
    "error_code",
    "job_id",
)
TEXT = "%(asctime)s %(name)s %(levelname)s %(message)s"
# The loggers a process writes: the engine's own and, in a worker, RQ's (which otherwise adds a
# text handler of its own to rq.worker).
LOGGERS = ("reminders", "rq")


class JsonFormatter(logging.Formatter):
    """One JSON object a record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for field in FIELDS:
            value = record.__dict__.get(field)
            if value is not None:
                line[field] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False, default=str)


def chosen(fmt: str | None = None) -> str:
    """The format asked for: ``fmt``, else ``$REMINDERS_LOG_FORMAT``, else text."""
    value = (fmt or os.environ.get(ENV) or "text").strip().lower()
    if value not in FORMATS:
        raise ValueError(f'{ENV}="{value}": the log format is text or json')
    return value


def setup(level: int = logging.INFO, fmt: str | None = None) -> None:
    """Write the engine's lines to stderr in the chosen format (once per process)."""
    kind = chosen(fmt)
    for name in LOGGERS if kind == "json" else LOGGERS[:1]:
        logger = logging.getLogger(name)
        if not any(getattr(h, "_reminders", False) for h in logger.handlers):
            handler = logging.StreamHandler()
            handler._reminders = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
        for each in logger.handlers:
            if getattr(each, "_reminders", False):
                each.setFormatter(JsonFormatter() if kind == "json" else logging.Formatter(TEXT))
        if name == "reminders":
            logger.setLevel(level)
