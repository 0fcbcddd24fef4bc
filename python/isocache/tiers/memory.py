"""The memory tier: this process's index of compiled pieces (`_core.Index`, digest -> callable).

The fastest tier, and the only one that holds callables. Its lease is the
index's claim: one thread of the process produces a digest while the others
wait for it (bounded), then reuse what it published.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from .. import _core
from .base import NO_LEASE, Hit, Lease, TierStats

__all__ = ["PROCESS_INDEX", "MemoryTier", "process_index", "process_tier"]

#: One index per process: compiled pieces outlive `torch._dynamo.reset()`.
PROCESS_INDEX = _core.Index()


def process_index() -> _core.Index:
    """The process-wide index of compiled pieces (digest -> callable)."""
    return PROCESS_INDEX


class _Claim:
    """This thread's claim on a digest in the index; released unpublished, it is given up."""

    def __init__(self, index: _core.Index, digest: str) -> None:
        self._index = index
        self._digest = digest

    def release(self) -> None:
        # Drops the claim only while it is still "compiling": after a publish it is a no-op.
        self._index.abandon(self._digest)


class MemoryTier:
    """The process index as a tier (values are callables)."""

    name = "memory"
    holder = "another thread"
    network = False

    def __init__(self, index: _core.Index | None = None) -> None:
        self.index = PROCESS_INDEX if index is None else index
        self.stats = TierStats(self.name)

    def __repr__(self) -> str:
        return f"MemoryTier({len(self.index)} entries)"

    def get(self, digest: str) -> Hit[Callable[..., Any]] | None:
        entry = self.index.get(digest)
        if entry is None or entry.state != "ready" or not callable(entry.value):
            self.stats.count(misses=1)
            return None
        self.index.record_hit(digest)
        self.stats.count(hits=1)
        value: Callable[..., Any] = entry.value
        return Hit(value, entry.compile_seconds, self.name)

    def contains(self, digest: str) -> bool:
        entry = self.index.get(digest)
        return entry is not None and entry.state == "ready" and callable(entry.value)

    def put(self, digest: str, value: Callable[..., Any], compile_seconds: float) -> bool:
        self.index.publish(digest, value, compile_seconds)
        self.stats.count(puts=1)
        return True

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        """The index's claim on `digest`, waiting up to `timeout` for another thread's.

        When the other thread finishes (published, or failed) within the
        timeout there is nothing to hold: `NO_LEASE`, and the caller looks again.
        None when it is still producing it at the deadline.
        """
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self.index.claim(digest):
                return _Claim(self.index, digest)
            entry = self.index.wait(digest, max(0.0, deadline - time.monotonic()))
            if entry is None:
                continue  # abandoned while we waited: claim it
            if entry.state != "compiling":
                return NO_LEASE
            if time.monotonic() >= deadline:
                return None

    def discard(self, digest: str) -> None:
        self.index.remove(digest)


_PROCESS_TIER = MemoryTier(PROCESS_INDEX)


def process_tier() -> MemoryTier:
    """The process index as a tier (one per process, with its own counters)."""
    return _PROCESS_TIER
