"""Email addresses: checked by email-validator, sent as written, matched case-insensitively.

Customers' addresses come from the business's own database, typed by people: a zero-width space
or a byte-order mark pasted along, two dots in a row, a domain label starting with a hyphen.
:func:`check` refuses such an address with email-validator's reason (a ``PermanentError``: the
next channel is tried, and the reason is kept on the reminder). Only the syntax is checked: no DNS
lookup is made at send time (the SMTP server is the judge of deliverability).

RFC 5321 (section 2.4) lets a mail server treat the local part as case-sensitive, so an address is
sent with its local part as written; only the domain, which is case-insensitive, is normalised.
Consent and opt-outs compare addresses case-insensitively
(:func:`reminders.links.normalize_address`): a customer who unsubscribed ``chloe@example.com``
gets nothing at ``Chloe@Example.com``.
"""

from __future__ import annotations

import functools

from email_validator import EmailNotValidError, validate_email

from reminders.errors import PermanentError
from reminders.phone import mask_email


def _checked(raw: str) -> tuple[str, str]:
    """``raw`` checked by email-validator (syntax only): the address as sent and its wire form.
    Raises ``PermanentError`` (code ``invalid_address``) with the masked address and the reason
    it cannot be used."""
    text = (raw or "").strip()
    if not text:
        raise PermanentError("no email address", code="invalid_address")
    normalized, wire, error = _validated(text)
    if error:
        raise PermanentError(error, code="invalid_address")
    return normalized, wire


# Checked for every reminder of the customer's, and by the console's forecast for every pending
# one (about 0.13 ms an address): the outcome depends on the text alone. Strings are kept, not
# email-validator's result (a dozen attributes).
@functools.lru_cache(maxsize=32_768)
def _validated(text: str) -> tuple[str, str, str]:
    """(the address as sent, its wire form, "") or ("", "", why it cannot be used)."""
    try:
        found = validate_email(text, check_deliverability=False)
    except EmailNotValidError as exc:
        return "", "", f"not a usable email address {mask_email(text)}: {exc}"
    return str(found.normalized), str(found.ascii_email or found.normalized), ""


def check(raw: str) -> str:
    """The address to send to: its local part as written, its domain normalised (lowercase,
    IDNA). Raises ``PermanentError`` when it cannot be used, saying why."""
    return _checked(raw)[0]


def wire_form(address: str) -> str:
    """``address`` for the SMTP envelope and the ``To`` header: with its domain in ASCII (IDNA)
    when the local part is ASCII, so no SMTPUTF8 server is needed; as it is otherwise.

    Raises ``PermanentError`` when it cannot be used.
    """
    return _checked(address)[1]
