"""The bundle tier: the pieces a saved `isocache.compile` entry carries, read with the entry.

A warm `isocache.compile` reads its entry (split graph, manifest and every
distinct piece) with one checked read of the local store; this tier hands
those pieces to the chain ahead of the local store, so loading them reads no
other file. It only ever gives: nothing is written to it, and the pieces also
live in the store under their digests, where other models and processes
find them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .base import NO_LEASE, Hit, Lease, TierStats

__all__ = ["BundleTier"]


class BundleTier:
    """Read-only pieces (digest -> artifact bytes and compile seconds) of one saved entry."""

    name = "bundle"
    holder = "nobody"
    network = False

    def __init__(self, pieces: Mapping[str, tuple[bytes, float]]) -> None:
        self._pieces = dict(pieces)
        self.stats = TierStats(self.name)

    def __repr__(self) -> str:
        return f"BundleTier({len(self._pieces)} pieces)"

    def get(self, digest: str) -> Hit[bytes] | None:
        found = self._pieces.get(digest)
        if found is None:
            self.stats.count(misses=1)
            return None
        self.stats.count(hits=1)
        return Hit(found[0], found[1], self.name)

    def contains(self, digest: str) -> bool:
        return digest in self._pieces

    def put(self, digest: str, value: bytes, compile_seconds: float) -> bool:
        return False  # a saved entry is not added to

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        return NO_LEASE

    def discard(self, digest: str) -> None:
        self._pieces.pop(digest, None)  # did not load here: the next tier is asked
