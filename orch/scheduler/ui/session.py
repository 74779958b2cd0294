"""Dashboard sessions, CSRF tokens and one-time sign-in links: HMAC-signed, stateless, expiring.

A session is ``role.expires.nonce.mac``: the role (``admin`` acts, ``read`` only reads), when it ends (Unix
seconds), a random nonce, and an HMAC-SHA256 of the rest. Its CSRF token is an HMAC of its nonce, sent back in
a header (``X-Orch-CSRF``) with every action; a page of another site can neither read it nor set that header.

The key is made from the client token (its digest), so every scheduler of a shared database signs and checks
alike, and a rotated client token ends every session. A one-time link (``orch ui``) is signed the same way,
lives a minute, and is taken once per scheduler (a replica that did not see it taken would take it again
within that minute; the link is printed to the person who holds the client token anyway).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from typing import Callable

ADMIN, READ = "admin", "read"
ROLES = (ADMIN, READ)
COOKIE = "orch_session"
CSRF_HEADER = "X-Orch-CSRF"
LINK_TTL = 60.0
MAX_VALUE = 256  # longer cookie or code values are not ours: refused before any HMAC


@dataclass(frozen=True)
class Session:
    role: str
    expires: float
    nonce: str

    @property
    def may_act(self) -> bool:
        return self.role == ADMIN


def _mac(key: bytes, purpose: str, text: str) -> str:
    digest = hmac.new(key, f"{purpose}\0{text}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


class Sessions:
    """Signs and checks; ``key_of`` gives the current key (None: no key yet, nothing is valid)."""

    def __init__(self, key_of: Callable[[], bytes | None], ttl: float, clock: Callable[[], float] = time.time) -> None:
        self.key_of = key_of
        self.ttl = ttl
        self.clock = clock
        self._taken: dict[str, float] = {}  # one-time link nonces taken here -> when they expire

    def _signed(self, purpose: str, role: str, ttl: float) -> str | None:
        key = self.key_of()
        if key is None:
            return None
        text = f"{role}.{int(self.clock() + ttl)}.{secrets.token_urlsafe(12)}"
        return f"{text}.{_mac(key, purpose, text)}"

    def _check(self, purpose: str, value: str | None) -> Session | None:
        key = self.key_of()
        if key is None or not value or len(value) > MAX_VALUE or not value.isascii():
            return None
        text, _, mac = value.rpartition(".")
        parts = text.split(".")
        if len(parts) != 3 or parts[0] not in ROLES or not parts[1].isdigit():
            return None
        if not hmac.compare_digest(mac, _mac(key, purpose, text)):
            return None
        expires = float(parts[1])
        if expires <= self.clock():
            return None
        return Session(parts[0], expires, parts[2])

    def issue(self, role: str) -> str | None:
        """A session cookie's value for ``role``."""
        return self._signed("session", role, self.ttl)

    def read(self, value: str | None) -> Session | None:
        """The session of a cookie's value, or None (forged, expired, or signed with a key no longer in use)."""
        return self._check("session", value)

    def csrf(self, session: Session) -> str:
        key = self.key_of()
        return _mac(key, "csrf", session.nonce) if key is not None else ""

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return bool(given) and len(given or "") <= MAX_VALUE and hmac.compare_digest(
            (given or "").encode("ascii", "replace"), self.csrf(session).encode())

    def link(self, role: str) -> str | None:
        """A one-time sign-in code, good for LINK_TTL seconds."""
        return self._signed("link", role, LINK_TTL)

    def redeem(self, code: str | None) -> str | None:
        """The role a one-time code signs in as, once; None if it is not valid or was taken."""
        found = self._check("link", code)
        if found is None:
            return None
        now = self.clock()
        self._taken = {n: t for n, t in self._taken.items() if t > now}
        if found.nonce in self._taken:
            return None
        self._taken[found.nonce] = found.expires
        return found.role


def key_from(client_digest: str | None) -> bytes | None:
    """The signing key of a client token's digest (auth.digest): every scheduler sharing the token agrees."""
    if not client_digest:
        return None
    return hashlib.sha256(b"orch-ui-session-v1\0" + client_digest.encode()).digest()
