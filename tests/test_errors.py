"""The error tree: every public exception of the engine sits under RemindersError."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import reminders
from reminders.errors import InputError, RemindersError, RuleError, RuntimeFailure


def _public_exceptions() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(reminders.__path__, "reminders."):
        if info.name.startswith("reminders.migrations"):
            continue  # alembic's scripts, run by alembic only
        if info.name == "reminders.rq_settings":
            # RQ's settings module: importing it loads ./config.yaml and starts the embedded
            # Redis beside it (what `rq worker -c` needs); it defines no class.
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            if (
                inspect.isclass(value)
                and issubclass(value, BaseException)
                and value.__module__ == info.name
                and not name.startswith("_")
            ):
                found[f"{info.name}.{name}"] = value
    return found


def test_every_public_exception_is_in_the_tree() -> None:
    found = _public_exceptions()
    assert "reminders.planner.RowError" in found and "reminders.compose.RecheckFailed" in found
    outside = sorted(name for name, cls in found.items() if not issubclass(cls, RemindersError))
    assert outside == []


def test_the_branches_decide_the_exit_code() -> None:
    from reminders.compose import RecheckFailed, RecheckInvalid
    from reminders.planner import RowError
    from reminders.yamlfile import YamlError

    assert issubclass(RecheckInvalid, RuleError) and issubclass(RecheckFailed, RuntimeFailure)
    assert issubclass(RowError, InputError) and issubclass(YamlError, InputError)
    row = RowError("due", "due is empty: no due date")
    assert (str(row), row.column, row.reason) == ("due is empty: no due date", "due", row.reason)
