"""The Redis tier's compile leases: compile once across the fleet.

A Redis lease per digest (``SET NX PX``) whose value names its holder and the
compile seconds it expects. A heartbeat extends it while the holder compiles
and survives transient errors; it stops only when the lease is released or
lost. A lease without a TTL, with a TTL longer than a few lease periods, or of
the wrong Redis type, is stale and is taken over atomically. Waiting for
another machine is bounded: a multiple of the expected compile seconds when
known (with a floor), capped by the caller's timeout.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from typing import Callable

from .._once import warn_once
from .base import NO_LEASE, Lease, longest_compile
from .redis_connection import FAILED, RedisConnection

__all__ = ["RedisLeases", "RemoteLease"]

logger = logging.getLogger("isocache")

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


class RemoteLease:
    """A held Redis lease, kept alive by a heartbeat thread until released.

    The heartbeat keeps trying through errors (Redis paused, a connection
    killed, a timeout): it stops only when the lease is released or another
    machine has taken it over (`lost`).
    """

    def __init__(self, connection: RedisConnection, key: str, value: str, lease_ms: int) -> None:
        self._connection = connection
        self._key = key
        self._value = value
        self._lease_ms = lease_ms
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="isocache-lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def held(self) -> bool:
        return not (self.lost or self._stop.is_set())

    def _beat(self) -> None:
        interval = self._lease_ms / 3000.0
        wait = interval
        failures = 0
        while not self._stop.wait(wait):
            try:
                extended = self._connection.client().eval(_EXTEND, 1, self._key, self._value, self._lease_ms)
            except Exception as e:  # transient: try again soon, until released
                failures += 1
                if failures == 1:
                    logger.debug(
                        "isocache: could not extend Redis lease %s (%s); retrying",
                        self._key,
                        self._connection.scrub(f"{type(e).__name__}: {e}"),
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
            self._connection.client().eval(_RELEASE, 1, self._key, self._value)
        except Exception as e:
            logger.debug("isocache: could not release Redis lease %s (%s)", self._key, self._connection.scrub(str(e)))

    def __enter__(self) -> RemoteLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RedisLeases:
    """The leases under one key prefix: taking one, waiting for another machine's, bounding that wait.

    Args:
        lease_ms: lifetime of a lease between two heartbeats (one heartbeat every third).
        stale_periods: a lease whose TTL is longer than this many lease periods (or
            that has none) is stale and taken over.
        wait_multiple, wait_floor: waiting for another machine lasts
            ``max(wait_floor, wait_multiple * expected compile seconds)`` when those
            are known, capped by the caller's timeout.
    """

    def __init__(
        self,
        connection: RedisConnection,
        prefix: str,
        *,
        lease_ms: int,
        stale_periods: float,
        wait_multiple: float,
        wait_floor: float,
    ) -> None:
        self._connection = connection
        self._prefix = prefix
        self.lease_ms = int(lease_ms)
        self.stale_periods = stale_periods
        self.wait_multiple = wait_multiple
        self.wait_floor = wait_floor
        # The longest compile the tier has seen (a value it loaded or published):
        # what a piece of this model may take when nothing better is known.
        self._longest_compile = 0.0

    def key(self, digest: str) -> str:
        return f"{self._prefix}:lease:{digest}"

    def note(self, seconds: float) -> None:
        """Records a compile time the tier saw (for bounding waits on other machines)."""
        self._longest_compile = longest_compile(self._longest_compile, seconds)

    def bound(self, timeout: float, *expected: float | None) -> float:
        """How long to wait for a compile expected to take `expected` seconds (the largest known), capped by `timeout`."""
        known = max([s for s in (*expected, self._longest_compile) if s and s > 0], default=0.0)
        if known <= 0:
            return timeout
        return min(timeout, max(self.wait_floor, self.wait_multiple * known))

    def take(self, digest: str, expected_seconds: float | None) -> tuple[RemoteLease | bool | None, bytes | None]:
        """A lease, None when another machine holds it (and its value), False when Redis is unavailable.

        A stale lease (no TTL, a TTL beyond `stale_periods` lease periods, or a
        key of another type) is taken over. The lease's value records the
        compile seconds this process expects, so waiters can bound their wait.
        """
        key = self.key(digest)
        expected = expected_seconds if expected_seconds else self._longest_compile
        value = f"{secrets.token_hex(16)}:{expected:.3f}"
        stale_ms = int(self.stale_periods * self.lease_ms)
        connection = self._connection
        got = connection.call(lambda r: r.eval(_ACQUIRE, 1, key, value, self.lease_ms, stale_ms), digest)
        if got is FAILED:
            return (False if not connection.available else None), None
        state, other = int(got[0]), got[1]
        if state == 0:
            return None, other
        if state == 2:
            shown = other.decode(errors="replace") if isinstance(other, bytes) else str(other)
            warn_once(
                f"stale:{self._prefix}",
                "isocache: took over a stale Redis lease for piece %s (%s: no TTL or one far beyond a lease period); "
                "was its holder killed, or was it planted?",
                digest[:16],
                shown[:40] + ("..." if len(shown) > 40 else ""),
            )
        return RemoteLease(connection, key, value, self.lease_ms), None

    def wait(
        self,
        digest: str,
        timeout: float,
        expected_seconds: float | None,
        published: Callable[[], bool],
        poll: float = 0.2,
    ) -> Lease | None:
        """Waits for another machine's compile, bounded by `bound`: `NO_LEASE` once `published()`,
        the lease once it is free or stale, None when the wait ran out or Redis became unavailable."""
        start = time.monotonic()
        while True:
            if published():
                return NO_LEASE
            lease, holder = self.take(digest, expected_seconds)
            if lease is False:
                return None
            if isinstance(lease, RemoteLease):
                return lease
            bound = self.bound(timeout, _holder_seconds(holder), expected_seconds)
            left = bound - (time.monotonic() - start)
            if left <= 0:
                logger.debug(
                    "isocache: waited %.0f s for another machine to compile %s; compiling here", bound, digest[:16]
                )
                return None
            time.sleep(min(poll, left))


def _holder_seconds(value: bytes | None) -> float | None:
    """The compile seconds a lease holder expects (the part after its token), if it wrote any."""
    if not value:
        return None
    try:
        seconds = float(bytes(value).rsplit(b":", 1)[1])
    except (IndexError, ValueError):
        return None
    return seconds if 0 < seconds < float("inf") else None
