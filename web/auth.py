"""Who may use the web application: users, argon2 passwords, sessions, rate-limited sign-in.

Owns the ``users``, ``web_sessions`` and ``login_failures`` tables. A session is
a random token in an HttpOnly cookie; the database keeps only its sha256, its
expiry and the CSRF token that every form of that session must echo back.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import Connection, Engine, text

log = logging.getLogger(__name__)

ROLES = ("reviewer", "admin")

# Sign-in guessing is limited per name (one account under attack) and per client
# address (one attacker trying many names), over a sliding window.
FAILURE_WINDOW = timedelta(minutes=15)
MAX_FAILURES_PER_NAME = 5
MAX_FAILURES_PER_CLIENT = 20

# argon2id with the library's defaults (RFC 9106 low-memory profile: 64 MiB, 3 passes).
_hasher = PasswordHasher()
# Verified against when the name is unknown, so a wrong name costs as long as a wrong password.
_UNKNOWN_USER_HASH = _hasher.hash(secrets.token_urlsafe(16))


class UserError(ValueError):
    """A user cannot be created as asked; the message says why."""


class TooManyFailures(Exception):
    """Sign-in refused without checking the password: too many recent failures."""

    def __init__(self, retry_after: timedelta) -> None:
        super().__init__(f"too many failed sign-ins; try again in {_minutes(retry_after)}")
        self.retry_after = retry_after


@dataclass(frozen=True)
class User:
    id: int
    name: str
    role: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class WebSession:
    user: User
    csrf_token: str


def add_user(engine: Engine, name: str, role: str, password: str) -> User:
    """Create a user; the password is stored only as an argon2id hash."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < 8:
        raise UserError("the password needs at least 8 characters")
    with engine.begin() as conn:
        row = conn.execute(
            text(
                """
                INSERT INTO users (name, role, password_hash) VALUES (:name, :role, :hash)
                ON CONFLICT (name) DO NOTHING
                RETURNING id, name, role
                """
            ),
            {"name": name, "role": role, "hash": _hasher.hash(password)},
        ).one_or_none()
    if row is None:
        raise UserError(f"a user named {name!r} already exists")
    log.info("user %s added with role %s", name, role)
    return User(*row)


def set_password(engine: Engine, name: str, role: str, password: str) -> User:
    """Create the user, or give an existing one this role and password (the demo's admin)."""
    if role not in ROLES:
        raise UserError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    with engine.begin() as conn:
        row = conn.execute(
            text(
                """
                INSERT INTO users (name, role, password_hash) VALUES (:name, :role, :hash)
                ON CONFLICT (name) DO UPDATE
                    SET role = EXCLUDED.role, password_hash = EXCLUDED.password_hash
                RETURNING id, name, role
                """
            ),
            {"name": name, "role": role, "hash": _hasher.hash(password)},
        ).one()
    return User(*row)


def sign_in(engine: Engine, name: str, password: str, client: str, minutes: int) -> str | None:
    """Check a password and open a session; the session token, or None if refused.

    Raises TooManyFailures before looking at the password when the name or the
    client has failed too often lately.
    """
    with engine.begin() as conn:
        _check_rate(conn, name, client)
        row = conn.execute(
            text("SELECT id, password_hash FROM users WHERE name = :name"), {"name": name}
        ).one_or_none()
        stored = row.password_hash if row else _UNKNOWN_USER_HASH
        if not _verify(stored, password) or row is None:
            conn.execute(
                text("INSERT INTO login_failures (name, client) VALUES (:name, :client)"),
                {"name": name, "client": client},
            )
            log.warning("failed sign-in for %r from %s", name, client)
            return None
        if _hasher.check_needs_rehash(row.password_hash):
            conn.execute(
                text("UPDATE users SET password_hash = :h WHERE id = :id"),
                {"h": _hasher.hash(password), "id": row.id},
            )
        conn.execute(text("DELETE FROM login_failures WHERE name = :name"), {"name": name})
        token = secrets.token_urlsafe(32)
        conn.execute(
            text(
                """
                INSERT INTO web_sessions (token_sha256, user_id, csrf_token, expires_at)
                VALUES (:token, :user_id, :csrf, now() + make_interval(mins => :minutes))
                """
            ),
            {
                "token": _digest(token),
                "user_id": row.id,
                "csrf": secrets.token_urlsafe(32),
                "minutes": minutes,
            },
        )
        # Expired sessions and failures older than the window count for nothing any more;
        # sweeping them at each sign-in keeps both tables small.
        conn.execute(text("DELETE FROM web_sessions WHERE expires_at < now()"))
        conn.execute(
            text("DELETE FROM login_failures WHERE failed_at < now() - :window"),
            {"window": FAILURE_WINDOW},
        )
    log.info("%s signed in from %s", name, client)
    return token


def _verify(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def _check_rate(conn: Connection, name: str, client: str) -> None:
    """Refuse when the name or the client failed too often within FAILURE_WINDOW."""
    by_name, by_client, oldest = conn.execute(
        text(
            """
            SELECT count(*) FILTER (WHERE name = :name),
                   count(*) FILTER (WHERE client = :client),
                   min(failed_at)
            FROM login_failures
            WHERE (name = :name OR client = :client) AND failed_at > now() - :window
            """
        ),
        {"name": name, "client": client, "window": FAILURE_WINDOW},
    ).one()
    if by_name >= MAX_FAILURES_PER_NAME or by_client >= MAX_FAILURES_PER_CLIENT:
        now = conn.execute(text("SELECT now()")).scalar_one()
        raise TooManyFailures(max(oldest + FAILURE_WINDOW - now, timedelta(minutes=1)))


def session_for(engine: Engine, token: str | None) -> WebSession | None:
    """The live session a cookie token names, or None (unknown, expired or signed out)."""
    if not token:
        return None
    with engine.connect() as conn:
        row = conn.execute(
            text(
                """
                SELECT u.id, u.name, u.role, s.csrf_token
                FROM web_sessions s JOIN users u ON u.id = s.user_id
                WHERE s.token_sha256 = :token AND s.expires_at > now()
                """
            ),
            {"token": _digest(token)},
        ).one_or_none()
    if row is None:
        return None
    return WebSession(User(row.id, row.name, row.role), row.csrf_token)


def sign_out(engine: Engine, token: str | None) -> None:
    if token:
        with engine.begin() as conn:
            conn.execute(
                text("DELETE FROM web_sessions WHERE token_sha256 = :t"), {"t": _digest(token)}
            )


def csrf_matches(expected: str, given: str | None) -> bool:
    return bool(given) and hmac.compare_digest(expected.encode(), given.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _minutes(delta: timedelta) -> str:
    minutes = max(1, round(delta.total_seconds() / 60))
    return f"{minutes} minute{'s' if minutes != 1 else ''}"
