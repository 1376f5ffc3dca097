"""Application accounts: password checks (hash and environment) and the lockout."""

from __future__ import annotations

from relay.config import AppConfig
from relay.policy.access import Accounts, AuthLockout, hash_password


def test_hashed_password_verified_and_remembered_without_weakening() -> None:
    app = AppConfig(name="shop", password_hash=hash_password("right", iterations=1000))
    accounts = Accounts((app,), environ={})
    assert accounts.check(b"shop", b"right") is app
    assert accounts.check(b"shop", b"right") is app          # from the verified cache
    assert accounts.check(b"shop", b"wrong") is None          # the cache never says yes
    assert accounts.check(b"nobody", b"right") is None
    assert all(b"right" not in key[1] for key in accounts._verified)


def test_environment_password() -> None:
    app = AppConfig(name="shop", password_env="PW")
    accounts = Accounts((app,), environ={"PW": "s3cret"})
    assert accounts.check(b"shop", b"s3cret") is app
    assert accounts.check(b"shop", b"s3cre") is None
    assert accounts.check(b"\xff", b"s3cret") is None


def test_lockout_after_failures_and_expiry() -> None:
    now = [0.0]
    lock = AuthLockout(3, 60.0, clock=lambda: now[0])
    assert [lock.failure("192.0.2.1") for _ in range(3)] == [False, False, True]
    assert lock.locked("192.0.2.1") and not lock.locked("192.0.2.2")
    now[0] = 61.0
    assert not lock.locked("192.0.2.1")
