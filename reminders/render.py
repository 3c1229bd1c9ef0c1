"""Message templates: Jinja in its sandbox, undefined names are errors, HTML escaped only in HTML.

Files, in the templates folder:

- ``<name>.sms.j2``: the whole SMS text (stripped of surrounding whitespace);
- ``<name>.email.j2``: defines the blocks ``subject``, ``text`` and optionally ``html``; only the
  ``html`` block is autoescaped, and text outside the blocks is not sent (``{% set %}`` there is
  seen by every block);
- ``<name>.check.j2``: the message of a check, rendered with its match;
- ``<name>.<locale>.sms.j2``, ``<name>.<locale>.email.j2``: a variant of the default in another
  language (``refill-due.es.sms.j2``, ``refill-due.fr-CA.email.j2``), chosen per customer by
  :mod:`reminders.locales` (exact locale, language, ``default_locale``'s, then the default).

Every render has a budget (``Renderer`` arguments, defaults below): ``max_seconds`` of time,
``max_iterations`` loop steps in all, and ``max_output`` characters, both for what it writes and
for any text or list it builds on the way (``"x" * 10**9``, a string doubled in a loop). Past it
the render fails with a ``TemplateError`` naming the template: a worker is never held by one
message. The time is checked at each loop step, call, attribute, filter and operator, not by a
signal, so it works in any thread (RQ's SimpleWorker, the web server's threads).

Blocks and tags are trimmed (``trim_blocks``, ``lstrip_blocks``): a line holding only a ``{% if %}``
leaves no blank line. Templates are compiled once per process and folder; restart workers to pick up
edited templates.

Context keys this module relies on (the rest of the context is the rule's row, the customer and the
reminder, passed through untouched):

- ``customer``: a mapping (or object) whose ``locale`` (``fr_FR`` or ``fr-FR``) and ``timezone``
  (an IANA name) are used by the filters below when set and known;
- ``default_locale``, ``default_timezone``: the fall-backs (config); then ``en_US`` and ``UTC``;
- ``template_locale``: the variant being rendered (``es``), or None for the default template. A
  variant in another language than the customer's locale (a ``de`` customer given the ``es``
  variant of ``default_locale``) formats in the variant's locale, so a message keeps one language;
- ``now``: an aware datetime (or ISO string), the engine's current time, for ``days_until``
  (``reminders.clock.now()`` when absent).

Filters: ``date(value, format="medium")``, ``datetime(value, format="medium")``,
``time(value, format="short")`` (Babel formats ``short``, ``medium``, ``long``, ``full`` or a
pattern such as ``"EEEE d MMMM"``) in the customer's locale and zone, a naive datetime being
customer-local; ``money(amount, currency="USD")``; ``days_until(value)``, whole days from today
in the customer's zone (negative when past). Values may be date/datetime objects or ISO strings.
``number(value, format=None)``: a number with the locale's separators (``1234.5`` -> ``1,234.5``,
``1.234,5`` in ``es``; ``format`` a Babel pattern such as ``"#,##0.00"``);
``plural(n, one="# day", other="# days")``: the form CLDR's plural rules choose for ``n`` in the
locale (categories ``zero``, ``one``, ``two``, ``few``, ``many``, ``other``; ``other`` is required
and stands in for a category not given), ``#`` replaced by ``n|number``.
"""

from __future__ import annotations

import os
import re
import string
import threading
import time as _time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal, InvalidOperation
from functools import lru_cache, wraps
from pathlib import Path
from types import TracebackType
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale, UnknownLocaleError
from babel.dates import format_date, format_datetime, format_time
from babel.numbers import format_currency, format_decimal
from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
    meta,
    nodes,
    pass_context,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context, Undefined
from jinja2.sandbox import SandboxedEnvironment, SecurityError
from jinja2.utils import _PassArg

from reminders import clock, locales
from reminders.errors import Problem, RemindersError, TemplateError
from reminders.sms import describe_offending, segments

SUFFIXES = {"sms": ".sms.j2", "email": ".email.j2", "check": ".check.j2"}
EMAIL_BLOCKS = ("subject", "text")
# The HTML block is compiled from the same file a second time, under this name, with autoescape.
_HTML = "#html"
# A variant of a message template in another language: <name>.<locale>.<channel>.j2
_VARIANT = re.compile(
    r"^(?P<name>.+)\.(?P<locale>[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*)\.(?P<kind>sms|email)\.j2$"
)


@dataclass(frozen=True)
class RenderedEmail:
    subject: str
    text: str
    html: str | None


# -- the environment ------------------------------------------------------------------------


# A template file larger than this is refused before it is compiled (10 MB took seconds).
MAX_TEMPLATE_BYTES = 1024 * 1024


class _TooLarge(Exception):
    def __init__(self, size: int) -> None:
        super().__init__(
            f"the template is {size / 2**20:.1f} MiB, more than the "
            f"{MAX_TEMPLATE_BYTES // 2**20} MiB a template may be"
        )


class _Loader(FileSystemLoader):
    def get_source(self, environment: Any, template: str) -> Any:
        source, filename, uptodate = super().get_source(environment, template.removesuffix(_HTML))
        size = len(source.encode("utf-8"))
        if size > MAX_TEMPLATE_BYTES:
            raise _TooLarge(size)
        return source, filename, uptodate


# The budget of one render, by default.
MAX_SECONDS = 2.0
MAX_ITERATIONS = 100_000
MAX_OUTPUT = 1_000_000  # characters of a text, items of a list
MAX_BITS = 10_000  # of an integer computed with **


class BudgetExceeded(RemindersError):
    """A render went past its time, loop or size budget (reported as a ``TemplateError`` at the
    template's line)."""


@dataclass
class _Budget:
    seconds: float
    max_iterations: int
    max_output: int
    deadline: float = 0.0
    iterations: int = 0

    def tick(self) -> None:
        if _time.monotonic() >= self.deadline:
            raise BudgetExceeded(
                f"took longer than {self.seconds:g} s (the time budget of one render)"
            )

    def step(self) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise BudgetExceeded(
                f"more than {self.max_iterations:,} loop iterations in one render (its budget)"
            )
        self.tick()

    def too_long(self, size: int, what: str = "characters") -> None:
        if size > self.max_output:
            raise BudgetExceeded(
                f"a value of more than {self.max_output:,} {what} (the size budget of one render)"
            )

    def sized(self, value: Any) -> Any:
        """``value``, unless it is a text or list past the size budget."""
        if isinstance(value, str):
            self.too_long(len(value))
        elif isinstance(value, list | tuple):
            self.too_long(len(value), "items")
        return value

    def widths(self, fmt: str) -> None:
        """Refuse a format string (``%`` or ``{}`` style) asking for a width past the budget."""
        numbers = [int(n) for pair in _PERCENT_WIDTH.findall(fmt) for n in pair if n]
        try:
            specs = [spec for _, _, spec, _ in string.Formatter().parse(fmt) if spec]
        except ValueError:
            specs = []  # not a {} format: str.format will say so itself
        numbers += [int(n) for spec in specs for n in re.findall(r"\d+", spec)]
        for number in numbers:
            if number > self.max_output:
                raise BudgetExceeded(
                    f"a width of {number} in a format (the size budget of one render is "
                    f"{self.max_output:,} characters)"
                )


_PERCENT_WIDTH = re.compile(r"%[-#0 +]*(\d+)|%[-#0 +]*\*?\.(\d+)")
_BUDGET: ContextVar[_Budget | None] = ContextVar("reminders_render_budget", default=None)
_LOOP_FILTER = "reminders_budgeted_loop"


@pass_context  # never run on constants while compiling
def _budgeted(context: Context, iterable: Iterable[Any]) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this: each step counts and checks the clock."""
    budget = _BUDGET.get()
    if budget is None:
        yield from iterable
        return
    for item in iterable:
        budget.step()
        yield item


def _estimated(text: str, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """The length of ``text.<name>(*args)`` (or its filter), known before it is built."""
    if name in ("center", "ljust", "rjust", "zfill"):
        width = args[0] if args else kwargs.get("width", 0)
        return width if isinstance(width, int) else 0
    if name == "indent":
        width = args[0] if args else kwargs.get("width", 4)
        if isinstance(width, int):
            return len(text) + width * (text.count("\n") + 1)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str):
        old, new = args[0], args[1]
        if isinstance(new, str):
            count = text.count(old) if old else len(text) + 1
            return len(text) + count * max(len(new) - len(old), 0)
    if name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(size, int):
            return len(text) + text.count("\t") * size
    if name == "join" and args and hasattr(args[0], "__len__"):
        return len(text) * len(args[0])
    return 0


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` (a filter) checked against the budget: the clock, known growth, its result.

    The wrapper takes the context, which also keeps Jinja from running the filter on constants
    while compiling (``{{ 'x'|center(10**9) }}``), outside any render's budget.
    """
    wants = _PassArg.from_obj(func)

    @pass_context
    @wraps(func)
    def bounded(context: Context, *args: Any, **kwargs: Any) -> Any:
        if wants is _PassArg.context:
            args = (context, *args)
        elif wants is _PassArg.eval_context:
            args = (context.eval_ctx, *args)
        elif wants is _PassArg.environment:
            args = (context.environment, *args)
        skip = 0 if wants is None else 1
        budget = _BUDGET.get()
        if budget is None:
            return func(*args, **kwargs)
        budget.tick()
        value: Any = args[skip] if len(args) > skip else None
        rest = args[skip + 1 :]
        if name == "format" and isinstance(value, str):
            budget.widths(value)
        elif name == "join" and rest and isinstance(rest[0], str) and hasattr(value, "__len__"):
            budget.too_long(len(rest[0]) * len(value))
        elif isinstance(value, str):
            budget.too_long(_estimated(value, name, rest, kwargs))
        return budget.sized(func(*args, **kwargs))

    return bounded


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator, with every loop counted and every ``~`` result measured."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None)
            loop.iter.set_lineno(loop.lineno)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.measured(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Environment(SandboxedEnvironment):
    code_generator_class = _CodeGenerator
    # Operators that can build a huge value from small ones, checked before they run.
    intercepted_binops = frozenset({"*", "**", "%", "+"})

    def join_path(self, template: str, parent: str) -> str:
        # An include or extends from the HTML variant stays autoescaped.
        if parent.endswith(_HTML) and not template.endswith(_HTML):
            return template + _HTML
        return template

    def concat(self, parts: Iterable[str]) -> str:
        """Join output (a render's, a block's, a macro's), within the size budget."""
        budget = _BUDGET.get()
        if budget is None:
            return "".join(parts)
        kept, total = [], 0
        for part in parts:
            total += len(part)
            if total > budget.max_output:
                raise BudgetExceeded(
                    f"more than {budget.max_output:,} characters of output (the size budget "
                    "of one render)"
                )
            kept.append(part)
        return "".join(kept)

    def measured(self, value: Any) -> Any:
        """A value the template built (``a ~ b``), within the size budget."""
        budget = _BUDGET.get()
        return value if budget is None else budget.sized(value)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
            _before_binop(budget, operator, left, right)
        result = self.binop_table[operator](left, right)
        return result if budget is None else budget.sized(result)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return super().call(__context, __obj, *args, **kwargs)
        budget.tick()
        # A str method, or the sandbox's wrapper of str.format around one.
        target = getattr(__obj, "__wrapped__", __obj)
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            name = getattr(target, "__name__", "")
            if name in ("format", "format_map"):
                budget.widths(owner)
            else:
                budget.too_long(_estimated(owner, name, args, kwargs))
        return budget.sized(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _BUDGET.get()
        if budget is not None:
            budget.tick()
        return super().getitem(obj, argument)


def _before_binop(budget: _Budget, operator: str, left: Any, right: Any) -> None:
    sized = (str, list, tuple)
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(times, int):
                budget.too_long(len(seq) * times, "characters" if isinstance(seq, str) else "items")
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        budget.too_long(len(left) + len(right), "characters" if isinstance(left, str) else "items")
    elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and abs(left).bit_length() * right > MAX_BITS:
            raise BudgetExceeded(f"a number of more than {MAX_BITS:,} bits ({left} ** {right})")
    elif operator == "%" and isinstance(left, str):
        budget.widths(left)


_ENVIRONMENTS: dict[Path, _Environment] = {}
_ENVIRONMENTS_LOCK = threading.Lock()


def _environment(folder: Path) -> _Environment:
    """The one environment (and template cache) of this process for ``folder``."""
    with _ENVIRONMENTS_LOCK:
        env = _ENVIRONMENTS.get(folder)
        if env is None:
            env = _Environment(
                loader=_Loader(str(folder)),
                undefined=StrictUndefined,
                autoescape=lambda name: bool(name) and name.endswith(_HTML),
                trim_blocks=True,
                lstrip_blocks=True,
                auto_reload=False,
                cache_size=-1,
            )
            env.filters.update(FILTERS)
            env.filters = {n: _bounded_filter(n, f) for n, f in env.filters.items()}
            env.filters[_LOOP_FILTER] = _budgeted
            _ENVIRONMENTS[folder] = env
        return env


# -- the filters ----------------------------------------------------------------------------


def _customer_field(ctx: Context, key: str) -> Any:
    customer = ctx.get("customer")
    if customer is None or isinstance(customer, Undefined):
        return None
    if isinstance(customer, Mapping):
        return customer.get(key)
    return getattr(customer, key, None)


@lru_cache(maxsize=256)
def _parse_locale(name: str) -> Locale | None:
    try:
        return Locale.parse(name.strip().replace("-", "_"))
    except (ValueError, TypeError, UnknownLocaleError):
        return None


@lru_cache(maxsize=256)
def _parse_zone(name: str) -> ZoneInfo | None:
    try:
        return ZoneInfo(name.strip())
    except (ValueError, ZoneInfoNotFoundError):
        return None


def _locale(ctx: Context) -> Locale:
    # A customer's unknown locale falls back rather than failing the message: it is their row's
    # data, not the business's template.
    customer = _customer_field(ctx, "locale")
    variant = ctx.get("template_locale")
    if isinstance(variant, str) and variant:
        tag = locales.normalize(customer)
        if tag is None or locales.language(tag) != locales.language(variant):
            customer = variant
    for candidate in (customer, ctx.get("default_locale")):
        if isinstance(candidate, str) and candidate and (found := _parse_locale(candidate)):
            return found
    return _parse_locale("en_US") or Locale.parse("en_US")  # parsed once, not at every date


def _zone(ctx: Context) -> ZoneInfo:
    for candidate in (_customer_field(ctx, "timezone"), ctx.get("default_timezone")):
        if isinstance(candidate, str) and candidate and (found := _parse_zone(candidate)):
            return found
    return ZoneInfo("UTC")


def _temporal(value: Any, what: str) -> date | time:
    """A date, datetime or time from an object or ISO string (JSON-carried row values)."""
    if isinstance(value, date | time):
        return value
    if isinstance(value, str):
        text = value.strip()
        try:
            if len(text) == 10:
                return date.fromisoformat(text)
            if "T" in text or " " in text:
                return datetime.fromisoformat(text.replace("Z", "+00:00"))
            return time.fromisoformat(text)
        except ValueError:
            pass
    raise ValueError(f"the {what} filter needs a date, datetime or ISO 8601 text, got {value!r}")


def _local(moment: datetime, zone: ZoneInfo) -> datetime:
    """A datetime in the customer's zone; a naive one already is customer-local."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=zone)
    return moment.astimezone(zone)


@pass_context
def date_filter(ctx: Context, value: Any, format: str = "medium") -> str:
    """A date in the customer's locale: ``{{ due|date }}`` -> ``Mar 14, 2027``."""
    moment = _temporal(value, "date")
    if isinstance(moment, time):
        raise ValueError(f"the date filter needs a date, got the time {value!r}")
    if isinstance(moment, datetime):
        moment = _local(moment, _zone(ctx)).date()
    return _format_date(moment, format, _locale(ctx))


@lru_cache(maxsize=4096)
def _format_date(moment: date, format: str, locale: Locale) -> str:
    """babel's ``format_date``, kept: a batch's reminders mostly share a few dates, and babel
    looks the locale's month names and pattern up again at every call."""
    return format_date(moment, format=format, locale=locale)


@pass_context
def datetime_filter(ctx: Context, value: Any, format: str = "medium") -> str:
    """A date and time in the customer's locale and zone."""
    moment = _temporal(value, "datetime")
    if isinstance(moment, time):
        raise ValueError(f"the datetime filter needs a date or datetime, got the time {value!r}")
    zone = _zone(ctx)
    if not isinstance(moment, datetime):
        moment = datetime.combine(moment, time())
    return format_datetime(_local(moment, zone), format=format, tzinfo=zone, locale=_locale(ctx))


@pass_context
def time_filter(ctx: Context, value: Any, format: str = "short") -> str:
    """A time of day in the customer's locale and zone: ``{{ starts_at|time }}`` -> ``9:30 AM``."""
    moment = _temporal(value, "time")
    if isinstance(moment, time):
        return format_time(moment, format=format, locale=_locale(ctx))
    if not isinstance(moment, datetime):
        raise ValueError(f"the time filter needs a datetime or time, got the date {value!r}")
    zone = _zone(ctx)
    return format_time(_local(moment, zone), format=format, tzinfo=zone, locale=_locale(ctx))


@pass_context
def money_filter(ctx: Context, amount: Any, currency: str = "USD") -> str:
    """An amount in ``currency`` for the customer's locale: ``{{ 12.5|money("EUR") }}``."""
    try:
        value = Decimal(str(amount)) if not isinstance(amount, Decimal) else amount
    except InvalidOperation:
        raise ValueError(f"the money filter needs a number, got {amount!r}") from None
    return format_currency(value, currency, locale=_locale(ctx))


@pass_context
def days_until_filter(ctx: Context, value: Any) -> int:
    """Whole days from today (customer's zone, context ``now``) to ``value``; negative if past."""
    moment = _temporal(value, "days_until")
    if isinstance(moment, time):
        raise ValueError(f"the days_until filter needs a date, got the time {value!r}")
    zone = _zone(ctx)
    now = ctx.get("now")
    if isinstance(now, str):
        now = clock.parse_instant(now)
    if not isinstance(now, datetime):
        now = clock.now()
    today = _local(now, zone).date()
    target = _local(moment, zone).date() if isinstance(moment, datetime) else moment
    return (target - today).days


def _decimal(value: Any, what: str) -> Decimal | int:
    if isinstance(value, bool):
        raise ValueError(f"the {what} filter needs a number, got {value!r}")
    if isinstance(value, int | Decimal):
        return value
    try:
        return Decimal(str(value).strip())
    except InvalidOperation:
        raise ValueError(f"the {what} filter needs a number, got {value!r}") from None


@pass_context
def number_filter(ctx: Context, value: Any, format: str | None = None) -> str:
    """A number in the customer's locale: ``{{ 1234.5|number }}`` -> ``1,234.5``."""
    return format_decimal(_decimal(value, "number"), format=format, locale=_locale(ctx))


PLURAL_CATEGORIES = ("zero", "one", "two", "few", "many", "other")


@pass_context
def plural_filter(ctx: Context, value: Any, **forms: str) -> str:
    """The plural form of ``value`` in the customer's locale (CLDR rules, through Babel):
    ``{{ days|plural(one="# día", other="# días") }}`` -> ``1 día``, ``3 días``."""
    unknown = sorted(set(forms) - set(PLURAL_CATEGORIES))
    if unknown:
        raise ValueError(
            f"the plural filter has no form {', '.join(unknown)} "
            f"(CLDR's categories: {', '.join(PLURAL_CATEGORIES)})"
        )
    if "other" not in forms:
        raise ValueError(
            'the plural filter needs other= (e.g. plural(one="# day", other="# days"))'
        )
    number = _decimal(value, "plural")
    locale = _locale(ctx)
    category = locale.plural_form(number)
    text = forms.get(category, forms["other"])
    return str(text).replace("#", format_decimal(number, locale=locale))


FILTERS = {
    "number": number_filter,
    "plural": plural_filter,
    "date": date_filter,
    "datetime": datetime_filter,
    "time": time_filter,
    "money": money_filter,
    "days_until": days_until_filter,
}


# -- rendering ------------------------------------------------------------------------------


def _template_place(tb: TracebackType | None) -> tuple[str | None, int | None]:
    """The innermost template file and line of a traceback rewritten by Jinja."""
    place: tuple[str | None, int | None] = (None, None)
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename
        if filename.endswith(".j2"):
            place = (filename, tb.tb_lineno)
        tb = tb.tb_next
    return place


class Renderer:
    """Renders the business's templates from ``templates_dir``, each render within a budget:
    ``max_seconds`` (seconds), ``max_iterations`` (loop steps), ``max_output`` (characters)."""

    def __init__(
        self,
        templates_dir: Path | str,
        *,
        max_seconds: float = MAX_SECONDS,
        max_iterations: int = MAX_ITERATIONS,
        max_output: int = MAX_OUTPUT,
    ) -> None:
        self.templates_dir = Path(templates_dir)
        self.max_seconds = max_seconds
        self.max_iterations = max_iterations
        self.max_output = max_output
        self._folder = self.templates_dir.resolve()
        self._env = _environment(self._folder)
        self._variants: dict[tuple[str, str], dict[str, str]] | None = None
        # (template, kind, file, the file it repeats): two spellings of one locale
        self._duplicates: list[tuple[str, str, str, str]] = []

    # -- paths and loading --

    def path(self, name: str, kind: str, locale: str | None = None) -> Path:
        """Where the template of ``kind`` (sms, email, check) named ``name`` is expected; with
        ``locale``, its variant in that language."""
        return self.templates_dir / self._file(name, kind, locale)

    def _file(self, name: str, kind: str, locale: str | None) -> str:
        if locale is None:
            return f"{name}{SUFFIXES[kind]}"
        return self.variants(name, kind).get(locale) or f"{name}.{locale}{SUFFIXES[kind]}"

    def variants(self, name: str, kind: str) -> dict[str, str]:
        """The variants of template ``name`` for ``kind`` (sms, email): canonical locale tag ->
        file name, from the folder as it was when first asked (like the compiled templates)."""
        if self._variants is None:
            found: dict[tuple[str, str], dict[str, str]] = {}
            try:
                files = sorted(os.listdir(self._folder))
            except OSError:
                files = []
            for file in files:
                match = _VARIANT.match(file)
                tag = locales.normalize(match["locale"]) if match else None
                if match is None or tag is None:
                    continue
                same = found.setdefault((match["name"], match["kind"]), {})
                if tag in same:
                    self._duplicates.append((match["name"], match["kind"], file, same[tag]))
                else:
                    same[tag] = file
            self._variants = found
        return self._variants.get((name, kind), {})

    def choose(self, name: str, kind: str, customer: object, default: object = None) -> str | None:
        """The variant of ``name`` for a customer's locale (exact, language, ``default``'s), or
        None for the default template; never an error (see :mod:`reminders.locales`)."""
        if kind not in ("sms", "email"):
            return None
        return locales.choose(self.variants(name, kind), customer, default)

    def _shown(self, filename: str | None) -> str | None:
        """A template's file as the business wrote the folder (relative stays relative)."""
        if not filename:
            return None
        try:
            return str(self.templates_dir / Path(filename).resolve().relative_to(self._folder))
        except ValueError:
            return filename

    def _load(self, file: str) -> Template:
        try:
            return self._env.get_template(file)
        except TemplateNotFound:
            shown = str(self.templates_dir / file.removesuffix(_HTML))
            raise TemplateError(Problem("template file is missing", shown)) from None
        except TemplateSyntaxError as exc:
            shown = self._shown(exc.filename) or str(self.templates_dir / file.removesuffix(_HTML))
            raise TemplateError(Problem(exc.message or str(exc), shown, exc.lineno)) from None
        except _TooLarge as exc:
            shown = str(self.templates_dir / file.removesuffix(_HTML))
            raise TemplateError(Problem(str(exc), shown)) from None

    def _failed(self, exc: Exception, file: str) -> TemplateError:
        filename, line = _template_place(exc.__traceback__)
        shown = self._shown(filename) or str(self.templates_dir / file)
        message = str(exc) or type(exc).__name__
        if not isinstance(
            exc, UndefinedError | SecurityError | ValueError | BudgetExceeded | _TooLarge
        ):
            message = f"{type(exc).__name__}: {message}"
        return TemplateError(Problem(f"rendering failed: {message}", shown, line))

    def _run(self, template: Template, file: str, render: Any) -> Any:
        """Call ``render()`` within the budget, turning any failure into a ``TemplateError`` at
        the template line."""
        budget = _Budget(self.max_seconds, self.max_iterations, self.max_output)
        budget.deadline = _time.monotonic() + self.max_seconds
        token = _BUDGET.set(budget)
        try:
            try:
                return render()
            except Exception:
                self._env.handle_exception()  # re-raises with template files and lines
        except TemplateError:
            raise
        except Exception as exc:
            raise self._failed(exc, file) from exc
        finally:
            _BUDGET.reset(token)

    # -- rendering --

    def _render_whole(self, file: str, context: Mapping[str, Any]) -> str:
        template = self._load(file)
        return str(self._run(template, file, lambda: template.render(dict(context)))).strip()

    def render_sms(self, name: str, context: Mapping[str, Any], locale: str | None = None) -> str:
        """The SMS text of template ``name`` (``<name>.sms.j2``, or its ``locale`` variant),
        stripped."""
        return self._render_whole(self._file(name, "sms", locale), context)

    def render_check(self, name: str, context: Mapping[str, Any]) -> str:
        """The message of check ``name`` (``<name>.check.j2``), stripped."""
        return self._render_whole(f"{name}{SUFFIXES['check']}", context)

    def render_label(
        self,
        rule: str,
        source: str,
        context: Mapping[str, Any],
        file: str | None = None,
        line: int | None = None,
    ) -> str:
        """A rule's customer-facing ``label`` (a one-line template over the row), on one line.

        Raises ``TemplateError`` naming the rule (and its file and line) when it does not render.
        """
        where = f"rule {rule}: label"
        try:
            template = self._env.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(Problem(f"{where}: {exc.message}", file, line)) from None
        try:
            return " ".join(str(template.render(dict(context))).split())
        except Exception as exc:  # an undefined column, a filter's ValueError: name the rule
            raise TemplateError(Problem(f"{where}: {exc}", file, line)) from None

    def render_email(
        self, name: str, context: Mapping[str, Any], locale: str | None = None
    ) -> RenderedEmail:
        """Subject (one line), text and HTML (``None`` without an ``html`` block) of an email
        (``<name>.email.j2``, or its ``locale`` variant)."""
        file = self._file(name, "email", locale)
        template = self._load(file)
        missing = [b for b in EMAIL_BLOCKS if b not in template.blocks]
        if missing:
            raise TemplateError(self._missing_blocks(file, missing))
        blocks = self._run(template, file, lambda: _render_blocks(template, context, EMAIL_BLOCKS))
        html = None
        if "html" in template.blocks:
            variant = self._load(file + _HTML)
            html = self._run(variant, file, lambda: _render_blocks(variant, context, ("html",)))[
                "html"
            ].strip()
        return RenderedEmail(
            subject=" ".join(blocks["subject"].split()), text=blocks["text"].strip(), html=html
        )

    # -- validation --

    def _missing_blocks(self, file: str, missing: list[str]) -> Problem:
        wanted = ", ".join(f"{{% block {b} %}}" for b in missing)
        return Problem(
            f"an email template must define the blocks subject and text (html is optional); "
            f"missing: {wanted}",
            str(self.templates_dir / file),
        )

    def problems(self, name: str, channels: list[str] | tuple[str, ...]) -> list[Problem]:
        """What is wrong with template ``name`` for each of ``channels`` (sms, email, check),
        its variants in other languages included.

        Missing files, syntax errors (file and line), email templates without a subject or text
        block; and, as warnings, literal SMS text that forces UCS-2 (naming the characters), a
        variant without a block its default has, a variant's locale that Babel does not know.
        """
        found: list[Problem] = []
        for channel in channels:
            if channel not in SUFFIXES:
                allowed = ", ".join(SUFFIXES)
                found.append(Problem(f"unknown template kind {channel!r} (allowed: {allowed})"))
                continue
            default_blocks = self._file_problems(f"{name}{SUFFIXES[channel]}", channel, found)
            if channel == "check":
                continue
            for tag, file in self.variants(name, channel).items():
                shown = str(self.templates_dir / file)
                if _parse_locale(tag) is None:
                    found.append(
                        Problem(
                            f"{tag} is not a locale Babel knows: dates and numbers in this "
                            "variant fall back to the customer's or the default locale",
                            shown,
                            warning=True,
                        )
                    )
                blocks = self._file_problems(file, channel, found)
                if default_blocks is None or blocks is None:
                    continue
                required = set(EMAIL_BLOCKS) if channel == "email" else set()
                for block in sorted(set(default_blocks) - set(blocks) - required):
                    found.append(
                        Problem(
                            f"the {tag} variant has no {{% block {block} %}}, which "
                            f"{name}{SUFFIXES[channel]} has",
                            shown,
                            warning=True,
                        )
                    )
        for template, kind, file, first in self._duplicates:
            if template == name and kind in channels:
                found.append(
                    Problem(
                        f"the same locale as {first}: one variant a locale "
                        "(fr-CA, fr_CA and FR-ca are one locale)",
                        str(self.templates_dir / file),
                    )
                )
        return found

    def _file_problems(self, file: str, channel: str, found: list[Problem]) -> list[str] | None:
        """Add the problems of one template file to ``found``; its blocks, None if unreadable."""
        try:
            template = self._load(file)
            if channel == "email":
                missing = [b for b in EMAIL_BLOCKS if b not in template.blocks]
                if missing:
                    found.append(self._missing_blocks(file, missing))
                if "html" in template.blocks:
                    self._load(file + _HTML)
        except TemplateError as exc:
            found.extend(exc.problems)
            return None
        if channel == "sms":
            found.extend(self._ucs2_warnings(file))
        return list(template.blocks)

    def names(
        self, name: str, kind: str, locale: str | None = None
    ) -> list[tuple[str, str | None, int]]:
        """The names template ``name`` of ``kind`` (or its ``locale`` variant) reads from its
        context: (name, file, line of its first use), following the templates it includes,
        extends or imports by a constant name. Jinja's own globals are left out; a missing or
        broken file is skipped (reported by :meth:`problems`)."""
        assert self._env.loader is not None
        found: dict[str, tuple[str | None, int]] = {}
        assigned: set[str] = set()  # set by an including template: an included one sees it
        seen: set[str] = set()
        pending = [self._file(name, kind, locale)]
        while pending:
            file = pending.pop(0)
            if file in seen:
                continue
            seen.add(file)
            try:
                source, filename, _ = self._env.loader.get_source(self._env, file)
                tree = self._env.parse(source)
            except (TemplateNotFound, TemplateSyntaxError):
                continue
            undeclared = meta.find_undeclared_variables(tree) - set(self._env.globals)
            assigned.update(_defined(tree))
            for node in tree.find_all(nodes.Name):
                if node.ctx == "store":
                    assigned.add(node.name)
                elif node.name in undeclared and node.name not in found:
                    found[node.name] = (self._shown(filename), node.lineno)
            pending.extend(t for t in meta.find_referenced_templates(tree) if t is not None)
        return [(n, f, line) for n, (f, line) in found.items() if n not in assigned]

    def _ucs2_warnings(self, file: str) -> list[Problem]:
        assert self._env.loader is not None
        source, filename, _ = self._env.loader.get_source(self._env, file)
        warnings = []
        for data in self._env.parse(source).find_all(nodes.TemplateData):
            for offset, text in enumerate(data.data.split("\n")):
                info = segments(text)
                if info.offending:
                    line = data.lineno + offset
                    problem = Problem(describe_offending(info), self._shown(filename), line, True)
                    warnings.append(problem)
        return warnings


def _defined(tree: nodes.Template) -> set[str]:
    """Names a template defines by import or macro: its blocks see them, though Jinja's
    ``find_undeclared_variables`` analyses each block on its own."""
    found: set[str] = set()
    for node in tree.find_all((nodes.FromImport, nodes.Import, nodes.Macro)):
        if isinstance(node, nodes.FromImport):
            found.update(n if isinstance(n, str) else n[1] for n in node.names)
        elif isinstance(node, nodes.Import):
            found.add(node.target)
        elif isinstance(node, nodes.Macro):
            found.add(node.name)
    return found


def _render_blocks(
    template: Template, context: Mapping[str, Any], wanted: tuple[str, ...]
) -> dict[str, str]:
    """Render the named blocks of ``template`` in one pass over the whole template.

    The template's top-level code runs in order (a ``{% set %}`` above a block is seen by it);
    the blocks' output is captured and the text outside them is dropped.
    """
    ctx = template.new_context(dict(context))
    captured: dict[str, str] = {}

    def capture(name: str, original: Any) -> Any:
        def render(inner: Context) -> Iterator[str]:
            captured[name] = template.environment.concat(original(inner))
            return iter(())

        return render

    for name in wanted:
        if name in ctx.blocks:
            ctx.blocks[name][0] = capture(name, ctx.blocks[name][0])
    for _ in template.root_render_func(ctx):
        pass
    for name in wanted:
        if name not in captured and name in template.blocks:
            # The block sits in a branch that did not run: render it on its own.
            captured[name] = template.environment.concat(template.blocks[name](ctx))
    return captured
