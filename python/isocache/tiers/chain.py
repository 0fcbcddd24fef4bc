"""The tier chain: memory -> local store -> base stores -> Redis (-> whatever tier comes next) -> produce.

The chain is the only code that moves values between tiers:

- lookup in order, fastest first; a value that does not load from one tier is
  warned about once, discarded from that tier (if the tier discards) and
  treated as a miss there, whichever tier it came from;
- a value found in a network tier (Redis) is written through to every faster
  byte tier, and any value found is put in memory: one write-through
  (`write_through`), so the size cap and the warnings are the same for a
  back-fill and for a publish. A value found in a tier on this machine (a
  base store, a saved entry's bundle) is not copied into another: both are
  read from this machine's disks by the same checked read, so a copy would
  make no later load faster (`benches/bench_fleet.py` measures it);
- before producing a value it takes each tier's lease in order (the thread
  claim, the local file lock, the Redis lease), waiting a bounded time for
  whoever holds one, then looks again in that tier: the holder may have
  published it meanwhile; each lease is told the compile seconds to expect
  (those of a value for the digest that did not load, else the longest
  compile of a value this chain loaded), which bounds waits on other machines;
- a produced value is published to every byte tier (while the leases are
  held, so waiters find it) and to memory.

The chain decides where a value comes from; what that means for a piece
(REUSE / LOAD / COMPILE / FAILED) is the resolver's (`resolver.py`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Callable, Generic, Protocol, TypeVar

from .. import config
from .._once import warn_once
from .base import NO_LEASE, Lease, Tier, Unloadable, longest_compile

__all__ = ["Chain", "Found", "Produced", "Waits"]

V = TypeVar("V")


@dataclasses.dataclass(frozen=True)
class Found(Generic[V]):
    """A value some tier had (loaded, when it came from a byte tier)."""

    value: V
    #: The tier it came from (`Tier.name`).
    tier: str
    #: Seconds it took to compile where it was made.
    compile_seconds: float
    #: True when the memory tier had it: nothing was loaded.
    reused: bool


@dataclasses.dataclass(frozen=True)
class Produced(Generic[V]):
    """What the chain's producer made when no tier had the value."""

    value: V
    #: The bytes to publish to every byte tier; None publishes nothing (memory only).
    payload: bytes | None
    compile_seconds: float
    #: Why the value is a fallback (the producer could not make the real thing), or None.
    failure: str | None = None


class Waits(Protocol):
    """Where the chain notes time spent waiting on leases (a `report.CompileEvent` is one)."""

    wait_seconds: float
    reason: str | None


@dataclasses.dataclass
class _Attempt:
    """What one lookup learned so far about a digest."""

    #: Compile seconds of a value seen for the digest that did not load (for bounding waits).
    expected: float | None = None
    #: Tiers whose value did not load: not read again in this attempt.
    unloadable: set[str] = dataclasses.field(default_factory=set)


class Chain(Generic[V]):
    """The tiers of one namespace, in lookup order.

    Args:
        memory: the tier of loaded values (the process index).
        stores: byte tiers, fastest first (the local store, Redis, ...).
        wait_timeout: the longest wait for another holder of a tier's lease
            (default ``ISOCACHE_WAIT_TIMEOUT``).
    """

    def __init__(
        self,
        memory: Tier[V],
        stores: Sequence[Tier[bytes]] = (),
        *,
        wait_timeout: float | None = None,
    ) -> None:
        self.memory = memory
        self.stores = tuple(stores)
        self.wait_timeout = (
            config.current().wait_timeout
            if wait_timeout is None
            else config.bounded_seconds("wait_timeout", wait_timeout)
        )
        # The longest compile of a value loaded from a byte tier: what a piece of this
        # model may take when nothing better is known (passed to leases as expected seconds).
        self._longest_compile = 0.0

    def __repr__(self) -> str:
        return "Chain(" + " -> ".join(t.name for t in self.tiers) + ")"

    @property
    def tiers(self) -> tuple[Tier[V] | Tier[bytes], ...]:
        return (self.memory, *self.stores)

    def tier(self, name: str) -> Tier[bytes] | None:
        """The byte tier called `name`, if the chain has one."""
        return next((t for t in self.stores if t.name == name), None)

    def stats(self) -> dict[str, dict[str, int]]:
        """Each tier's own counters, by tier name."""
        return {t.name: t.stats.snapshot() for t in self.tiers}

    def known(self, digest: str) -> bool:
        """Whether memory or a tier on this machine has `digest` (asks no other machine)."""
        return self.memory.contains(digest) or any(t.contains(digest) for t in self.stores if not t.network)

    # -- lookups ------------------------------------------------------------------
    def find(self, digest: str, load: Callable[[bytes], V]) -> Found[V] | None:
        """The value from the first tier that has one that loads; never waits or produces."""
        found = self._reuse(digest)
        if found is not None:
            return found
        attempt = _Attempt()
        for i in range(len(self.stores)):
            found = self._load(i, digest, load, attempt)
            if found is not None:
                return found
        return None

    def obtain(
        self,
        digest: str,
        load: Callable[[bytes], V],
        produce: Callable[[], Produced[V]],
        waits: Waits,
    ) -> Found[V] | Produced[V]:
        """The value from the first tier that has it, else `produce()`'s, published everywhere.

        Produces at most once per digest per machine (per fleet with Redis)
        while leases work: each tier's lease is held from the miss in that tier
        until the value is published.
        """
        found = self._reuse(digest)
        if found is not None:
            return found
        attempt = _Attempt()
        claim = self._lease(self.memory, digest, waits, attempt)
        try:
            if self.memory.contains(digest):  # another thread published it while we waited
                found = self._reuse(digest)
                if found is not None:
                    return found
            result = self._through(0, digest, load, produce, waits, attempt)
            if isinstance(result, Produced):
                self.memory.put(digest, result.value, result.compile_seconds)
            return result
        finally:
            claim.release()

    def write_through(self, tiers: Sequence[Tier[bytes]], digest: str, payload: bytes, compile_seconds: float) -> None:
        """The one write-through: puts `payload` in each of `tiers` (each applies its cap, warns on failure)."""
        for tier in tiers:
            tier.put(digest, payload, compile_seconds)

    # -- internals ----------------------------------------------------------------
    def _reuse(self, digest: str) -> Found[V] | None:
        hit = self.memory.get(digest)
        return None if hit is None else Found(hit.value, hit.tier, hit.compile_seconds, reused=True)

    def _load(self, i: int, digest: str, load: Callable[[bytes], V], attempt: _Attempt) -> Found[V] | None:
        """Byte tier `i`'s value, loaded, back-filled into faster tiers; None on a miss or a value that does not load."""
        tier = self.stores[i]
        hit = tier.get(digest)
        if hit is None:
            return None
        # What this chain knows of compile times bounds its waits for other machines.
        self._longest_compile = longest_compile(self._longest_compile, hit.compile_seconds)
        try:
            value = load(hit.value)
        except Unloadable as e:
            attempt.unloadable.add(tier.name)
            if hit.compile_seconds > 0:
                attempt.expected = hit.compile_seconds
            warn_once(
                f"load:{digest}",
                "isocache: could not load artifact %s from the %s tier (%s); treating it as a miss",
                digest[:16],
                tier.name,
                e,
            )
            tier.discard(digest)
            return None
        if tier.network:
            self.write_through(self.stores[:i], digest, hit.value, hit.compile_seconds)
        self.memory.put(digest, value, hit.compile_seconds)
        return Found(value, tier.name, hit.compile_seconds, reused=False)

    def _lease(self, tier: Tier[V] | Tier[bytes], digest: str, waits: Waits, attempt: _Attempt) -> Lease:
        """`tier`'s lease on `digest`: taken at once, else after waiting for its holder (bounded)."""
        expected = attempt.expected or self._longest_compile or None
        lease = tier.lease(digest, 0.0, expected_seconds=expected)
        if lease is not None:
            return lease
        start = time.perf_counter()
        lease = tier.lease(digest, self.wait_timeout, expected_seconds=expected)
        waited = time.perf_counter() - start
        waits.wait_seconds += waited
        if lease is None:
            waits.reason = f"waited {waited:.0f} s for {tier.holder}; compiling here"
            return NO_LEASE
        return lease

    def _through(
        self,
        i: int,
        digest: str,
        load: Callable[[bytes], V],
        produce: Callable[[], Produced[V]],
        waits: Waits,
        attempt: _Attempt,
    ) -> Found[V] | Produced[V]:
        """Byte tiers from `i` on, each under its lease; the producer under all of them."""
        if i == len(self.stores):
            produced = produce()
            if produced.payload is not None:
                self.write_through(self.stores, digest, produced.payload, produced.compile_seconds)
            return produced
        tier = self.stores[i]
        found = self._load(i, digest, load, attempt)
        if found is not None:
            return found
        lease = self._lease(tier, digest, waits, attempt)
        try:
            # The holder may have published while we looked or waited.
            if tier.name not in attempt.unloadable and tier.contains(digest):
                found = self._load(i, digest, load, attempt)
                if found is not None:
                    return found
            return self._through(i + 1, digest, load, produce, waits, attempt)
        finally:
            lease.release()
