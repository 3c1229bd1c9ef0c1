"""Send-time policies: what may stop, delay or re-route a queued reminder just before it is sent.

Each policy is a small function of one reminder's :class:`Context` returning a decision, or None
when it has nothing against sending now. :data:`POLICIES` are asked in order and the first decision
wins (:func:`decide`); :class:`~reminders.delivery.Delivery` builds the contexts a batch at a time,
turns a decision into a status change, and renders and sends what no policy stopped.

1. :mod:`.grace`: past its grace at send time -> canceled as expired;
2. :mod:`.consent`: an unusable address, an opt-out, a preference turned off -> skip to the
   rule's next channel (none left: failed or canceled); a channel of another queue -> moved;
3. :mod:`.quiet_hours`: inside the recipient's quiet hours -> deferred to their end;
4. :mod:`.recheck`: the rule's ``check`` query returns no row -> canceled (it failed: retried).

A new check goes in its own module with its own test file, in this list where it belongs (a paused
rule, say, right after grace). Frequency caps are not a policy here: they are counted in the
claim's transaction (:mod:`reminders.caps`). What happens after a send (retries with backoff,
falling back to the next channel) is :mod:`reminders.delivery`'s and :mod:`reminders.fallback`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

from . import consent, grace, quiet_hours, recheck
from .base import (
    Batch,
    Cancel,
    Candidate,
    Context,
    Decision,
    Defer,
    Fail,
    Move,
    Policy,
    Retry,
    Skip,
    candidates,
)

__all__ = [
    "POLICIES",
    "Batch",
    "Cancel",
    "Candidate",
    "Context",
    "Decision",
    "Defer",
    "Fail",
    "Move",
    "Policy",
    "Retry",
    "Skip",
    "candidates",
    "decide",
]

POLICIES: tuple[Policy, ...] = (grace.policy, consent.policy, quiet_hours.policy, recheck.policy)


def decide(
    context: Context, policies: Sequence[Policy] = POLICIES
) -> tuple[Decision | None, Context]:
    """The first decision of ``policies`` about ``context`` (None: send it now), and the context
    it was made in: a :class:`Skip` moves on to the rule's next channel and asks every policy
    again, so the channel a decision (or the send) is about is that context's ``candidate``."""
    while True:
        for policy in policies:
            decision = policy(context)
            if decision is None:
                continue
            if isinstance(decision, Skip):
                context = context.skip(decision)
                break
            return decision, context
        else:
            return None, context
