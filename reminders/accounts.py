"""The console's users and API keys, stored hashed in the state DB.

Passwords and keys are hashed with scrypt (``hashlib.scrypt``, RFC 7914: memory-hard, in the
standard library) and a random salt each; the stored text names its parameters, so they can be
raised later without breaking existing hashes. An API key reads ``rk_<id>_<secret>``: the public
id finds its row, the secret is checked against the hash, and the key itself is shown once, when
it is made. A verified key is remembered by the process (its digest, with the stored hash it
matched), so scripts do not pay scrypt on every call; a revoked key is refused at once, because
the row is read on every request.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import audit
from .errors import InputError, Problem
from .models import api_key, user


class Role(StrEnum):
    """What a user or key may do: a viewer looks, an operator also retries, cancels, pauses."""

    VIEWER = "viewer"
    OPERATOR = "operator"


ROLES = tuple(r.value for r in Role)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,99}$")
MIN_PASSWORD = 10
# scrypt cost: N=2**14, r=8, p=1 (16 MiB a hash; Django's ScryptPasswordHasher default): about
# 0.2 s a log-in on a small shared 2-core VM. The stored hash names them: raising them later
# keeps existing hashes valid.
_N, _R, _P = 2**14, 8, 1
_MAXMEM = 64 * 1024 * 1024


@dataclass(frozen=True)
class Principal:
    """Who is asking: a user (by session) or an API key, and their role."""

    name: str
    role: Role
    kind: str  # "user" or "key"

    @property
    def actor(self) -> str:
        """How the audit log names them: ``jane`` or ``key:deploy-bot``."""
        return self.name if self.kind == "user" else f"key:{self.name}"

    @property
    def can_change(self) -> bool:
        return self.role == Role.OPERATOR


def hash_secret(text: str) -> str:
    """A scrypt hash of ``text``: ``scrypt$N$r$p$salt$hash`` (base64)."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(text.encode(), salt=salt, n=_N, r=_R, p=_P, maxmem=_MAXMEM, dklen=32)
    return "$".join(["scrypt", str(_N), str(_R), str(_P), _b64(salt), _b64(digest)])


def verify_secret(text: str, stored: str) -> bool:
    """Whether ``text`` matches the hash ``stored`` (constant time)."""
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        expected = base64.b64decode(digest)
        got = hashlib.scrypt(
            text.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=_MAXMEM,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, expected)


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


# A hash to check against when the user does not exist, so an unknown name takes as long.
_DUMMY = hash_secret(secrets.token_urlsafe(16))


def _check_name(name: str, what: str) -> None:
    if not NAME.match(name):
        raise InputError(
            [Problem(f'{what} "{name}": use letters, digits, ".", "_", "@" or "-" (up to 100)')]
        )


def _check_role(role: str) -> Role:
    if role not in ROLES:
        raise InputError([Problem(f'role "{role}": must be one of {", ".join(ROLES)}')])
    return Role(role)


# -- users ----------------------------------------------------------------------------------------


def add_user(conn: Connection, name: str, role: str, password: str, *, now: datetime) -> None:
    """Add a console user, or set an existing user's role and password."""
    _check_name(name, "user")
    checked = _check_role(role)
    if len(password) < MIN_PASSWORD:
        raise InputError(
            [Problem(f"the password is too short: use at least {MIN_PASSWORD} characters")]
        )
    hashed = hash_secret(password)
    found = conn.execute(sa.select(user.c.id).where(user.c.name == name)).first()
    if found is None:
        conn.execute(
            user.insert().values(
                name=name, role=checked.value, password_hash=hashed, created_at=now
            )
        )
    else:
        conn.execute(
            user.update()
            .where(user.c.id == found.id)
            .values(role=checked.value, password_hash=hashed)
        )
    audit.record(
        conn, actor="cli", action=audit.USER_ADDED, target=name, detail=checked.value, now=now
    )


def remove_user(conn: Connection, name: str, *, now: datetime) -> bool:
    """Remove a user (their sessions end at their next request); returns whether one existed."""
    gone = conn.execute(user.delete().where(user.c.name == name)).rowcount > 0
    if gone:
        audit.record(conn, actor="cli", action=audit.USER_REMOVED, target=name, now=now)
    return gone


def list_users(conn: Connection) -> list[dict[str, Any]]:
    return [
        {"name": row.name, "role": row.role, "created_at": row.created_at}
        for row in conn.execute(sa.select(user).order_by(user.c.name))
    ]


def find_user(conn: Connection, name: str) -> Principal | None:
    """The user ``name``, if they exist."""
    row = conn.execute(sa.select(user.c.name, user.c.role).where(user.c.name == name)).first()
    return None if row is None else Principal(row.name, Role(row.role), "user")


def authenticate(conn: Connection, name: str, password: str) -> Principal | None:
    """The user when ``password`` is theirs, else None (as slow for an unknown name)."""
    row = conn.execute(sa.select(user).where(user.c.name == name)).first()
    if row is None:
        verify_secret(password, _DUMMY)
        return None
    if not verify_secret(password, row.password_hash):
        return None
    return Principal(row.name, Role(row.role), "user")


# -- API keys -------------------------------------------------------------------------------------

KEY_PREFIX = "rk_"
_KEY = re.compile(r"^rk_([A-Za-z0-9]{12})_([A-Za-z0-9_-]{20,100})$")
# Keys verified by this process: sha256(presented key) -> the stored hash it matched.
_verified: dict[bytes, str] = {}


def add_key(conn: Connection, name: str, role: str, *, now: datetime, actor: str = "cli") -> str:
    """Make an API key named ``name``; returns the key, which is stored only as a hash."""
    _check_name(name, "key")
    checked = _check_role(role)
    if conn.execute(sa.select(api_key.c.id).where(api_key.c.name == name)).first() is not None:
        raise InputError([Problem(f'a key named "{name}" exists already (revoke it first)')])
    key_id = "".join(secrets.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(12))
    secret = secrets.token_urlsafe(32)
    conn.execute(
        api_key.insert().values(
            name=name,
            role=checked.value,
            key_id=key_id,
            key_hash=hash_secret(secret),
            created_at=now,
        )
    )
    audit.record(
        conn, actor=actor, action=audit.KEY_CREATED, target=name, detail=checked.value, now=now
    )
    return f"{KEY_PREFIX}{key_id}_{secret}"


def revoke_key(conn: Connection, name: str, *, now: datetime, actor: str = "cli") -> bool:
    """Revoke the key ``name`` (refused from its next request); returns whether one was live."""
    done = (
        conn.execute(
            api_key.update()
            .where(api_key.c.name == name, api_key.c.revoked_at.is_(None))
            .values(revoked_at=now)
        ).rowcount
        > 0
    )
    if done:
        audit.record(conn, actor=actor, action=audit.KEY_REVOKED, target=name, now=now)
    return done


def list_keys(conn: Connection) -> list[dict[str, Any]]:
    return [
        {
            "name": row.name,
            "role": row.role,
            "id": row.key_id,
            "created_at": row.created_at,
            "revoked_at": row.revoked_at,
        }
        for row in conn.execute(sa.select(api_key).order_by(api_key.c.name))
    ]


def key_principal(conn: Connection, presented: str) -> Principal | None:
    """The key's holder when ``presented`` is a live key, else None."""
    match = _KEY.match(presented)
    if match is None:
        return None
    row = conn.execute(
        sa.select(api_key).where(api_key.c.key_id == match.group(1), api_key.c.revoked_at.is_(None))
    ).first()
    if row is None:
        return None
    seen = hashlib.sha256(presented.encode()).digest()
    if _verified.get(seen) != row.key_hash:
        if not verify_secret(match.group(2), row.key_hash):
            return None
        _verified[seen] = row.key_hash
    return Principal(row.name, Role(row.role), "key")
