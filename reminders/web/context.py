"""The engine's :class:`~reminders.app.App` as seen from a request."""

from __future__ import annotations

from flask import current_app

from reminders.app import App

KEY = "reminders"


def engine() -> App:
    """The App this Flask app serves (config, rules, state DB, the engine's clock)."""
    found: App = current_app.extensions[KEY]
    return found
