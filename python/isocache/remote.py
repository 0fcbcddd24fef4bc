"""The Redis tier: share compiled pieces across a fleet of machines.

    memory -> local store -> Redis -> compile

Values are whole artifact images (header + payload, see `rust/store.rs`), so a
remote hit is checked exactly like a local file (length, BLAKE3 checksum, and
the keyed signature when ``ISOCACHE_KEY`` is set) before it is used. Keys are
namespaced like the local store: ``isocache:v1:<namespace>:<digest>``.

Compile once across the fleet: a Redis lease per digest (``SET NX PX``) that a
heartbeat extends while the holder compiles; others wait, bounded, and load,
or take over once the holder stops renewing it.

Redis being down, slow or full never fails a compile: every call has a short
timeout, the first failure logs one warning and the tier is skipped for a
while (``retry_after`` seconds) before it is tried again.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from typing import Any, Callable

from . import _core

__all__ = ["RedisTier", "RemoteLease", "redis_tier"]

logger = logging.getLogger("isocache")

# Extend / delete the lease only if we still own it (compare-and-set in one step).
_EXTEND = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


class RemoteLease:
    """A held Redis lease, kept alive by a heartbeat thread until released."""

    def __init__(self, tier: RedisTier, key: str, token: str) -> None:
        self._tier = tier
        self._key = key
        self._token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="isocache-lease-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        interval = self._tier.lease_ms / 3000.0
        while not self._stop.wait(interval):
            if self._tier._call(lambda r: r.eval(_EXTEND, 1, self._key, self._token, self._tier.lease_ms)) is None:
                return

    def release(self) -> None:
        self._stop.set()
        self._tier._call(lambda r: r.eval(_RELEASE, 1, self._key, self._token))

    def __enter__(self) -> RemoteLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisTier:
    """One Redis server, one namespace."""

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        key: bytes | None = None,
        ttl: int | None = None,
        timeout: float = 2.0,
        retry_after: float = 30.0,
        lease_ms: int = 30_000,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.key = key
        self.ttl = ttl
        self.timeout = timeout
        self.retry_after = retry_after
        self.lease_ms = lease_ms
        self._client: Any = None
        self._down_until = 0.0
        self._warned = False
        self._lock = threading.Lock()
        self.hits = self.misses = self.errors = 0

    def __repr__(self) -> str:
        return f"RedisTier({_redact(self.url)!r}, namespace={self.namespace!r})"

    # -- plumbing -------------------------------------------------------------
    def _redis(self) -> Any:
        if self._client is None:
            import redis

            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                retry_on_timeout=False,
            )
        return self._client

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, op: Callable[[Any], Any]) -> Any:
        """Runs `op(client)`; on any failure warns once, backs off, returns None."""
        if not self.available:
            return None
        try:
            result = op(self._redis())
        except ImportError:
            self._fail("the redis package is not installed (pip install 'isocache[redis]')", forever=True)
            return None
        except Exception as e:  # noqa: BLE001 - a remote tier never fails a compile
            self._fail(f"{type(e).__name__}: {e}")
            return None
        with self._lock:
            if self._warned:
                self._warned = False
                logger.info("isocache: Redis at %s is reachable again", _redact(self.url))
        return result

    def _fail(self, reason: str, forever: bool = False) -> None:
        with self._lock:
            self.errors += 1
            self._down_until = float("inf") if forever else time.monotonic() + self.retry_after
            first = not self._warned
            self._warned = True
        if first:
            logger.warning(
                "isocache: Redis at %s is unavailable (%s); using the local store only%s",
                _redact(self.url),
                reason,
                "" if forever else f", retrying in {self.retry_after:.0f} s",
            )

    def _artifact_key(self, digest: str) -> str:
        return f"isocache:v1:{self.namespace}:{digest}"

    def _lease_key(self, digest: str) -> str:
        return f"isocache:v1:{self.namespace}:lease:{digest}"

    # -- artifacts ------------------------------------------------------------
    def fetch(self, digest: str) -> tuple[bytes, float] | None:
        """A checked `(payload, compile_seconds)`, or None (miss, bad value, or Redis down)."""
        image = self._call(lambda r: r.get(self._artifact_key(digest)))
        if image is None:
            if self.available:
                self.misses += 1
            return None
        try:
            payload, seconds = _core.unpack_artifact(digest, bytes(image), self.key)
        except _core.CacheError as e:
            self.errors += 1
            logger.warning("isocache: rejecting remote artifact %s from Redis: %s", digest[:16], e)
            self._call(lambda r: r.delete(self._artifact_key(digest)))
            return None
        self.hits += 1
        return payload, seconds

    def exists(self, digest: str) -> bool:
        return bool(self._call(lambda r: r.exists(self._artifact_key(digest))))

    def publish(self, digest: str, payload: bytes, compile_seconds: float) -> bool:
        image = _core.pack_artifact(digest, payload, compile_seconds, self.key)
        ok = self._call(lambda r: r.set(self._artifact_key(digest), image, ex=self.ttl))
        return bool(ok)

    # -- leases ---------------------------------------------------------------
    def try_lease(self, digest: str) -> RemoteLease | None | bool:
        """A lease, None when another machine holds it, False when Redis is unavailable."""
        token = secrets.token_hex(16)
        key = self._lease_key(digest)
        got = self._call(lambda r: r.set(key, token, nx=True, px=self.lease_ms))
        if got is None and not self.available:
            return False
        return RemoteLease(self, key, token) if got else None

    def wait_for(self, digest: str, timeout: float, poll: float = 0.2) -> tuple[bytes, float] | RemoteLease | None:
        """Waits for another machine's compile: its artifact, or the lease once it is free.

        None when the wait ran out or Redis became unavailable.
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.exists(digest):
                return self.fetch(digest)
            lease = self.try_lease(digest)
            if lease is False:
                return None
            if lease is not None:
                assert isinstance(lease, RemoteLease)
                return lease
            time.sleep(poll)
        return None


_tiers: dict[tuple[str, str], RedisTier] = {}
_tiers_lock = threading.Lock()


def redis_tier(url: str | None, namespace: str, key: bytes | None) -> RedisTier | None:
    """The process's tier for (`url`, `namespace`), or None without a URL."""
    url = url or os.environ.get("ISOCACHE_REDIS_URL") or None
    if not url:
        return None
    with _tiers_lock:
        tier = _tiers.get((url, namespace))
        if tier is None:
            ttl_text = os.environ.get("ISOCACHE_REDIS_TTL", "").strip()
            tier = RedisTier(url, namespace, key=key, ttl=int(ttl_text) if ttl_text else None)
            _tiers[(url, namespace)] = tier
        return tier


def _redact(url: str) -> str:
    """The URL without its password."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.split('@', 1)[1]}"
