"""Quiet hours at send time: a hard rule, in the recipient's zone (DESIGN.md "Time", step 5).

The rule's own quiet hours for the channel, else the channel's (SMS 21:00-08:00 by default, email
none); a rule may be exempt (``quiet_hours: false``). A message due inside them is deferred to
their end, a new send time; the send window, a scheduling preference, is not applied again here.
"""

from __future__ import annotations

from .. import clock, sendtime
from ..compose import customer_zone
from .base import Context, Defer


def policy(context: Context) -> Defer | None:
    """Defer the reminder to the end of the channel's quiet hours when ``now`` is inside them."""
    candidate = context.candidate
    if candidate is None:
        return None
    name = candidate.channel
    quiet = context.rule.quiet_window(context.config, name)  # the rule's own, else the channel's
    if quiet is None:
        return None
    zone = customer_zone(context.config, context.customer)
    until = sendtime.quiet_until(context.now, zone, quiet)
    if until is None:
        return None
    return Defer(
        until,
        f"deferred: quiet hours {quiet.start:%H:%M}-{quiet.end:%H:%M} in {zone.key} "
        f"for {name}; send at {clock.iso_utc(until)}",
    )
