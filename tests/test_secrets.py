"""Secrets stay secret: no key or password in a repr, a log line or an error; keys cannot be guessed."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import isocache
from isocache import _core, config
from isocache._redact import redact_url, scrub
from isocache.tiers.redis import RedisTier, key_prefix

PASSPHRASE = "correct horse battery staple, long enough"
PASSWORD = "hunter2-very-secret"
URL = f"redis://alice:{PASSWORD}@127.0.0.1:1/3?password={PASSWORD}x&socket_keepalive=true"
PYTHON = Path(isocache.__file__).resolve().parents[1]


def test_reprs_and_errors_show_no_key_and_no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ISOCACHE_KEY", PASSPHRASE)
    monkeypatch.setenv("ISOCACHE_REDIS_URL", URL)
    cfg = config.current()
    assert cfg.key == PASSPHRASE.encode() and cfg.redis_url == URL
    key = cfg.key
    store = _core.Store(tmp_path / "cache", "ns", key)
    shown = [
        repr(cfg),
        str(cfg),
        repr(isocache.Backend(cache_dir=tmp_path, redis_url=URL)),
        repr(RedisTier(URL, "ns", key=key)),
        repr(store),
        repr(store.sign_existing()),
        repr(store.get_checked("ab" * 32)),
    ]
    for text in shown:
        assert "correct horse" not in text and PASSWORD not in text and key.hex() not in text, text
    assert f"<{len(key)} bytes, hidden>" in repr(cfg) and "127.0.0.1:1/3" in repr(cfg)
    for bad in (
        lambda: _core.Store(tmp_path / "c2", "ns", b"horse battery"),
        lambda: RedisTier(URL, "ns", key=b"horse"),
    ):
        with pytest.raises(isocache.CacheError) as info:
            bad()
        assert "horse" not in str(info.value) and PASSWORD not in str(info.value)


def test_a_bad_redis_url_logs_no_password(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="isocache")
    monkeypatch.setenv("ISOCACHE_REDIS_URL", f"http://alice:{PASSWORD}@host:6379/0")  # wrong scheme: warned
    assert config.current().redis_url is None
    for url in (URL, f"redis://:{PASSWORD}@127.0.0.1:notaport/0", f"redis://{PASSWORD}@127.0.0.1:1/0"):
        tier = RedisTier(url, "ns", key=b"k" * 32, timeout=0.2)
        assert tier.get("ab" * 32) is None
    text = caplog.text
    assert "ISOCACHE_REDIS_URL" in text and "unavailable" in text, text
    assert PASSWORD not in text and "hunter2" not in text, text
    assert "127.0.0.1:1/3" in text and "alice" in text, "the rest stays readable"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://host:6379/0", "redis://host:6379/0"),
        ("redis://alice:pw1@cache.internal:6380/2", "redis://alice:***@cache.internal:6380/2"),
        ("redis://:pw1@host/0", "redis://:***@host/0"),
        ("redis://pw1@host/0", "redis://***@host/0"),  # a bare user info is often a password
        ("redis://:p@w1@host", "redis://:***@host"),
        ("rediss://h:6380/1?ssl_cert_reqs=none&password=pw1", "rediss://h:6380/1?ssl_cert_reqs=none&password=***"),
        ("redis://h/0?username=bob&Password=pw1&db=4", "redis://h/0?username=bob&Password=***&db=4"),
        (
            "redis://h/0?ssl_password=pw1&token=pw2&health_check_interval=5",
            "redis://h/0?ssl_password=***&token=***&health_check_interval=5",
        ),
        ("unix://:pw1@/run/redis.sock?db=0", "unix://:***@/run/redis.sock?db=0"),
        ("redis://u:pw1@[::1]:6379/0", "redis://u:***@[::1]:6379/0"),
        ("redis://h:pw1/0", "redis://h:***/0"),  # a password where the port belongs
        ("redis://h:6379/0#pw1", "redis://h:6379/0#***"),
    ],
)
def test_the_redactor_removes_exactly_the_secrets(url: str, shown: str) -> None:
    assert redact_url(url) == shown
    assert "pw" not in scrub(f"AuthenticationError for {url}", url)
    if ":pw1@" in url:  # the bare password, as a client's message may repeat it
        assert scrub("invalid password pw1", url) == "invalid password ***"


def test_keygen_keys_are_random_and_short_keys_are_refused() -> None:
    def keygen() -> bytes:
        env = {**os.environ, "PYTHONPATH": str(PYTHON)}
        out = subprocess.run([sys.executable, "-m", "isocache", "keygen"], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return config.parse_key(out.stdout.strip())

    first, second = keygen(), keygen()
    assert len(first) >= 32 and len(second) >= 32 and first != second
    for short in ("0123456789abcdef", "a short phrase"):  # 8 bytes of hex, 14 of text
        with pytest.raises(ValueError, match="python -m isocache keygen"):
            config.parse_key(short)


def test_the_fingerprint_of_a_passphrase_is_stretched_not_a_fast_hash() -> None:
    key = PASSPHRASE.encode()
    fp = _core.key_fingerprint(key)
    fast = {
        hashlib.sha256(key).hexdigest()[:16],
        hashlib.blake2b(key).hexdigest()[:16],
        _core.blake3_hex(key)[:16],
        _core.key_fingerprint(key[:-1]),
    }
    assert fp not in fast and len(fp) == 16
    # Argon2id at fixed parameters (rust/key.rs pins its output against the argon2 crate): the same
    # on every machine, so a fleet shares Redis key prefixes.
    assert _core.key_fingerprint(b"0123456789abcdef") == "65b22e134c92148a"
    code = f"from isocache import _core; print(_core.key_fingerprint({key!r}))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(PYTHON)}
    )
    assert other.stdout.strip() == fp, other.stderr
    assert key_prefix(key, "ns") == f"isocache:v1:{fp}:ns"
