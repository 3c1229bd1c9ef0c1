"""The demo: a small business's data, the shipped example rules and templates, ``reminders demo``.

``data`` generates the business database (customers, subscriptions and warranties, prescriptions,
bills, orders, support tickets); ``run`` is the command. The example rules and templates live at
the repository's top (``rules/``, ``templates/``) and are reached here through the symlinks
``rules`` and ``templates``, which setuptools copies into the wheel as files.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules"
TEMPLATES = HERE / "templates"
