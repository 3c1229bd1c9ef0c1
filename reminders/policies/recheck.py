"""The rule's ``check`` query, asked again just before sending: is the reminder still wanted?

Asked last, as the one policy that queries the business DB (on the batch's one connection): no
row cancels the reminder; a query that cannot be answered now (the database unreachable or
failing) is retried with backoff; one that cannot be asked for this reminder (a parameter its
row does not have) fails it.
"""

from __future__ import annotations

from ..compose import RecheckFailed, RecheckInvalid, recheck
from .base import Cancel, Context, Fail, Retry


def policy(context: Context) -> Cancel | Fail | Retry | None:
    """Cancel the reminder when the rule's check query returns no row; None: it does (or the rule
    has no check)."""
    rule = context.rule
    if not rule.check:
        return None
    try:
        business = context.batch.business()
        found = recheck(business, rule, context.values, context.now, context.config)
    except RecheckFailed as exc:
        return Retry(f"check query failed: {exc}")
    except RecheckInvalid as exc:
        return Fail(f"check query: {exc}")
    if found:
        return None
    return Cancel("canceled: the rule's check query returned no row")
