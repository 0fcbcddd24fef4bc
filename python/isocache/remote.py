"""The Redis tier: share compiled pieces across a fleet of machines.

    memory -> local store -> Redis -> compile

Trust: loading an artifact runs its code, and anyone who can write to Redis can
write any value. So the tier is on only with ``ISOCACHE_KEY`` (every value is
signed with keyed BLAKE3 and checked before use), or when the user opts in to
unsigned sharing with ``ISOCACHE_REDIS_INSECURE=1`` (warned in every process).
Without either, `redis_tier` returns None with one warning and isocache never
talks to Redis.

Keys carry a fingerprint of the signing key, ``isocache:v1:<fingerprint>:<namespace>:<digest>``
(``unsigned`` in place of the fingerprint in insecure mode), so machines with
different keys never see, trust or delete each other's values: rotating a key
is safe. Values are published with ``SET NX`` (never overwritten) and never
deleted: a value that fails the check is a miss with one warning.

Compile once across the fleet: a Redis lease per digest (``SET NX PX``) whose
value names its holder and the compile seconds it expects. A heartbeat extends
it while the holder compiles and survives transient errors; it stops only when
the lease is released or lost. A lease without a TTL, with a TTL longer than a
few lease periods, or of the wrong Redis type, is stale and is taken over
atomically. Waiting for another machine is bounded: a multiple of the expected
compile seconds when known (with a floor), capped by the caller's timeout.

Redis being down, slow or full never fails a compile: every call has a short
timeout, the first failure logs one warning and the tier is skipped for a
while (``retry_after`` seconds) before it is tried again. A key of the wrong
Redis type is a miss for that digest only; the tier stays on.

URLs are redacted before they reach a log line or a message: user info and
``password``/``username`` query parameters are replaced by ``***``.

`RedisTier` is a tier of the chain (`tiers/base.py`): ``get``/``contains``/
``put``/``lease``/``discard``, with its own counters (`stats`), which also
feed the process counters ``remote_hits``/``remote_misses``/``remote_errors``.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Any, Callable

from . import _core, config
from ._once import warn_once as _warn_once
from ._redact import redact_url, scrub
from .tiers.base import NO_LEASE, Hit, Lease, TierStats

__all__ = ["RedisTier", "RemoteLease", "key_prefix", "redact_url", "redis_tier"]

logger = logging.getLogger("isocache")

#: Stands in for the key fingerprint in the key prefix when values are not signed.
UNSIGNED = "unsigned"

# Take the lease: free -> ours (1); stale (no TTL, TTL beyond ARGV[3] ms, or not a
# string) -> ours (2, and what was there); held -> not ours (0, and the holder's value).
_ACQUIRE = """
if redis.call('set', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, ''} end
local kind = redis.call('type', KEYS[1])['ok']
if kind ~= 'string' then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, 'a ' .. kind}
end
local ttl = redis.call('pttl', KEYS[1])
local held = redis.call('get', KEYS[1])
if ttl < 0 or ttl > tonumber(ARGV[3]) then
  redis.call('set', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return {2, held}
end
return {0, held}
"""
# Extend / delete the lease only if we still own it (compare-and-set in one step).
_OWNED = "redis.call('type', KEYS[1])['ok'] == 'string' and redis.call('get', KEYS[1]) == ARGV[1]"
_EXTEND = f"if {_OWNED} then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
_RELEASE = f"if {_OWNED} then return redis.call('del', KEYS[1]) else return 0 end"

# A call that failed (Redis down, or the server refused the command); distinct from a nil reply.
_FAILED: Any = object()
# A wait ended because the value was published.
_PUBLISHED: Any = object()


# The longest compile this process has seen (compiled here or recorded in a loaded
# artifact): what a piece of this model may take when nothing better is known.
_longest_compile = 0.0


def note_compile_seconds(seconds: float) -> None:
    """Records a compile time of this process (for bounding waits on other machines)."""
    global _longest_compile
    if seconds == seconds and 0 < seconds < float("inf") and seconds > _longest_compile:
        _longest_compile = float(seconds)


def key_prefix(key: bytes | None, namespace: str) -> str:
    """``isocache:v1:<fingerprint of key, or "unsigned">:<namespace>``."""
    return f"isocache:v1:{UNSIGNED if key is None else _core.key_fingerprint(key)}:{namespace}"


class RemoteLease:
    """A held Redis lease, kept alive by a heartbeat thread until released.

    The heartbeat keeps trying through errors (Redis paused, a connection
    killed, a timeout): it stops only when the lease is released or another
    machine has taken it over (`lost`).
    """

    def __init__(self, tier: RedisTier, key: str, value: str) -> None:
        self._tier = tier
        self._key = key
        self._value = value
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="isocache-lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        return not (self.lost or self._stop.is_set())

    def _beat(self) -> None:
        tier = self._tier
        interval = tier.lease_ms / 3000.0
        wait = interval
        failures = 0
        while not self._stop.wait(wait):
            try:
                extended = tier._redis().eval(_EXTEND, 1, self._key, self._value, tier.lease_ms)
            except Exception as e:  # transient: try again soon, until released
                failures += 1
                if failures == 1:
                    logger.debug(
                        "isocache: could not extend Redis lease %s (%s); retrying",
                        self._key,
                        tier._scrub(f"{type(e).__name__}: {e}"),
                    )
                wait = max(0.05, interval / 4)
                continue
            failures = 0
            wait = interval
            if not extended:
                if not self._stop.is_set():
                    self.lost = True
                    logger.warning(
                        "isocache: lost the Redis lease %s (it expired or another machine took it over); "
                        "the piece may be compiled twice",
                        self._key,
                    )
                return

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self.lost:
            return
        try:  # directly, not through the circuit breaker: the lease expires anyway if this fails
            self._tier._redis().eval(_RELEASE, 1, self._key, self._value)
        except Exception as e:
            logger.debug("isocache: could not release Redis lease %s (%s)", self._key, self._tier._scrub(str(e)))

    def __enter__(self) -> RemoteLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisTier:
    """One Redis server, one namespace, one signing key: the tier after the local store.

    Args:
        key: the signing key (at least 16 bytes). None only with ``insecure=True``.
        insecure: share unsigned values (anyone who can write to Redis runs code here).
        ttl: seconds before a published value expires (None: never).
        timeout: socket timeout of every call.
        retry_after: seconds the tier stays off after Redis was unreachable.
        lease_ms: lifetime of a lease between two heartbeats (one heartbeat every third).
        stale_periods: a lease whose TTL is longer than this many lease periods (or
            that has none) is stale and taken over.
        wait_multiple, wait_floor: waiting for another machine lasts
            ``max(wait_floor, wait_multiple * expected compile seconds)`` when those
            are known, capped by the timeout given to `wait_for`.
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
        self.ttl = ttl if ttl is None or ttl > 0 else None
        self.timeout = timeout
        self.retry_after = retry_after
        self.lease_ms = int(lease_ms)
        self.stale_periods = stale_periods
        self.wait_multiple = wait_multiple
        self.wait_floor = wait_floor
        self.prefix = key_prefix(key, namespace)
        self._client: Any = None
        self._down_until = 0.0
        self._warned = False
        self._lock = threading.Lock()
        #: Digests whose value this process rejected (it stays in Redis; reading it again only costs).
        self._rejected: set[str] = set()
        self.stats = TierStats(
            self.name, process={"hits": "remote_hits", "misses": "remote_misses", "errors": "remote_errors"}
        )

    def __repr__(self) -> str:
        return f"RedisTier({redact_url(self.url)!r}, namespace={self.namespace!r}, prefix={self.prefix!r})"

    @property
    def hits(self) -> int:
        return self.stats.hits

    @property
    def misses(self) -> int:
        return self.stats.misses

    @property
    def errors(self) -> int:
        return self.stats.errors

    # -- plumbing -------------------------------------------------------------
    def _redis(self) -> Any:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One immediate reconnect (a killed connection); no retries on timeouts:
                # the circuit breaker and the heartbeat decide when to try again.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            )
        return self._client

    def _scrub(self, text: str) -> str:
        return scrub(text, self.url)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _call(self, op: Callable[[Any], Any], digest: str = "") -> Any:
        """Runs `op(client)`; `_FAILED` when Redis is off or the call failed (warned)."""
        if not self.available:
            return _FAILED
        try:
            result = op(self._redis())
        except ImportError:
            self._fail("the redis package is not installed (pip install 'isocache[redis]')", forever=True)
            return _FAILED
        except Exception as e:  # a remote tier never fails a compile
            if _is_wrong_type(e):
                # The server works; one key holds something else. A miss for this digest only.
                self.stats.count(errors=1)
                _warn_once(
                    f"wrongtype:{self.prefix}:{digest}",
                    "isocache: the Redis key of piece %s holds the wrong type of value; treating it as a miss",
                    digest[:16],
                )
                return _FAILED
            self._fail(self._scrub(f"{type(e).__name__}: {e}"))
            return _FAILED
        with self._lock:
            recovered = self._warned
            self._warned = False
        if recovered:
            logger.info("isocache: Redis at %s is reachable again", redact_url(self.url))
        return result

    def _fail(self, reason: str, forever: bool = False) -> None:
        self.stats.count(errors=1)
        with self._lock:
            self._down_until = float("inf") if forever else time.monotonic() + self.retry_after
            first = not self._warned
            self._warned = True
        if first:
            logger.warning(
                "isocache: Redis at %s is unavailable (%s); using the local store only%s",
                redact_url(self.url),
                reason,
                "" if forever else f", retrying in {self.retry_after:.0f} s",
            )

    def _artifact_key(self, digest: str) -> str:
        return f"{self.prefix}:{digest}"

    def _lease_key(self, digest: str) -> str:
        return f"{self.prefix}:lease:{digest}"

    # -- artifacts ------------------------------------------------------------
    def fetch(self, digest: str) -> tuple[bytes, float] | None:
        """A checked `(payload, compile_seconds)`, or None (miss, bad value, or Redis down).

        A value that fails the check stays where it is: it is a miss with one warning.
        """
        image = self._call(lambda r: r.get(self._artifact_key(digest)), digest)
        if image is _FAILED:
            if self.available:  # Redis answered: the key holds something else
                self._reject(digest)
            return None
        if image is None:
            self.stats.count(misses=1)
            return None
        try:
            payload, seconds = _core.unpack_artifact(digest, bytes(image), self.key)
        except _core.CacheError as e:
            self.stats.count(errors=1)
            self._reject(digest)
            _warn_once(
                f"reject:{self.prefix}:{digest}",
                "isocache: rejecting remote artifact %s from Redis: %s; compiling it here",
                digest[:16],
                e,
            )
            return None
        self.stats.count(hits=1)
        note_compile_seconds(seconds)
        return payload, seconds

    def _reject(self, digest: str) -> None:
        with self._lock:
            if len(self._rejected) < 65536:
                self._rejected.add(digest)

    def exists(self, digest: str) -> bool:
        found = self._call(lambda r: r.exists(self._artifact_key(digest)), digest)
        return found is not _FAILED and bool(found)

    def publish(self, digest: str, payload: bytes, compile_seconds: float) -> bool:
        """Publishes a value unless the digest already has one (``SET NX``): True when written."""
        note_compile_seconds(compile_seconds)
        try:
            image = _core.pack_artifact(digest, payload, compile_seconds, self.key)
        except _core.CacheError as e:
            _warn_once(f"pack:{self.prefix}", "isocache: cannot publish to Redis: %s", e)
            return False
        ok = self._call(lambda r: r.set(self._artifact_key(digest), image, ex=self.ttl, nx=True), digest)
        return ok is True

    # -- leases ---------------------------------------------------------------
    def try_lease(self, digest: str, *, expected_seconds: float | None = None) -> RemoteLease | bool | None:
        """A lease, None when another machine holds it, False when Redis is unavailable.

        A stale lease (no TTL, a TTL beyond `stale_periods` lease periods, or a
        key of another type) is taken over. The lease's value records the
        compile seconds this process expects, so waiters can bound their wait.
        """
        lease, _ = self._acquire(digest, expected_seconds)
        return lease

    def _acquire(self, digest: str, expected_seconds: float | None) -> tuple[RemoteLease | bool | None, bytes | None]:
        key = self._lease_key(digest)
        expected = expected_seconds if expected_seconds else _longest_compile
        value = f"{secrets.token_hex(16)}:{expected:.3f}"
        stale_ms = int(self.stale_periods * self.lease_ms)
        got = self._call(lambda r: r.eval(_ACQUIRE, 1, key, value, self.lease_ms, stale_ms), digest)
        if got is _FAILED:
            return (False if not self.available else None), None
        state, other = int(got[0]), got[1]
        if state == 0:
            return None, other
        if state == 2:
            shown = other.decode(errors="replace") if isinstance(other, bytes) else str(other)
            _warn_once(
                f"stale:{self.prefix}",
                "isocache: took over a stale Redis lease for piece %s (%s: no TTL or one far beyond a lease period); "
                "was its holder killed, or was it planted?",
                digest[:16],
                shown[:40] + ("..." if len(shown) > 40 else ""),
            )
        return RemoteLease(self, key, value), None

    def wait_bound(self, timeout: float, *expected: float | None) -> float:
        """How long to wait for a compile expected to take `expected` seconds (the largest known), capped by `timeout`."""
        known = max([s for s in (*expected, _longest_compile) if s and s > 0], default=0.0)
        if known <= 0:
            return timeout
        return min(timeout, max(self.wait_floor, self.wait_multiple * known))

    def wait_for(
        self,
        digest: str,
        timeout: float | None = None,
        poll: float = 0.2,
        *,
        expected_seconds: float | None = None,
    ) -> tuple[bytes, float] | RemoteLease | None:
        """Waits for another machine's compile: its artifact, or the lease once it is free or stale.

        The wait is bounded by `wait_bound`: a multiple of the compile seconds
        the holder wrote into its lease (or `expected_seconds`, or the longest
        compile of this process), with a floor, capped by `timeout` (default
        ``ISOCACHE_WAIT_TIMEOUT``). None when the wait ran out, the value was
        bad, or Redis became unavailable.
        """
        got = self._wait(digest, timeout, poll, expected_seconds)
        if got is _PUBLISHED:
            return self.fetch(digest)
        assert got is None or isinstance(got, RemoteLease)
        return got

    def _wait(self, digest: str, timeout: float | None, poll: float, expected_seconds: float | None) -> Any:
        """`_PUBLISHED`, a lease (free or taken over), or None (ran out, or Redis became unavailable)."""
        cap = config.current().wait_timeout if timeout is None else timeout
        start = time.monotonic()
        while True:
            if self.exists(digest):
                return _PUBLISHED
            lease, holder = self._acquire(digest, expected_seconds)
            if lease is False:
                return None
            if lease is not None:
                assert isinstance(lease, RemoteLease)
                return lease
            bound = self.wait_bound(cap, _holder_seconds(holder), expected_seconds)
            left = bound - (time.monotonic() - start)
            if left <= 0:
                logger.debug(
                    "isocache: waited %.0f s for another machine to compile %s; compiling here", bound, digest[:16]
                )
                return None
            time.sleep(min(poll, left))

    # -- the tier protocol (tiers/base.py) --------------------------------------------
    def get(self, digest: str) -> Hit[bytes] | None:
        """`fetch` as a tier: a checked value, or None (miss, bad value, or Redis down)."""
        found = self.fetch(digest)
        return None if found is None else Hit(found[0], found[1], self.name)

    def contains(self, digest: str) -> bool:
        """Whether Redis has a value for `digest` that this process has not already rejected."""
        with self._lock:
            if digest in self._rejected:
                return False
        return self.exists(digest)

    def put(self, digest: str, value: bytes, compile_seconds: float) -> bool:
        """`publish` as a tier: True when written (never overwrites)."""
        written = self.publish(digest, value, compile_seconds)
        if written:
            self.stats.count(puts=1)
        return written

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        """The Redis lease on `digest`; None when another machine held it past the (bounded) wait.

        ``timeout=0`` only tries. When the holder publishes during the wait there
        is nothing to hold: `NO_LEASE`, and the caller looks again. Redis being
        unavailable is `NO_LEASE` too when only trying (compile without a lease).
        """
        if timeout <= 0:
            got = self.try_lease(digest, expected_seconds=expected_seconds)
            if got is False or got is True:
                return NO_LEASE
            return got
        waited = self._wait(digest, timeout, 0.2, expected_seconds)
        if waited is _PUBLISHED:
            return NO_LEASE
        lease: RemoteLease | None = waited
        return lease

    def discard(self, digest: str) -> None:
        """Nothing: a value is never deleted from Redis (it may be another machine's; it is a miss here)."""


def _holder_seconds(value: bytes | None) -> float | None:
    """The compile seconds a lease holder expects (the part after its token), if it wrote any."""
    if not value:
        return None
    try:
        seconds = float(bytes(value).rsplit(b":", 1)[1])
    except (IndexError, ValueError):
        return None
    return seconds if 0 < seconds < float("inf") else None


def _is_wrong_type(e: Exception) -> bool:
    try:
        from redis.exceptions import ResponseError
    except ImportError:
        return False
    return isinstance(e, ResponseError) and str(e).startswith("WRONGTYPE")


_tiers: dict[tuple[str, str, str], RedisTier] = {}
_tiers_lock = threading.Lock()


def redis_tier(url: str | None, namespace: str, key: bytes | None) -> RedisTier | None:
    """The process's tier for (`url`, `namespace`, `key`), or None when there is none.

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
    if key is None and not insecure:
        problem = getattr(cfg, "key_problem", None)
        _warn_once(
            "redis:nokey",
            "isocache: the Redis tier at %s is off: %s. Values in Redis are code that every machine runs, "
            "so isocache shares them only when signed. Make a key with `python -m isocache keygen` and "
            "`export ISOCACHE_KEY=<that key>` on every machine of the fleet (or set ISOCACHE_REDIS_INSECURE=1 "
            "to share unsigned artifacts: anyone who can write to Redis can then run code on every machine)",
            redact_url(url),
            problem or "ISOCACHE_KEY is not set",
        )
        return None
    if insecure:
        _warn_once(
            "redis:insecure",
            "isocache: ISOCACHE_REDIS_INSECURE=1: sharing unsigned artifacts through Redis at %s; anyone who can "
            "write to it can run code in this process. Set ISOCACHE_KEY (from `python -m isocache keygen`) instead",
            redact_url(url),
        )
    fingerprint = UNSIGNED if key is None else _core.key_fingerprint(key)
    with _tiers_lock:
        tier = _tiers.get((url, namespace, fingerprint))
        if tier is None:
            tier = RedisTier(url, namespace, key=key, insecure=insecure, ttl=cfg.redis_ttl)
            _tiers[(url, namespace, fingerprint)] = tier
        return tier


_redact = redact_url  # the name older tests use
