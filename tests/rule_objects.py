"""A real ``Config`` and ``RuleSet`` from YAML text, for the tests of pure code (the planner, the
send-time policies): ``config.yaml`` and one rules file written to a folder and loaded the way the
engine loads them, so every default and validation applies. Nothing is connected to.
"""

from __future__ import annotations

from pathlib import Path

from reminders.config import Config, load_config
from reminders.rules import RuleSet, load_rules
from tests.rules_fixtures import REFILLS, config_yaml


def load(folder: Path, rules: str = REFILLS, *, config: str = "") -> tuple[Config, RuleSet]:
    """The tests' config (New York, sending 09:00-20:00, outbox channels) with ``config`` (YAML
    top-level keys) appended, and the rules file ``rules``."""
    folder.mkdir(parents=True, exist_ok=True)
    text = config_yaml("sqlite:///business.db", "sqlite:///state.db") + config
    (folder / "config.yaml").write_text(text)
    (folder / "rules").mkdir(exist_ok=True)
    (folder / "rules" / "rules.yaml").write_text(rules)
    loaded = load_config(folder / "config.yaml", env={})
    return loaded, load_rules(loaded)
