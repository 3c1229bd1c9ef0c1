"""``reminders validate``: every problem in config, rules and templates, each with its place."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import InputError, Problem

if TYPE_CHECKING:
    from .app import App


def validate_all(app: App) -> list[Problem]:
    """Problems (errors and warnings) of the config, the rules and every template they name."""
    try:
        app.config  # noqa: B018 - loading is the check
    except InputError as exc:
        return list(exc.problems)
    try:
        ruleset = app.ruleset
    except InputError as exc:
        return list(exc.problems)
    problems: list[Problem] = list(ruleset.warnings)
    problems.extend(template_problems(app, ruleset.rules, ruleset.checks))
    return problems


def template_problems(app: App, rules: Iterable[Any], checks: Iterable[Any] = ()) -> list[Problem]:
    """What is wrong with the templates of ``rules`` (each channel) and of ``checks``.

    Files are named relative to the config's folder, like rule files (``templates/x.sms.j2``).
    """
    renderer = app.renderer
    found: list[Problem] = []
    for rule in rules:
        found.extend(renderer.problems(rule.template_name, rule.channels))
    for check in checks:
        if check.message:
            found.extend(renderer.problems(check.message, ["check"]))
    root = app.config.root
    return [_relative(p, root) for p in found]


def _relative(problem: Problem, root: Path) -> Problem:
    if not problem.file:
        return problem
    path = Path(problem.file)
    try:
        shown = path.resolve().relative_to(Path(root).resolve())
    except ValueError:
        return problem
    return replace(problem, file=str(shown))
