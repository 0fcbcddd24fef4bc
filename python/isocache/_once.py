"""Warn once: a message logged the first time its key comes up in this process, not again.

The keys said are this process's one memory of what it already told the
user (a bad variable's value, a graph that cannot be encoded, a tier that
is down). It is bounded: a process that meets ever new keys (a digest per
failed piece) remembers the newest `MAX_KEYS`, forgetting the oldest first,
so such a message may come again after thousands of others.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["MAX_KEYS", "forget", "info_once", "warn_once"]

logger = logging.getLogger("isocache")

#: How many keys are remembered at most.
MAX_KEYS = 4096


class _Said:
    """The keys already said, oldest first, at most `limit` of them; safe across threads."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._keys: OrderedDict[Hashable, None] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, key: Hashable) -> bool:
        """Remembers `key`; True when it was not remembered yet."""
        with self._lock:
            if key in self._keys:
                return False
            self._keys[key] = None
            if len(self._keys) > self._limit:
                self._keys.popitem(last=False)
            return True

    def clear(self) -> None:
        with self._lock:
            self._keys.clear()


_said = _Said(MAX_KEYS)


def warn_once(key: Hashable, message: str, *args: object, level: int = logging.WARNING) -> bool:
    """Logs `message` once per process for `key` (a warning unless `level` says otherwise); True when logged now."""
    if not _said.first_time(key):
        return False
    logger.log(level, message, *args)
    return True


def info_once(key: Hashable, message: str, *args: object) -> bool:
    """`warn_once` at INFO level: something worth knowing once, not a problem."""
    return warn_once(key, message, *args, level=logging.INFO)


def forget() -> None:
    """Forgets every key, as a new process would start (tests)."""
    _said.clear()
