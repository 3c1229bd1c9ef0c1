"""Address and consent at send time: the channel a reminder goes by.

The rule's channels are tried in order from the reminder's ``channel_index``. A channel is
skipped when the customer's address on it is unusable (an invalid phone number, no email), when
the address opted out, or when the customer turned the rule off on it (:mod:`reminders.consent`
decides both, from the batch's :class:`~reminders.consent.View`). The first channel left is the
one: if it is not the queue's, the reminder moves to that channel's queue. With none left, the
reminder fails when an address was unusable (ops should see it) and is canceled when the customer
said no. A reminder already moved off its first channel keeps the earlier reason in front.
"""

from __future__ import annotations

from ..errors import PermanentError
from .base import Cancel, Context, Decision, Fail, Move, Skip


def policy(context: Context) -> Decision | None:
    """Skip the channel asked about, move to it, or (none left) fail or cancel; None: send."""
    candidate = context.candidate
    if candidate is None:
        return _none_left(context)
    index, name, address = candidate
    if isinstance(address, PermanentError):
        return Skip(f"{name}: {address.message}", unusable=True)
    customer_id = str(context.row["customer_id"])
    refused = context.batch.consent.refusal(customer_id, context.rule.name, name, address)
    if refused:
        return Skip(refused)
    if name != context.batch.queue:
        note = "".join(f"{skip.reason}; " for skip in context.skipped)
        return Move(index, name, f"{_earlier(context)}{note}sending by {name}")
    return None


def _none_left(context: Context) -> Fail | Cancel:
    earlier = _earlier(context)
    skipped = context.skipped
    if not skipped:
        return Fail(f"{earlier}failed: no channel left after {context.rule.channels[-1]}")
    why = "; ".join(skip.reason for skip in skipped)
    if any(skip.unusable for skip in skipped):
        return Fail(f"{earlier}failed: no usable channel ({why})")
    return Cancel(f"{earlier}canceled: {why}")


def _earlier(context: Context) -> str:
    """Why the reminder left its first channel, when it did, to keep in front of a new reason."""
    row = context.row
    return f"{row['reason']}; then " if row["channel_index"] and row["reason"] else ""
