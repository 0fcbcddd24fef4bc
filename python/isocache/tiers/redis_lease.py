"""The Redis tier's compile leases: compile once across the fleet.

A Redis lease per digest (``SET NX PX``) whose value names its holder and the
compile seconds it expects, signed (HMAC-SHA256 with the signing key) when
there is a key. A heartbeat extends it while the holder compiles and survives
transient errors; it stops only when the lease is released or lost. A lease
without a TTL, with a TTL longer than a few lease periods, or of the wrong
Redis type, is stale and is taken over atomically; with a key, so is a lease
whose value is not signed with it (planted by someone without the key: it has
no holder in the fleet). Waiting for another machine is bounded by the
compile seconds known for the piece (what this process measured or loaded,
and a signed holder's expectation; never an unsigned claim), times a
multiple, with a floor (the floor alone when nothing is known), capped by the
caller's timeout: then the piece is compiled here.
"""

from __future__ import annotations

import hashlib
import hmac
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
# Replace a lease not signed with our key, if it still holds the value that failed the check.
_TAKEOVER = f"if {_OWNED} then return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) else return 0 end"


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
                extended = self._connection.run(lambda r: r.eval(_EXTEND, 1, self._key, self._value, self._lease_ms))
                if not isinstance(extended, int):
                    raise TypeError(f"a reply of type {type(extended).__name__}")
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
            self._connection.run(lambda r: r.eval(_RELEASE, 1, self._key, self._value))
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
            ``max(wait_floor, wait_multiple * expected compile seconds)``, capped by
            the caller's timeout (`bound`).
        key: the signing key: lease values are signed, and unsigned ones taken over.
    """

    def __init__(
        self,
        connection: RedisConnection,
        prefix: str,
        *,
        key: bytes | None = None,
        lease_ms: int,
        stale_periods: float,
        wait_multiple: float,
        wait_floor: float,
    ) -> None:
        self._connection = connection
        self._prefix = prefix
        self._key = key
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
        """How long to wait for a compile expected to take `expected` seconds (the largest known), capped
        by `timeout`: the floor when nothing is known (a planted lease costs no more than that)."""
        known = max([s for s in (*expected, self._longest_compile) if s and 0 < s < float("inf")], default=0.0)
        return min(timeout, max(self.wait_floor, self.wait_multiple * known))

    def _value(self, digest: str, token: str, expected: float) -> str:
        """A lease value: ``token:expected``, and its signature when there is a key."""
        value = f"{token}:{expected:.3f}"
        if self._key is None:
            return value
        mac = hmac.new(self._key, f"{self.key(digest)}|{value}".encode(), hashlib.sha256).hexdigest()[:32]
        return f"{value}:{mac}"

    def holder_seconds(self, digest: str, value: object) -> float | None:
        """The compile seconds a holder expects, from its lease value: None unless signed with our key
        (without a key, nothing a lease says is trusted: the wait is bounded by what this process knows)."""
        if self._key is None or not isinstance(value, bytes):
            return None
        text = value.decode(errors="replace")
        parts = text.split(":")
        if len(parts) != 3 or not hmac.compare_digest(
            self._value(digest, parts[0], _seconds(parts[1])).encode(), value
        ):
            return None
        return _seconds(parts[1])

    def _planted(self, digest: str, value: object) -> bool:
        """With a key: whether a held lease's value is not signed with it (no holder of the fleet)."""
        return self._key is not None and self.holder_seconds(digest, value) is None

    def take(self, digest: str, expected_seconds: float | None) -> tuple[RemoteLease | bool | None, bytes | None]:
        """A lease, None when another machine holds it (and its value), False when Redis is unavailable
        (or answered oddly). With a key, a lease whose value is not signed with it is taken over.

        A stale lease (no TTL, a TTL beyond `stale_periods` lease periods, or a
        key of another type) is taken over. The lease's value records the
        compile seconds this process expects, so waiters can bound their wait.
        """
        key = self.key(digest)
        expected = expected_seconds if expected_seconds else self._longest_compile
        value = self._value(digest, secrets.token_hex(16), expected)
        stale_ms = int(self.stale_periods * self.lease_ms)
        connection = self._connection
        got = connection.call(lambda r: r.eval(_ACQUIRE, 1, key, value, self.lease_ms, stale_ms), digest, (list,))
        if got is not FAILED and (len(got) != 2 or got[0] not in (0, 1, 2) or not isinstance(got[0], int)):
            got = connection.odd_reply(digest, f"a lease reply {str(got)[:40]}")
        if got is FAILED:  # unavailable, or an odd reply: no lease to wait for
            return False, None
        state, other = got[0], got[1]
        if state == 0 and self._planted(digest, other):
            took = connection.call(lambda r: r.eval(_TAKEOVER, 1, key, other, value, self.lease_ms), digest)
            if took is FAILED or not took:
                return None, other
            warn_once(
                f"planted:{self._prefix}",
                "isocache: took over a Redis lease for piece %s that is not signed with this key "
                "(planted by someone who can write to Redis, or held by a machine with another key?)",
                digest[:16],
            )
            return RemoteLease(connection, key, value, self.lease_ms), None
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
            bound = self.bound(timeout, self.holder_seconds(digest, holder), expected_seconds)
            left = bound - (time.monotonic() - start)
            if left <= 0:
                logger.debug(
                    "isocache: waited %.0f s for another machine to compile %s; compiling here", bound, digest[:16]
                )
                return None
            time.sleep(min(poll, left))


def _seconds(text: str) -> float:
    """Seconds from a lease value's part; 0.0 when that is not a finite number >= 0."""
    try:
        seconds = float(text)
    except ValueError:
        return 0.0
    return seconds if 0 <= seconds < float("inf") else 0.0
