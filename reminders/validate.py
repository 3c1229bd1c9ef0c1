"""``reminders validate``: every problem in config, rules and templates, each with its place."""

from __future__ import annotations

from typing import Any

from .errors import InputError, Problem


def validate_all(app: Any) -> list[Problem]:
    """Problems (errors and warnings) of the config, the rules and every template they name."""
    try:
        config = app.config
    except InputError as exc:
        return list(exc.problems)
    try:
        ruleset = app.ruleset
    except InputError as exc:
        return list(exc.problems)
    problems: list[Problem] = list(ruleset.warnings)
    renderer = app.renderer
    for rule in ruleset.rules:
        problems.extend(renderer.problems(rule.template_name, rule.channels))
        for channel in rule.channels:
            if channel == "sms":
                problems.extend(_sms_warnings(app, rule, config))
    for check in ruleset.checks:
        if check.message:
            problems.extend(renderer.problems(check.message, ["check"]))
    return problems


def _sms_warnings(app: Any, rule: Any, config: Any) -> list[Problem]:
    """Warn when an SMS template's literal text forces UCS-2 (it doubles the cost of every text)."""
    from . import sms

    path = config.templates_path / f"{rule.template_name}.sms.j2"
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8")
    info = sms.segments(text)
    if info.encoding != "GSM-7":
        shown = " ".join(repr(c) for c in info.offending[:5])
        return [
            Problem(
                f"rule {rule.name}: the template's text has {shown}, which forces UCS-2 "
                "(70 characters a segment instead of 160)",
                file=str(path.relative_to(config.root))
                if path.is_relative_to(config.root)
                else str(path),
                line=next(
                    (
                        i + 1
                        for i, line in enumerate(text.splitlines())
                        if any(c in line for c in info.offending)
                    ),
                    None,
                ),
                warning=True,
            )
        ]
    return []


def _display(path: Any, root: Any) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def _first_line_with(text: str, characters: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if any(c in line for c in characters):
            return number
    return None
