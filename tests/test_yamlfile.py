"""YAML files with positions, and the limits on what a file can make the loader do."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reminders import yamlfile
from reminders.config import load_config
from reminders.errors import RuleError
from reminders.rules import load_rules
from reminders.yamlfile import YamlError, load, loads
from tests.rules_fixtures import REFILLS, Project, lite

__all__ = ["lite"]

# Nine levels of ten aliases each: 10**9 strings once expanded, from a file of under 1 KB.
BILLION_LAUGHS = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"{chr(ord('a') + i)}: &{chr(ord('a') + i)} [{', '.join(['*' + chr(ord('a') + i - 1)] * 10)}]\n"
    for i in range(1, 9)
)


def _problem(text: str) -> str:
    with pytest.raises(YamlError) as err:
        loads(text, "rules/x.yaml")
    return str(err.value.problem)


def test_a_billion_laughs_is_refused_at_the_line_of_the_expansion() -> None:
    problem = _problem(BILLION_LAUGHS)
    assert problem.startswith("rules/x.yaml:")
    assert "more than 100,000 values once aliases (*name) are expanded" in problem


def test_aliases_within_the_limit_still_load() -> None:
    doc = loads("base: &b {at: '10:00', grace: 1d}\none: *b\ntwo: *b\n", "rules/x.yaml")
    assert doc.data["one"] == doc.data["two"] == {"at": "10:00", "grace": "1d"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: &a [1, *a]\n", "rules/x.yaml:1: an alias (*name) refers to the value that holds it"),
        (
            "a: &a {x: 1, <<: *a}\n",
            "rules/x.yaml:1: a merge key (<<) refers to the mapping that holds it",
        ),
        ("a: " + "[" * 200 + "]" * 200 + "\n", "rules/x.yaml:1: nested more than 64 levels deep"),
        ("a: 2027-02-30\n", "rules/x.yaml:1: not valid YAML: 2027-02-30 is not a valid timestamp"),
        ("a: 1\nb: x\x07y\n", "rules/x.yaml:2: not valid YAML: control character '\\x07'"),
        ("a: " + "9" * 5000 + "\n", "rules/x.yaml:1: not valid YAML: the number has 5000 digits"),
    ],
)
def test_self_references_depth_and_bad_scalars_are_errors_with_a_line(
    text: str, expected: str
) -> None:
    assert _problem(text).startswith(expected)


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("rules: []\n" + "#" * (yamlfile.MAX_FILE_BYTES + 1) + "\n")
    with pytest.raises(YamlError) as err:
        load(big, "rules/big.yaml")
    assert str(err.value.problem) == (
        "rules/big.yaml: the file is 1.0 MiB, more than the 1 MiB a config or rules file may be"
    )


def test_load_rules_names_the_file_of_a_billion_laughs(lite: Project) -> None:
    lite.write("rules/laughs.yaml", BILLION_LAUGHS)
    with pytest.raises(RuleError) as err:
        load_rules(load_config(lite.root / "config.yaml"))
    (problem,) = err.value.problems
    assert problem.file == "rules/laughs.yaml" and problem.line is not None


# -- random input: the loader either loads or says where the file is wrong ----------------------

_YAML_CHARS = [*"-:?&*!|>'\"%@`#,[]{}<= \n\n\n\t.0123456789abcdeyz~\\", "\x00", "é", "\u2028"]


def _mutated(draw: st.DrawFn) -> str:
    """The shipped rule file with a few of its lines replaced, doubled or cut."""
    lines = REFILLS.splitlines(keepends=True)
    for _ in range(draw(st.integers(1, 4))):
        index = draw(st.integers(0, len(lines) - 1))
        action = draw(st.sampled_from(["replace", "insert", "cut", "delete"]))
        noise = draw(st.text(st.sampled_from(_YAML_CHARS), max_size=30))
        if action == "replace":
            lines[index] = noise + "\n"
        elif action == "insert":
            lines.insert(index, noise + "\n")
        elif action == "cut":
            lines[index] = lines[index][: draw(st.integers(0, len(lines[index])))] + noise
        elif len(lines) > 1:
            del lines[index]
    return "".join(lines)


@st.composite
def _rule_files(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return _mutated(draw)
    return draw(
        st.text(
            st.sampled_from(_YAML_CHARS) | st.characters(exclude_categories=("Cs",)), max_size=200
        )
    )


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=_rule_files())
def test_random_rule_files_load_or_name_the_file_and_line(lite: Project, text: str) -> None:
    lite.write("rules/refills.yaml", text)
    config = load_config(lite.root / "config.yaml")
    try:
        ruleset = load_rules(config)
    except RuleError as exc:
        assert exc.problems
        for problem in exc.problems:
            # A rule may name a template that is missing: that problem is the template file's.
            if problem.file and problem.file.startswith("templates/"):
                continue
            assert problem.file == "rules/refills.yaml", str(problem)
            assert problem.line is not None and problem.line >= 1, str(problem)
            assert problem.message.strip(), str(problem)
    else:
        assert all(rule.file == "rules/refills.yaml" for rule in ruleset.rules)
