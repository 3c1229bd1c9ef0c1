"""The engine's errors: one tree, each naming where the problem is.

``InputError`` and its children are the business's mistakes (config, rules, templates, a row their
query returned): the command line exits 2 on them. ``RuntimeFailure`` and its children are
failures of the world (a rule's SQL failed, a service is unreachable): exit 1. Channel errors say
whether retrying can help. Database errors enter the tree in one place, :mod:`reminders.dberrors`.

The tree (classes defined beside the code that raises them name their module)::

    RemindersError
    ├── InputError                  exit 2
    │   ├── ConfigError
    │   ├── RuleError
    │   │   ├── RecheckInvalid      compose: a rule's check query asks what its row lacks
    │   │   └── RecurrenceSyntaxError  sendtime: an RRULE dateutil cannot read
    │   ├── TemplateError
    │   ├── YamlError               yamlfile: becomes a ConfigError or a RuleError
    │   ├── CheckParamError         checks: the checkout's parameters
    │   └── RowError                planner: a row no reminder can be computed from (skipped)
    ├── RuntimeFailure              exit 1
    │   ├── SourceError             the business DB
    │   ├── StateError              the state DB
    │   ├── ServiceUnavailable
    │   ├── RecheckFailed           compose: a rule's check query went unanswered (retried)
    │   └── LookupFailed            channels.twilio: Twilio's Messages list could not be read
    ├── ChannelError                permanent or not
    │   ├── TransientError
    │   ├── PermanentError
    │   └── AmbiguousError          the provider may have it (no answer): reconciled, not retried
    ├── LinkError                   links: a customer's link token is not ours or has expired
    ├── BudgetExceeded              render: past a render's budget (reported as a TemplateError)
    └── TransitionNotAllowed        lifecycle: a status change the table does not allow (a bug)
"""

from __future__ import annotations

from dataclasses import dataclass


class RemindersError(Exception):
    """Base of every error the engine raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the business's input, at a place (file and line when known)."""

    message: str
    file: str | None = None
    line: int | None = None
    warning: bool = False

    def __str__(self) -> str:
        place = ""
        if self.file:
            place = f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        kind = "warning: " if self.warning else ""
        return f"{place}{kind}{self.message}"


class InputError(RemindersError):
    """The business's config, rules or templates are invalid. Carries every problem found."""

    def __init__(self, problems: list[Problem] | Problem | str) -> None:
        if isinstance(problems, str):
            problems = [Problem(problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class ConfigError(InputError):
    """config.yaml is invalid or names something missing (an environment variable, a file)."""


class RuleError(InputError):
    """A rule file is invalid."""


class TemplateError(InputError):
    """A template is missing, does not compile, or failed to render (names template and line)."""


class RuntimeFailure(RemindersError):
    """Something outside the business's input failed: the command exits 1."""


class SourceError(RuntimeFailure):
    """A rule's query failed against the business database (names the rule and the DB's message)."""


class StateError(RuntimeFailure):
    """A statement failed against the state DB (names the DB's message)."""


class ServiceUnavailable(RuntimeFailure):
    """Redis, the state DB or another service the engine needs did not answer."""


class ChannelError(RemindersError):
    """Sending failed. ``permanent`` errors are not retried: the next channel is tried instead.

    ``code`` is the provider's own error code when it gave one (Twilio's 21610, an SMTP reply code);
    ``opt_out`` says the recipient asked not to be contacted on this channel (Twilio 21610).
    """

    def __init__(
        self,
        message: str,
        *,
        permanent: bool,
        code: str | None = None,
        opt_out: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.permanent = permanent
        self.code = code
        self.opt_out = opt_out


class TransientError(ChannelError):
    """A failure that may pass (HTTP 429/5xx, a timeout, SMTP 4xx): retry with backoff."""

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message, permanent=False, code=code)


class PermanentError(ChannelError):
    """A failure that will not pass (invalid number, opted out, SMTP 5xx): try the next channel."""

    def __init__(self, message: str, *, code: str | None = None, opt_out: bool = False) -> None:
        super().__init__(message, permanent=True, code=code, opt_out=opt_out)


class AmbiguousError(ChannelError):
    """The provider may have the message: the outcome of the send is unknown.

    The request went out and no answer came back (a read timeout, the connection reset or closed
    before an answer, HTTP 5xx or Twilio 20500; SMTP: the connection lost or timed out after the
    message's data). Retrying blind could send it twice: the reminder is recorded ``unknown`` and
    reconciled with the provider's own records (:mod:`reminders.reconcile`). ``provider_id`` is
    the id the message would have there when the sender chose it (an email's Message-ID).
    """

    def __init__(
        self, message: str, *, code: str | None = None, provider_id: str | None = None
    ) -> None:
        super().__init__(message, permanent=False, code=code)
        self.provider_id = provider_id
