"""What every tier is: the `Tier` protocol, its typed results and its own counters.

A tier keeps values by digest. The process index keeps callables; the local
store, Redis (and whatever comes next: an object store, a shared filesystem)
keep checked bytes. Each answers the same five calls and counts its own
traffic, under its own lock, as it happens:

    get(digest)                      -> Hit | None   (a miss, or an error that is a miss)
    contains(digest)                 -> bool         (cheap, uncounted)
    put(digest, value, seconds)      -> bool         (True when written)
    lease(digest, timeout)           -> Lease | None (None: another holder kept it past the timeout)
    discard(digest)                  -> None         (a value that does not load here; a tier may keep it)

A tier that cannot lease hands out `NO_LEASE`. A tier never raises for a
store, network or format problem: that is a miss (or a failed put) with one
warning. Adding a tier means writing one class with these methods and
listing it in the chain (`tiers/chain.py`).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar

from .. import report

__all__ = [
    "NO_LEASE",
    "Hit",
    "Lease",
    "NoLease",
    "Tier",
    "TierStats",
    "Unloadable",
    "longest_compile",
]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


def longest_compile(longest: float, seconds: float) -> float:
    """`longest`, or `seconds` when that is a longer compile time (finite and positive: a value's
    recorded seconds bound waits on other machines, so nan, inf and 0 never count)."""
    if seconds == seconds and 0 < seconds < float("inf") and seconds > longest:
        return float(seconds)
    return longest


@dataclasses.dataclass(frozen=True)
class Hit(Generic[T_co]):
    """A value found in a tier: bytes (byte tiers) or a callable (the process index)."""

    value: T_co
    #: Seconds the value took to compile where it was made (0.0 when unknown).
    compile_seconds: float
    #: The name of the tier that had it.
    tier: str


class Lease(Protocol):
    """A held compile lease: whoever holds it compiles; release it when done."""

    def release(self) -> None: ...


class NoLease:
    """Stands in for a lease a tier cannot give (or no longer needs): holds and releases nothing."""

    def release(self) -> None:
        pass

    def __repr__(self) -> str:
        return "NO_LEASE"


NO_LEASE = NoLease()


class Unloadable(Exception):
    """Raised by a loader: these bytes do not load here (the chain tries the next tier)."""


@dataclasses.dataclass
class _Counts:
    hits: int = 0
    misses: int = 0
    errors: int = 0
    puts: int = 0
    quarantined: int = 0


class TierStats:
    """A tier's own counters, counted under a lock as things happen (never by diffing).

    Args:
        tier: the tier's name (for `repr`).
        process: which of the process counters (`report.Counters`) each of these
            counts also feeds, e.g. ``{"hits": "remote_hits"}``.
    """

    FIELDS = tuple(f.name for f in dataclasses.fields(_Counts))

    def __init__(self, tier: str, process: Mapping[str, str] | None = None) -> None:
        self.tier = tier
        self._process = dict(process or {})
        unknown = set(self._process) - set(self.FIELDS)
        if unknown:
            raise ValueError(f"unknown tier counters: {sorted(unknown)}")
        self._counts = _Counts()
        self._lock = threading.Lock()

    def count(self, **deltas: int) -> None:
        """Adds `deltas` (e.g. ``hits=1``) to this tier and to the process counters it feeds."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self._counts, name, getattr(self._counts, name) + delta)
        feed = {self._process[k]: v for k, v in deltas.items() if k in self._process}
        if feed:
            report.counters.bump(**feed)

    @property
    def hits(self) -> int:
        return self._counts.hits

    @property
    def misses(self) -> int:
        return self._counts.misses

    @property
    def errors(self) -> int:
        return self._counts.errors

    @property
    def puts(self) -> int:
        return self._counts.puts

    @property
    def quarantined(self) -> int:
        return self._counts.quarantined

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dataclasses.asdict(self._counts)

    def __repr__(self) -> str:
        counts = ", ".join(f"{k}={v}" for k, v in self.snapshot().items())
        return f"TierStats({self.tier}: {counts})"


class Tier(Protocol[T]):
    """One place values of a namespace may come from (see the module docstring)."""

    @property
    def name(self) -> str:
        """Short name in logs and `Hit.tier`: ``memory``, ``local``, ``redis``."""
        ...

    @property
    def holder(self) -> str:
        """Who else may hold this tier's lease, for messages: ``another process``."""
        ...

    @property
    def network(self) -> bool:
        """True when a call costs a round trip to another machine."""
        ...

    @property
    def stats(self) -> TierStats: ...

    def get(self, digest: str) -> Hit[T] | None: ...

    def contains(self, digest: str) -> bool: ...

    def put(self, digest: str, value: T, compile_seconds: float) -> bool: ...

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None: ...

    def discard(self, digest: str) -> None: ...
