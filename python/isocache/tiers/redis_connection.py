"""The Redis tier's connection: one client, short timeouts, and a circuit breaker.

Redis being down, slow or full never fails a compile: every call has a short
timeout, the first failure logs one warning and the tier is skipped for a
while (``retry_after`` seconds) before it is tried again. A key of the wrong
Redis type is a miss for that digest only; the connection stays on.

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

__all__ = ["FAILED", "RedisConnection"]

logger = logging.getLogger("isocache")

#: A call that failed (Redis down, or the server refused the command); distinct from a nil reply.
FAILED: Any = object()


class RedisConnection:
    """One Redis server behind a circuit breaker; failures are counted in `stats`.

    Args:
        url: the server (never logged unredacted).
        timeout: socket timeout of every call.
        retry_after: seconds the connection stays off after Redis was unreachable.
        stats: the tier's counters (``errors`` counts failed calls).
        prefix: the tier's key prefix (keys the once-per-key warnings).
    """

    def __init__(self, url: str, *, timeout: float, retry_after: float, stats: TierStats, prefix: str) -> None:
        self.url = url
        self.timeout = timeout
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

            self._client = redis.Redis.from_url(
                self.url,
                socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One immediate reconnect (a killed connection); no retries on timeouts:
                # the circuit breaker and the heartbeat decide when to try again.
                retry=Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
            )
        return self._client

    def scrub(self, text: str) -> str:
        """`text` without the URL's secrets."""
        return scrub(text, self.url)

    @property
    def available(self) -> bool:
        """False while the circuit breaker keeps Redis off."""
        return time.monotonic() >= self._down_until

    def call(self, op: Callable[[Any], Any], digest: str = "") -> Any:
        """Runs `op(client)`; `FAILED` when Redis is off or the call failed (warned)."""
        if not self.available:
            return FAILED
        try:
            result = op(self.client())
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
            self._fail(self.scrub(f"{type(e).__name__}: {e}"))
            return FAILED
        with self._lock:
            recovered = self._warned
            self._warned = False
        if recovered:
            logger.info("isocache: Redis at %s is reachable again", redact_url(self.url))
        return result

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
