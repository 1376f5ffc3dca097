"""Who may send: application accounts, password checks, and the AUTH failure lockout."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from relay.config import AppConfig

PBKDF2_ITERATIONS = 310_000


def hash_password(password: str, *, iterations: int = PBKDF2_ITERATIONS,
                  salt: bytes | None = None) -> str:
    """pbkdf2_sha256$ITERATIONS$SALT$HASH (base64), for [[app]].password_hash."""
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    return "$".join(["pbkdf2_sha256", str(iterations),
                     base64.b64encode(salt).decode("ascii"),
                     base64.b64encode(digest).decode("ascii")])


def verify_hash(password: bytes, encoded: str) -> bool:
    _, iterations, salt, digest = encoded.split("$")
    got = hashlib.pbkdf2_hmac("sha256", password, base64.b64decode(salt), int(iterations))
    return hmac.compare_digest(got, base64.b64decode(digest))


class Accounts:
    """The [[app]] accounts; the SMTP AUTH user name is the app's name."""

    def __init__(self, apps: tuple[AppConfig, ...],
                 environ: Mapping[str, str] | None = None):
        env = os.environ if environ is None else environ
        self.apps = {app.name: app for app in apps}
        # Passwords from the environment are read once, at load (and on reload).
        self._secrets = {app.name: env[app.password_env].encode("utf-8")
                         for app in apps if app.password_env and app.password_env in env}
        # PBKDF2 costs ~80 ms on the event loop; remember passwords that verified, as keyed
        # digests under a per-process key (never the passwords themselves).
        self._cache_key = secrets.token_bytes(32)
        self._verified: OrderedDict[tuple[str, bytes], None] = OrderedDict()

    def __bool__(self) -> bool:
        return bool(self.apps)

    def check(self, login: bytes, password: bytes) -> AppConfig | None:
        """The app whose credentials these are, or None. Constant time per app."""
        try:
            name = login.decode("utf-8")
        except UnicodeDecodeError:
            return None
        app = self.apps.get(name)
        if app is None:
            hmac.compare_digest(password, b"\0" * 16)  # spend comparable time
            return None
        if app.password_hash:
            key = (name, hmac.digest(self._cache_key, password, "sha256"))
            if key in self._verified:
                self._verified.move_to_end(key)
                return app
            if not verify_hash(password, app.password_hash):
                return None
            self._verified[key] = None
            while len(self._verified) > 1024:
                self._verified.popitem(last=False)
            return app
        secret = self._secrets.get(name)
        return app if secret is not None and hmac.compare_digest(password, secret) else None


class AuthLockout:
    """Failed AUTH attempts per client IP; after `max_failures` within `window`, the IP is
    locked out for `lockout` seconds. Bounded: at most `max_tracked` IPs are remembered."""

    def __init__(self, max_failures: int, lockout: float, *, window: float | None = None,
                 clock: Callable[[], float] = time.monotonic, max_tracked: int = 65536):
        self.max_failures = max_failures
        self.lockout = lockout
        self.window = window if window is not None else lockout
        self.clock = clock
        self.max_tracked = max_tracked
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._locked_until: dict[str, float] = {}

    def locked(self, ip: str) -> bool:
        until = self._locked_until.get(ip)
        if until is None:
            return False
        if self.clock() >= until:
            del self._locked_until[ip]
            self._failures.pop(ip, None)
            return False
        return True

    def failure(self, ip: str) -> bool:
        """Record a failure; True when this failure starts a lockout."""
        now = self.clock()
        recent = [t for t in self._failures.pop(ip, []) if now - t < self.window]
        recent.append(now)
        self._failures[ip] = recent
        while len(self._failures) > self.max_tracked:
            self._failures.popitem(last=False)
        if len(recent) >= self.max_failures:
            self._locked_until[ip] = now + self.lockout
            return True
        return False

    def success(self, ip: str) -> None:
        self._failures.pop(ip, None)
