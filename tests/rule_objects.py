"""A real ``Config`` and ``Rule`` from YAML text, for the tests of pure code (the planner, the
send-time policies): ``config.yaml`` and one rules file written to a folder and loaded the way the
engine loads them, so every default and validation applies. Nothing is connected to. And a
policy's :class:`~reminders.policies.Context` for one reminder, built as a worker builds it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Connection

from reminders.compose import customer_of
from reminders.config import Config, load_config
from reminders.consent import View
from reminders.policies import Batch, Context, candidates
from reminders.rules import Rule, load_rules
from tests.rules_fixtures import REFILLS, config_yaml


def refills_with(**keys: str) -> str:
    """The ``refill-due`` rule file with more keys of the rule (``grace="90m"``, ...), as YAML."""
    extra = "".join(f"    {key}: {value}\n" for key, value in keys.items())
    return REFILLS.replace("    template: refill-due\n", f"    template: refill-due\n{extra}")


def load_rule(folder: Path, rules: str = REFILLS) -> tuple[Config, Rule]:
    """The tests' config (New York, sending 09:00-20:00, outbox channels) and the one rule of the
    rules file ``rules``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.yaml").write_text(config_yaml("sqlite:///business.db", "sqlite:///state.db"))
    (folder / "rules").mkdir(exist_ok=True)
    (folder / "rules" / "rules.yaml").write_text(rules)
    loaded = load_config(folder / "config.yaml", env={})
    (rule,) = load_rules(loaded).rules
    return loaded, rule


PATIENT = {
    "rx_id": 1,
    "drug_name": "Lisinopril",
    "runs_out_on": date(2027, 3, 13),
    "customer_id": 7,
    "first_name": "Ann",
    "phone": "+12125550100",
    "email": "ann@example.com",
    "timezone": None,
}


def context(
    config: Config,
    rule: Rule,
    now: datetime,
    *,
    queue: str = "sms",
    values: Mapping[str, Any] | None = None,
    reminder: Mapping[str, Any] | None = None,
    consent: View | None = None,
    business: Callable[[], Connection] | None = None,
) -> Context:
    """One queued reminder of ``rule`` as a worker's policies see it at ``now``: the refill row
    ``PATIENT`` updated with ``values``, its state row (due at ``now``, on its first channel)
    updated with ``reminder``; no opt-outs or preferences unless ``consent`` says; a business DB
    that must not be asked unless ``business`` is given."""
    row = {**PATIENT, **(values or {})}
    state = {
        "id": 1,
        "rule": rule.name,
        "customer_id": str(row["customer_id"]),
        "send_at": now,
        "channel_index": 0,
        "reason": None,
        "attempts": 0,
        **(reminder or {}),
    }
    customer = customer_of(rule, row)
    batch = Batch(config, now, queue, consent or View(), business or _no_business)
    channels = candidates(config, rule, state["channel_index"], customer)
    return Context(batch, state, rule, row, customer, channels)


def _no_business() -> Connection:
    raise AssertionError("the business DB was asked")
