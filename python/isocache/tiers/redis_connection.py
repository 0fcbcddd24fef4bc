"""The Redis tier's connection: one client, short timeouts, and a circuit breaker.

Redis being down, slow or full never fails a compile: every call has one
deadline for the whole call (not per read: `redis_guard.py`), the first
failure logs one warning and the tier is skipped for a while (``retry_after``
seconds) before it is tried again. Every reply is untrusted input: a key of the
wrong Redis type, a reply of an unexpected type, or a bulk reply larger than
the maximum (refused from its header) is a miss for that digest only, counted
with one warning; the connection stays on.

URLs are redacted before they reach a log line or a message: user info and
``password``/``username`` query parameters are replaced by ``***``.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Callable

from .._once import warn_once
from .._redact import redact_url, scrub
from .base import TierStats
from .redis_guard import budget, guarded_parser, reply_too_large

__all__ = ["FAILED", "RedisConnection"]

logger = logging.getLogger("isocache")

#: A call that failed (Redis down, or the server refused the command); distinct from a nil reply.
FAILED: Any = object()


class RedisConnection:
    """One Redis server behind a circuit breaker; failures are counted in `stats`.

    Args:
        url: the server (never logged unredacted).
        timeout: socket timeout of every read and of connecting.
        deadline: the most seconds one call may take, its whole reply included.
        max_reply: the largest bulk reply accepted, in bytes (a larger one is refused from its header).
        retry_after: seconds the connection stays off after Redis was unreachable.
        stats: the tier's counters (``errors`` counts failed calls).
        prefix: the tier's key prefix (keys the once-per-key warnings).
    """

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retry_after: float,
        stats: TierStats,
        prefix: str,
        deadline: float = 10.0,
        max_reply: int = 512 * 1024**2,
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.deadline = max(deadline, 0.001)
        self.max_reply = max_reply
        self.retry_after = retry_after
        self._stats = stats
        self._prefix = prefix
        self._client: Any = None
        self._down_until = 0.0
        self._warned = False
        self._lock = threading.Lock()

    def client(self) -> Any:
        """The `redis.Redis` client, made on first use (raises ImportError without the package)."""
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            client = redis.Redis.from_url(
                self.url,
                protocol=2,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One immediate reconnect (a killed connection); no retries on timeouts:
                # the circuit breaker and the heartbeat decide when to try again.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            )
            # One deadline per call, no reply beyond max_reply (the URL may ask for RESP3).
            kwargs = client.connection_pool.connection_kwargs
            kwargs["parser_class"] = guarded_parser(3 if str(kwargs.get("protocol")) == "3" else 2)
            self._client = client
        return self._client

    def scrub(self, text: str) -> str:
        """`text` without the URL's secrets."""
        return scrub(text, self.url)

    @property
    def available(self) -> bool:
        """False while the circuit breaker keeps Redis off."""
        return time.monotonic() >= self._down_until

    def call(self, op: Callable[[Any], Any], digest: str = "", expect: tuple[type, ...] | None = None) -> Any:
        """Runs `op(client)` within the deadline; `FAILED` when Redis is off or the call failed (warned),
        or when the reply is not an instance of `expect` (a miss for `digest`, counted and warned)."""
        if not self.available:
            return FAILED
        try:
            result = self.run(op)
        except ImportError:
            self._fail("the redis package is not installed (pip install 'isocache[redis]')", forever=True)
            return FAILED
        except Exception as e:  # a remote tier never fails a compile
            if _is_wrong_type(e):
                # The server works; one key holds something else. A miss for this digest only.
                self._stats.count(errors=1)
                warn_once(
                    f"wrongtype:{self._prefix}:{digest}",
                    "isocache: the Redis key of piece %s holds the wrong type of value; treating it as a miss",
                    digest[:16],
                )
                return FAILED
            if isinstance(e, reply_too_large()):
                return self.odd_reply(digest, str(e))
            self._fail(self.scrub(f"{type(e).__name__}: {e}"))
            return FAILED
        if expect is not None and not isinstance(result, expect):
            return self.odd_reply(digest, f"a reply of type {type(result).__name__}")
        with self._lock:
            recovered = self._warned
            self._warned = False
        if recovered:
            logger.info("isocache: Redis at %s is reachable again", redact_url(self.url))
        return result

    def run(self, op: Callable[[Any], Any]) -> Any:
        """`op(client)` within the deadline, without the circuit breaker (raises what the call raised)."""
        with budget(self.deadline, self.max_reply):
            return op(self.client())

    def odd_reply(self, digest: str, what: str) -> Any:
        """Counts and warns (once per digest) about a reply that is not what the command returns: `FAILED`."""
        self._stats.count(errors=1)
        warn_once(
            f"oddreply:{self._prefix}:{digest}",
            "isocache: Redis answered %s for piece %s (%s); treating it as a miss",
            "unexpectedly",
            digest[:16] or "-",
            what,
        )
        return FAILED

    def _fail(self, reason: str, forever: bool = False) -> None:
        self._stats.count(errors=1)
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


def _is_wrong_type(e: Exception) -> bool:
    try:
        from redis.exceptions import ResponseError
    except ImportError:
        return False
    return isinstance(e, ResponseError) and str(e).startswith("WRONGTYPE")
