"""The Redis tier: share compiled pieces across a fleet of machines.

    memory -> local store -> Redis -> compile

Trust: loading an artifact runs its code, and anyone who can write to Redis can
write any value. So the tier is on only with ``ISOCACHE_KEY`` (every value is
signed with keyed BLAKE3 and checked before use), or when the user opts in to
unsigned sharing with ``ISOCACHE_REDIS_INSECURE=1`` (warned in every process).
Without either, `RedisTier.configured` returns None with one warning and
isocache never talks to Redis.

Keys carry a fingerprint of the signing key, ``isocache:v1:<fingerprint>:<namespace>:<digest>``
(``unsigned`` in place of the fingerprint in insecure mode), so machines with
different keys never see, trust or delete each other's values: rotating a key
is safe. Values are never deleted. A value that fails the check is a miss
with one warning, and once this process has compiled the piece it replaces
that value, and only that one (a compare-and-set in Lua: a keyed writer
repairs a forged value instead of leaving it to poison the digest); a valid
value is never overwritten. Without a key (insecure mode) nothing is replaced:
a process that cannot vouch for its own values has no ground to prefer them.

Every reply is untrusted input (`redis_connection.py`, `redis_guard.py`): a
reply of the wrong type is a miss, each call has one deadline for the whole
call, and a value larger than ``max_value`` bytes is refused by the server-side
script from its length, and by the client from the reply's header, never read.

Compile once across the fleet: a Redis lease per digest with a heartbeat, its
wait for another machine bounded by the compile seconds this tier has seen
(`redis_lease.py`). Redis being down, slow or full never fails a compile: a
circuit breaker keeps it off for a while (`redis_connection.py`).

`RedisTier` is a tier of the chain (`tiers/base.py`): ``get``/``contains``/
``put``/``lease``/``discard``, with its own counters (`stats`), which also
feed the process counters ``remote_hits``/``remote_misses``/``remote_errors``.
"""

from __future__ import annotations

import hashlib
import threading

from .. import _core, config
from .._once import warn_once
from .._redact import redact_url
from .base import NO_LEASE, Hit, Lease, TierStats
from .redis_connection import FAILED, RedisConnection
from .redis_lease import RedisLeases

__all__ = ["UNSIGNED", "RedisTier", "key_prefix"]

#: Stands in for the key fingerprint in the key prefix when values are not signed.
UNSIGNED = "unsigned"

# The value, or its length when it is longer than ARGV[1] bytes (never sent whole).
_GET = """
local n = redis.call('strlen', KEYS[1])
if n > tonumber(ARGV[1]) then return n end
return redis.call('get', KEYS[1])
"""
# Publish ARGV[1] unless the key holds a value that may be good: replace only nothing, a key
# of another type, a value longer than ARGV[3] bytes, or the value whose SHA-1 is ARGV[2]
# (the one this writer rejected). ARGV[4]: the TTL in seconds, or 0. 1 when written.
_PUT = """
local kind = redis.call('type', KEYS[1])['ok']
if kind == 'string' and redis.call('strlen', KEYS[1]) <= tonumber(ARGV[3]) then
  if ARGV[2] == '' or redis.sha1hex(redis.call('get', KEYS[1])) ~= ARGV[2] then return 0 end
end
if tonumber(ARGV[4]) > 0 then redis.call('set', KEYS[1], ARGV[1], 'EX', ARGV[4])
else redis.call('set', KEYS[1], ARGV[1]) end
return 1
"""


def key_prefix(key: bytes | None, namespace: str) -> str:
    """``isocache:v1:<fingerprint of key, or "unsigned">:<namespace>``."""
    return f"isocache:v1:{UNSIGNED if key is None else _core.key_fingerprint(key)}:{namespace}"


class RedisTier:
    """One Redis server, one namespace, one signing key: the tier after the local store.

    Args:
        key: the signing key (at least 16 bytes). None only with ``insecure=True``.
        insecure: share unsigned values (anyone who can write to Redis runs code here).
        ttl: seconds before a published value expires (None: never).
        timeout: socket timeout of every read and of connecting.
        deadline: the most seconds one call may take, its whole reply included.
        max_value: the largest value read or published, in bytes (``ISOCACHE_REDIS_MAX_VALUE``).
        retry_after: seconds the tier stays off after Redis was unreachable.
        lease_ms, stale_periods, wait_multiple, wait_floor: the leases' lifetime,
            when one is stale, and how long to wait for another machine (`RedisLeases`).
    """

    name = "redis"
    holder = "another machine"
    network = True

    def __init__(
        self,
        url: str,
        namespace: str,
        *,
        key: bytes | None = None,
        insecure: bool = False,
        ttl: int | None = None,
        timeout: float = 2.0,
        deadline: float = 10.0,
        max_value: int = config.DEFAULT_REDIS_MAX_VALUE,
        retry_after: float = 30.0,
        lease_ms: int = 30_000,
        stale_periods: float = 4.0,
        wait_multiple: float = 4.0,
        wait_floor: float = 30.0,
    ) -> None:
        if key is None and not insecure:
            raise _core.CacheError(
                "the Redis tier needs a signing key (ISOCACHE_KEY), or insecure=True to share unsigned artifacts"
            )
        if key is not None and len(key) < config.MIN_KEY_BYTES:
            raise _core.CacheError(f"the signing key must have at least {config.MIN_KEY_BYTES} bytes")
        self.url = url
        self.namespace = namespace
        self.key = key
        self.ttl = None if ttl is None or ttl <= 0 else int(config.clamp("ttl", ttl, 1, config.MAX_REDIS_TTL, 1))
        self.prefix = key_prefix(key, namespace)
        self.stats = TierStats(
            self.name, process={"hits": "remote_hits", "misses": "remote_misses", "errors": "remote_errors"}
        )
        self.max_value = max_value
        limits = {"timeout": timeout, "deadline": deadline, "retry_after": retry_after}
        self._connection = RedisConnection(url, stats=self.stats, prefix=self.prefix, max_reply=max_value, **limits)
        waits = {"stale_periods": stale_periods, "wait_multiple": wait_multiple, "wait_floor": wait_floor}
        self._leases = RedisLeases(self._connection, self.prefix, key=key, lease_ms=lease_ms, **waits)
        self._lock = threading.Lock()
        #: Digests whose value this process rejected, with the SHA-1 of that value ("" when it was
        #: not read: another type, too large, an odd reply); a keyed put replaces only that value.
        self._rejected: dict[str, str] = {}

    @classmethod
    def configured(cls, url: str | None, namespace: str, key: bytes | None) -> RedisTier | None:
        """A tier for (`url`, `namespace`, `key`) with the configured TTL, or None when there is none.

        None without a URL (argument or ``ISOCACHE_REDIS_URL``), and None without a
        usable key unless ``ISOCACHE_REDIS_INSECURE=1``: then isocache never talks
        to Redis, and says once how to make a key.
        """
        cfg = config.current()
        url = url or cfg.redis_url
        if not url:
            return None
        if key is not None and len(key) < config.MIN_KEY_BYTES:
            key = None  # never sign with a guessable key
        insecure = key is None and cfg.redis_insecure
        if key is None:
            _warn_unsigned(url, insecure, getattr(cfg, "key_problem", None))
            if not insecure:
                return None
        return cls(url, namespace, key=key, insecure=insecure, ttl=cfg.redis_ttl, max_value=cfg.redis_max_value)

    def __repr__(self) -> str:
        return f"RedisTier({redact_url(self.url)!r}, namespace={self.namespace!r}, prefix={self.prefix!r})"

    def _artifact_key(self, digest: str) -> str:
        return f"{self.prefix}:{digest}"

    # -- the tier protocol (tiers/base.py) --------------------------------------------
    def get(self, digest: str) -> Hit[bytes] | None:
        """A checked value, or None (miss, bad value, or Redis down).

        A value that fails the check is a miss with one warning; a keyed `put` of
        the digest replaces it. A value longer than `max_value` is never read.
        """
        key = self._artifact_key(digest)
        expect = (bytes, int, type(None))
        image = self._connection.call(lambda r: r.eval(_GET, 1, key, self.max_value), digest, expect)
        if image is FAILED:
            if self._connection.available:  # Redis answered: the key holds something else
                self._reject(digest, "")
            return None
        if image is None:
            self.stats.count(misses=1)
            return None
        if not isinstance(image, bytes):  # its length: too large (or an odd reply)
            self._reject(digest, "")
            too_large = image > self.max_value
            what = f"its length, {image} bytes, over ISOCACHE_REDIS_MAX_VALUE" if too_large else "an integer"
            self._connection.odd_reply(digest, what)
            return None
        try:
            payload, seconds = _core.unpack_artifact(digest, image, self.key)
        except _core.CacheError as e:
            self.stats.count(errors=1)
            self._reject(digest, hashlib.sha1(image, usedforsecurity=False).hexdigest())
            warn_once(
                f"reject:{self.prefix}:{digest}",
                "isocache: rejecting remote artifact %s from Redis: %s; compiling it here",
                digest[:16],
                e,
            )
            return None
        self.stats.count(hits=1)
        self._leases.note(seconds)
        return Hit(payload, seconds, self.name)

    def contains(self, digest: str) -> bool:
        """Whether Redis has a value for `digest` that this process has not already rejected."""
        with self._lock:
            if digest in self._rejected:
                return False
        return self._exists(digest)

    def put(self, digest: str, value: bytes, compile_seconds: float) -> bool:
        """Publishes a value unless the digest has one that may be good: True when written.

        With a key, a value this process rejected (and a key of another type, or a
        value larger than `max_value`) is replaced; without one, only a free key is written.
        """
        self._leases.note(compile_seconds)
        try:
            image = _core.pack_artifact(digest, value, compile_seconds, self.key)
        except _core.CacheError as e:
            warn_once(f"pack:{self.prefix}", "isocache: cannot publish to Redis: %s", e)
            return False
        if len(image) > self.max_value:
            return False  # no other machine would read it
        key = self._artifact_key(digest)
        if self.key is None:
            ok = self._connection.call(lambda r: r.set(key, image, ex=self.ttl, nx=True), digest, (bool, type(None)))
        else:
            with self._lock:
                bad = self._rejected.get(digest, "")
            args = (image, bad, self.max_value, self.ttl or 0)
            ok = self._connection.call(lambda r: r.eval(_PUT, 1, key, *args), digest, (int,))
        written = ok is not FAILED and ok == 1  # True from SET NX, 1 from the script
        if written:
            self.stats.count(puts=1)
            with self._lock:
                self._rejected.pop(digest, None)
        return written

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        """The Redis lease on `digest`; None when another machine held it past the (bounded) wait.

        ``timeout=0`` only tries. When the holder publishes during the wait there
        is nothing to hold: `NO_LEASE`, and the caller looks again. Redis being
        unavailable is `NO_LEASE` too when only trying (compile without a lease).
        The lease's value records `expected_seconds` (else the longest compile
        this tier has seen), so other machines can bound their wait.
        """
        if timeout <= 0:
            got, _ = self._leases.take(digest, expected_seconds)
            return NO_LEASE if isinstance(got, bool) else got
        return self._leases.wait(digest, timeout, expected_seconds, lambda: self._exists(digest))

    def discard(self, digest: str) -> None:
        """Nothing: a value is never deleted from Redis (it may be another machine's; it is a miss here)."""

    # -- helpers ------------------------------------------------------------------------
    def _exists(self, digest: str) -> bool:
        found = self._connection.call(lambda r: r.exists(self._artifact_key(digest)), digest, (int,))
        return found is not FAILED and found > 0

    def _reject(self, digest: str, sha1: str) -> None:
        with self._lock:
            if len(self._rejected) < 65536:
                self._rejected[digest] = sha1


def _warn_unsigned(url: str, insecure: bool, problem: str | None) -> None:
    """Says once that the tier is off for want of a key (how to make one), or that it runs unsigned."""
    if not insecure:
        warn_once(
            "redis:nokey",
            "isocache: the Redis tier at %s is off: %s. Values in Redis are code that every machine runs, "
            "so isocache shares them only when signed. Make a key with `python -m isocache keygen` and "
            "`export ISOCACHE_KEY=<that key>` on every machine of the fleet (or set ISOCACHE_REDIS_INSECURE=1 "
            "to share unsigned artifacts: anyone who can write to Redis can then run code on every machine)",
            redact_url(url),
            problem or "ISOCACHE_KEY is not set",
        )
        return
    warn_once(
        "redis:insecure",
        "isocache: ISOCACHE_REDIS_INSECURE=1: sharing unsigned artifacts through Redis at %s; anyone who "
        "can write to it can run code in this process. Set ISOCACHE_KEY (from `python -m isocache keygen`) "
        "instead",
        redact_url(url),
    )
