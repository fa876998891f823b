"""Who may do what: users' passwords (argon2), roles, CSRF tokens and the login rate limit.

Passwords are hashed with argon2id (``argon2-cffi``'s defaults, RFC 9106's second
recommended profile); a hash made with older parameters is replaced at the next login.
A login for an unknown user still verifies a dummy hash, so the answer takes as long as for
a known one and does not tell which user names exist.

Roles are ordered: an analyst works cases; a supervisor also takes escalated cases, releases
anyone's claim and reads the verdict audit trail; an admin also sees the users.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Final

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_CHARS: Final = 12
USERNAME_PATTERN: Final = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_HASHER: Final = PasswordHasher()
# Verified when the user does not exist, so both answers cost one argon2 verification.
_DUMMY_HASH: Final = _HASHER.hash(secrets.token_urlsafe(16))


class Role(enum.StrEnum):
    """A user's role; each includes the rights of those before it."""

    ANALYST = "analyst"
    SUPERVISOR = "supervisor"
    ADMIN = "admin"


_RANK: Final = {Role.ANALYST: 1, Role.SUPERVISOR: 2, Role.ADMIN: 3}


def role_allows(role: str, needed: Role) -> bool:
    """Whether ``role`` (as stored) has the rights of ``needed``; unknown roles have none."""
    try:
        return _RANK[Role(role)] >= _RANK[needed]
    except ValueError:
        return False


def username_problem(username: str) -> str | None:
    """Why a user name is refused, or None: lower-case letters, digits, ``.``, ``_``, ``-``."""
    if not USERNAME_PATTERN.match(username):
        return (
            "a user name is 1 to 64 lower-case letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return None


def password_problem(password: str) -> str | None:
    """Why a password is refused, or None (length only: NIST SP 800-63B's advice)."""
    if len(password) < MIN_PASSWORD_CHARS:
        return f"a password needs at least {MIN_PASSWORD_CHARS} characters"
    return None


def hash_password(password: str) -> str:
    """An argon2id hash of the password, with its salt and parameters."""
    return _HASHER.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """Whether the password matches; with no stored hash, spends the same time, then False."""
    try:
        return _HASHER.verify(stored_hash or _DUMMY_HASH, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    """Whether the hash was made with weaker parameters than the current ones."""
    return _HASHER.check_needs_rehash(stored_hash)


def hash_fingerprint(stored_hash: str) -> str:
    """A short digest of the password hash kept in the session: a changed password (a new
    hash) ends every session opened with the old one."""
    return hashlib.sha256(stored_hash.encode()).hexdigest()[:16]


def new_csrf_token() -> str:
    """A fresh anti-forgery token, kept in the session and put in every form."""
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    """Constant-time comparison of the session's token with the form's."""
    if not expected or not given:
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class LoginRateLimiter:
    """Refuses logins for a user name or a client address after too many recent failures.

    Failures are counted per key within a sliding window, in this process's memory (a
    console replica counts its own; a restart forgets). A success clears the user name's
    failures, not the address's, so one good account does not unlock guessing others.

    Args:
        max_failures: Failures per key within the window before attempts are refused.
        window_s: Length of the window.
    """

    def __init__(self, max_failures: int, window_s: float) -> None:
        self.max_failures = max_failures
        self.window_s = window_s
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.setdefault(key, deque())
        while times and times[0] <= now - self.window_s:
            times.popleft()
        return times

    def allowed(self, keys: Iterable[str], now_s: float | None = None) -> bool:
        """Whether an attempt under these keys may be checked at all."""
        now = time.monotonic() if now_s is None else now_s
        with self._lock:
            return all(len(self._recent(k, now)) < self.max_failures for k in keys)

    def failed(self, keys: Iterable[str], now_s: float | None = None) -> None:
        """Count a failed attempt against every key."""
        now = time.monotonic() if now_s is None else now_s
        with self._lock:
            for key in keys:
                self._recent(key, now).append(now)
            if len(self._failures) > 100_000:  # bound the memory a flood of names can take
                for key in [k for k, v in self._failures.items() if not v]:
                    del self._failures[key]

    def succeeded(self, key: str) -> None:
        """Forget a key's failures (the user name's, after a correct password)."""
        with self._lock:
            self._failures.pop(key, None)
