"""What a send-time policy sees (:class:`Context`) and what it may decide (the decision types).

A decision is data: :class:`~reminders.delivery.Delivery` turns it into a status change and
applies it, conditional on the reminder being still queued under the job, like every change.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy.engine import Connection

from ..compose import address_for
from ..config import Config
from ..consent import View
from ..errors import PermanentError
from ..rules import Rule

# -- decisions ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel the reminder: it is no longer wanted (``canceled``, with the reason)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail the reminder: it cannot be sent (``failed``, with the reason)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Defer:
    """Send it later on the same channel: back to ``pending`` with the new send time ``until``."""

    until: datetime
    reason: str


@dataclass(frozen=True, slots=True)
class Move:
    """Send it now on another channel (the rule's channel ``index``): back to ``pending`` there,
    enqueued on that channel's queue at once."""

    index: int
    channel: str
    reason: str


@dataclass(frozen=True, slots=True)
class Retry:
    """A transient failure: try again after a backoff, or fail once the attempts are used up
    (``retries`` in the config)."""

    reason: str


@dataclass(frozen=True, slots=True)
class Skip:
    """Not this channel: ask again about the rule's next one. ``unusable``: the address itself
    is (an invalid phone number, no email), rather than a refusal by the customer."""

    reason: str
    unusable: bool = False


Decision = Cancel | Fail | Defer | Move | Retry | Skip


# -- the context --------------------------------------------------------------------------------


class Candidate(NamedTuple):
    """One of the rule's channels for this reminder: its index in the rule, its name, and the
    customer's address on it or why there is none."""

    channel_index: int
    channel: str
    address: str | PermanentError


def candidates(
    config: Config, rule: Rule, channel_index: int, customer: Mapping[str, Any]
) -> tuple[Candidate, ...]:
    """The rule's channels from ``channel_index`` on, each with the customer's address on it."""
    found = []
    for index in range(channel_index, len(rule.channels)):
        name = rule.channels[index]
        try:
            found.append(Candidate(index, name, address_for(config, name, customer)))
        except PermanentError as exc:
            found.append(Candidate(index, name, exc))
    return tuple(found)


@dataclass(frozen=True, slots=True)
class Batch:
    """What every reminder of a worker's batch shares, read or opened once for the batch."""

    config: Config
    now: datetime
    queue: str  # the channel whose queue the job came from
    consent: View  # the opt-outs and preferences of the batch's customers and addresses
    business: Callable[[], Connection]  # the business DB, opened on first use (check queries)


@dataclass(frozen=True, slots=True)
class Context:
    """One queued reminder at send time, as the policies see it."""

    batch: Batch
    row: Mapping[str, Any]  # the reminder's row in the state DB
    rule: Rule
    values: Mapping[str, Any]  # the occurrence's row from the rule's query, typed
    customer: Mapping[str, Any]  # the customer's fields (``compose.customer_of``)
    candidates: tuple[Candidate, ...]  # the channels left to try, the one asked about first
    skipped: tuple[Skip, ...] = ()  # the channels skipped before it, in order

    @property
    def config(self) -> Config:
        return self.batch.config

    @property
    def now(self) -> datetime:
        return self.batch.now

    @property
    def candidate(self) -> Candidate | None:
        """The channel asked about; None when none is left."""
        return self.candidates[0] if self.candidates else None

    def skip(self, decision: Skip) -> Context:
        """The same reminder, asked about its next channel."""
        return replace(self, candidates=self.candidates[1:], skipped=(*self.skipped, decision))


Policy = Callable[[Context], Decision | None]
