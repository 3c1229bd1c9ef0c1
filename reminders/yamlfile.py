"""YAML with positions: every value remembers the line it came from.

Errors in config and rule files must name the file and line. ``load`` returns plain Python data plus
a map from each value's path (the keys and indexes that lead to it, the same shape as a pydantic
error's ``loc``) to its 1-based line.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from .errors import InputError, Problem

Path_ = tuple[str | int, ...]

# What one config or rules file may make the loader do: its size in bytes, how deep its values
# nest, and how many values it holds once every alias is expanded (each use counts again).
MAX_FILE_BYTES = 1024 * 1024
MAX_DEPTH = 64
MAX_VALUES = 100_000

# YAML 1.1 reads an unquoted 10:00 as the base-60 integer 600; a time of day is what was meant.
_SEXAGESIMAL = re.compile(r"^[-+]?\d+(:[0-5]?\d)+(\.\d*)?$")


@dataclass
class Document:
    """A loaded YAML file: its data and where each value stands."""

    file: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    # The line of each mapping key (where an unknown key is), when it differs from its value's.
    key_lines: dict[Path_, int] = field(default_factory=dict)

    def line(self, path: Path_) -> int | None:
        """The line of the value at ``path``, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def problem(
        self, path: Path_, message: str, *, warning: bool = False, key: bool = False
    ) -> Problem:
        """A problem at the value at ``path`` (``key``: at the key that names it)."""
        line = self.key_lines.get(tuple(path)) if key else None
        return Problem(message, file=self.file, line=line or self.line(path), warning=warning)

    def problems_from(
        self, error: ValidationError, prefix: Path_ = (), model: type[BaseModel] | None = None
    ) -> list[Problem]:
        """Turn a pydantic error into problems, each with the line of the offending value.

        ``model`` (the one validated) lets an unknown key name the allowed ones and the nearest.
        """
        problems = []
        for item in error.errors():
            loc = tuple(prefix) + tuple(item["loc"])
            if item["type"] == "extra_forbidden":
                message = unknown_key(model, tuple(item["loc"][:-1]), str(item["loc"][-1]))
            else:
                message = _message(item)
            where = ".".join(str(p) if isinstance(p, str) else f"[{p}]" for p in item["loc"])
            where = where.replace(".[", "[")
            text = f"{where}: {message}" if where else message
            problems.append(self.problem(loc, text, key=item["type"] == "extra_forbidden"))
        # In the order of the file, as a reader goes through it (pydantic goes by field).
        problems.sort(key=lambda p: p.line or 0)
        return problems


# Fields the engine fills in itself (where a file is, which line): never the business's to write.
INTERNAL_FIELDS = frozenset({"root", "file", "line", "lines"})


def unknown_key(model: type[BaseModel] | None, path: Path_, key: str) -> str:
    """``ofsets: unknown key; did you mean offsets? (allowed: ...)`` for the mapping at ``path``
    of ``model`` (the message carries no place: the problem has the file and line)."""
    allowed = allowed_keys(model, path) if model is not None else None
    if not allowed:
        return "unknown key (check its spelling; see the documented keys)"
    near = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {near[0]}?" if near else ""
    return f"unknown key{hint} (allowed: {', '.join(allowed)})"


def allowed_keys(model: type[BaseModel], path: Path_) -> list[str] | None:
    """The keys the mapping at ``path`` of ``model`` takes (aliases as written), or None when
    ``path`` leads to no model."""
    current: Any = model
    for part in path:
        current = _model_in(current)
        if current is None:
            return None
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = _field(current, str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (list, dict):
            current = typing.get_args(current)[-1]  # a list's items, a mapping's values
        else:
            return None
    found = _model_in(current)
    if not (isinstance(found, type) and issubclass(found, BaseModel)):
        return None
    return [
        info.alias or name
        for name, info in found.model_fields.items()
        if name not in INTERNAL_FIELDS
    ]


def _field(model: type[BaseModel], key: str) -> Any:
    for name, info in model.model_fields.items():
        if key in (name, info.alias):
            return info
    return None


def _model_in(annotation: Any) -> Any:
    """The model (or container) inside ``Annotated[...]`` and ``X | None``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(annotation) if a is not type(None)]
            models = [a for a in members if isinstance(a, type) and issubclass(a, BaseModel)]
            annotation = (models or members)[0]
        else:
            return annotation


def _message(item: Any) -> str:
    kind = item["type"]
    msg = str(item["msg"])
    if kind == "value_error":
        return msg.removeprefix("Value error, ")
    if kind == "missing":
        return "required key is missing"
    if kind == "assertion_error":
        return msg.removeprefix("Assertion failed, ")
    value = item.get("input")
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return f"{msg} (got {value!r})"
    return msg


class _Builder(yaml.constructor.SafeConstructor):
    pass


class _Composer(yaml.SafeLoader):
    """PyYAML's safe loader, refusing nesting past ``MAX_DEPTH`` (its composer recurses)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LoadError(Problem(_too_deep(), None, self.peek_event().start_mark.line + 1))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _too_deep() -> str:
    return f"nested more than {MAX_DEPTH} levels deep (aliases included)"


def _scalar(builder: _Builder, node: yaml.ScalarNode) -> Any:
    if node.tag == "tag:yaml.org,2002:int" and _SEXAGESIMAL.match(node.value):
        return node.value
    if node.tag == "tag:yaml.org,2002:float" and _SEXAGESIMAL.match(node.value):
        return node.value
    try:
        return builder.construct_object(node, deep=True)
    except (ValueError, OverflowError) as exc:
        # A date that does not exist (2027-02-30), a number too long for Python to read.
        digits = sum(c.isdigit() for c in node.value)
        if node.tag.endswith((":int", ":float")) and digits > _MAX_DIGITS:
            message = f"the number has {digits} digits (at most {_MAX_DIGITS}; quote it for text)"
        else:
            kind = node.tag.rpartition(":")[2]
            message = f"{node.value} is not a valid {kind} ({exc})"
        problem = Problem(f"not valid YAML: {message}", None, node.start_mark.line + 1)
        raise _LoadError(problem) from None


# Python refuses to read an integer of more digits than this (sys.int_info.default_max_str_digits).
_MAX_DIGITS = 4300


@dataclass
class _Walk:
    """Builds plain data from composed nodes, counting values and watching aliases.

    PyYAML composes an alias as the very node its anchor names, so a node reached twice is an
    alias used again: nine nested lists of ten aliases each ("billion laughs") compose in a
    moment and expand to 10**9 values. The count bounds the expansion; ``active`` (the nodes being
    built) catches an alias inside the value it names, which would never end.
    """

    builder: _Builder
    file: str
    lines: dict[Path_, int]
    key_lines: dict[Path_, int]
    count: int = 0
    active: set[int] = field(default_factory=set)

    def fail(self, node: yaml.Node, message: str) -> _LoadError:
        return _LoadError(Problem(message, self.file, node.start_mark.line + 1))

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.fail(
                node,
                f"more than {MAX_VALUES:,} values once aliases (*name) are expanded "
                "(a config or rules file needs far fewer: use aliases less deeply)",
            )
        if len(path) > MAX_DEPTH:
            raise self.fail(node, _too_deep())
        if id(node) in self.active:
            raise self.fail(node, "an alias (*name) refers to the value that holds it")
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.ScalarNode):
            return _scalar(self.builder, node)
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path)
            assert isinstance(node, yaml.SequenceNode)
            return [self.build(item, (*path, i)) for i, item in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else []
                if any(id(n) in self.active for n in (value_node, *merged)):
                    message = "a merge key (<<) refers to the mapping that holds it"
                    raise self.fail(key_node, message)
        try:
            self.builder.flatten_mapping(node)
        except RecursionError:
            raise self.fail(node, "a merge key (<<) refers to the mapping that holds it") from None
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = _scalar(self.builder, key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise self.fail(key_node, "a key must be a plain word")
            if key in result:
                raise self.fail(key_node, f"duplicate key {key!r}")
            self.key_lines[(*path, key)] = key_node.start_mark.line + 1
            result[key] = self.build(value_node, (*path, key))
        return result


class _LoadError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


def loads(text: str, file: str) -> Document:
    """Parse YAML text. Raises :class:`YamlError` with the file and line on a syntax error, or
    when the text is larger, deeper or expands to more values than ``MAX_*`` allow."""
    if len(text) > MAX_FILE_BYTES:
        raise YamlError(Problem(_too_big(len(text.encode("utf-8"))), file))
    try:
        node = _compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        message = f"not valid YAML: {exc.problem}"
        start = exc.context_mark
        if exc.context and start is not None and start.line + 1 != line:
            # Where the broken construct began (an unclosed quote is found only at the end).
            message += f" ({exc.context}, from line {start.line + 1})"
        raise YamlError(Problem(message, file, line)) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        message = f"not valid YAML: control character {chr(exc.character)!r} is not allowed"
        raise YamlError(Problem(message, file, line)) from None
    except _LoadError as exc:
        raise YamlError(Problem(exc.problem.message, file, exc.problem.line)) from None
    if node is None:
        return Document(file, None, {(): 1})
    walk = _Walk(_Builder(), file, {}, {})
    try:
        data = walk.build(node, ())
    except _LoadError as exc:
        raise YamlError(Problem(exc.problem.message, file, exc.problem.line)) from None
    except yaml.constructor.ConstructorError as exc:
        mark = exc.problem_mark
        raise YamlError(
            Problem(f"not valid YAML: {exc.problem}", file, mark.line + 1 if mark else None)
        ) from None
    return Document(file, data, walk.lines, walk.key_lines)


def _compose(text: str) -> yaml.Node | None:
    loader = _Composer(text)  # checks every character first: may raise ReaderError
    try:
        return loader.get_single_node()
    finally:
        loader.dispose()


def _too_big(size: int) -> str:
    return (
        f"the file is {size / 2**20:.1f} MiB, more than the {MAX_FILE_BYTES // 2**20} MiB "
        "a config or rules file may be"
    )


def load(path: Path, display: str | None = None) -> Document:
    """Read and parse a YAML file; ``display`` is the name errors use (default: the path).

    A file over ``MAX_FILE_BYTES`` is refused without reading more than that.
    """
    name = display or str(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_FILE_BYTES + 1)
            if len(raw) > MAX_FILE_BYTES:
                size = max(len(raw), os.fstat(stream.fileno()).st_size)
                raise YamlError(Problem(_too_big(size), name))
        text = raw.decode("utf-8")
    except OSError as exc:
        raise YamlError(Problem(f"cannot read: {exc.strerror}", name)) from None
    except UnicodeDecodeError:
        raise YamlError(Problem("not UTF-8 text", name)) from None
    return loads(text, name)


class YamlError(InputError):
    """A YAML file could not be parsed; carries the problem with its place."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.problem = problem
