"""The base tier: read-only stores built elsewhere (``ISOCACHE_BASE``), searched after the local store.

A fleet builds its cache once (in CI, on one machine), ships it as one archive
(``python -m isocache pack`` / ``unpack``) and starts every container from it:
an image layer or a read-only volume holding a store. isocache never writes
one: it is opened by the store's base mode (`_core.Store(..., base=True)`),
which creates, locks, quarantines and touches nothing and needs no write
permission; its directories and files are trusted when the user or root owns
them and nobody else can write them, and with ``ISOCACHE_KEY`` every artifact
must be signed with the key. A bad artifact is a miss, warned once, left where
it is.

What a base store holds is not copied into the local store: both are files on
this machine, read by the same checked read, so a copy makes no later load
faster (measured: `benches/bench_fleet.py`) and only costs a write and disk.
The chain back-fills only what comes over the network (`tiers/chain.py`).

`Entries` are where `isocache.compile` finds and saves whole models: the local
store first, then the base stores; saved only to the local store.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Literal

from .. import _core
from .._once import info_once, warn_once
from .base import NO_LEASE, Hit, Lease, TierStats
from .local import LocalTier, _warn_refused

__all__ = ["BaseTier", "Entries"]

logger = logging.getLogger("isocache")


class BaseTier:
    """One namespace of the read-only base stores, in the order ``ISOCACHE_BASE`` lists them."""

    name = "base"
    holder = "nobody"
    network = False

    def __init__(self, stores: Sequence[_core.Store]) -> None:
        self.stores = tuple(stores)
        self.stats = TierStats(self.name)

    @classmethod
    def open(cls, roots: Sequence[os.PathLike[str] | str], namespace: str, key: bytes | None) -> BaseTier | None:
        """The tier over each of `roots` that holds `namespace`, or None when none does (each problem said once)."""
        stores = []
        for root in roots:
            path = os.fspath(root)
            if not os.path.isdir(path):
                warn_once(
                    f"base:{path}", "isocache: ignoring the base store %s (ISOCACHE_BASE): no such directory", path
                )
                continue
            if not os.path.isdir(os.path.join(path, "v1", namespace)):
                info_once(
                    f"base:{path}:{namespace}",
                    "isocache: the base store %s holds nothing for namespace %s (built with another torch, "
                    "isocache, Inductor configuration or device kind? `python -m isocache stats --dir %s` lists "
                    "its namespaces)",
                    path,
                    namespace,
                    path,
                )
                continue
            try:
                stores.append(_core.Store(path, namespace, key, create=False, base=True))
            except _core.CacheError as e:
                warn_once(f"base:{path}", "isocache: ignoring the base store %s (ISOCACHE_BASE): %s", path, e)
        return cls(stores) if stores else None

    def __repr__(self) -> str:
        return f"BaseTier({[str(s.path) for s in self.stores]!r})"

    def _find(self, digest: str, *, counted: bool) -> Hit[bytes] | None:
        for store in self.stores:
            try:
                found = store.get_checked(digest)
            except _core.CacheError as e:
                if counted:
                    self.stats.count(errors=1)
                warn_once(f"base-read:{store.root}", "isocache: the base store could not be read (%s); a miss", e)
                continue
            if found.status == "hit" and found.payload is not None:
                if counted:
                    self.stats.count(hits=1)
                return Hit(found.payload, found.compile_seconds, self.name)
            if found.status == "corrupt" and counted:
                self.stats.count(errors=1)
                _warn_refused(f"{digest} in the base store {store.root}", found)
        if counted:
            self.stats.count(misses=1)
        return None

    def get(self, digest: str) -> Hit[bytes] | None:
        """The checked artifact from the first base store that has a good one, or None (a bad one: warned)."""
        return self._find(digest, counted=True)

    def peek(self, digest: str) -> Hit[bytes] | None:
        """As `get`, not counted (bundling a saved entry's pieces)."""
        return self._find(digest, counted=False)

    def contains(self, digest: str) -> bool:
        for store in self.stores:
            try:
                if digest in store:
                    return True
            except _core.CacheError:
                continue
        return False

    def put(self, digest: str, value: bytes, compile_seconds: float) -> bool:
        return False  # never written

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        return NO_LEASE  # compiles are leased in the local store and Redis

    def discard(self, digest: str) -> None:
        pass  # never written: the next tier is asked


class Entries:
    """Saved models of one namespace: read from the local store, then the base stores; saved locally."""

    def __init__(self, local: LocalTier | None, base: BaseTier | None) -> None:
        self.local = local
        self.base = base

    def __repr__(self) -> str:
        return f"Entries({self.local!r}, {self.base!r})"

    def get(self, key: str) -> Hit[bytes] | None:
        found = self.local.get(key) if self.local is not None else None
        if found is None and self.base is not None:
            found = self.base.get(key)
        return found

    def peek(self, digest: str) -> Hit[bytes] | None:
        found = self.local.peek(digest) if self.local is not None else None
        if found is None and self.base is not None:
            found = self.base.peek(digest)
        return found

    def put(
        self, digest: str, value: bytes, compile_seconds: float, *, kind: Literal["piece", "model"] = "piece"
    ) -> bool:
        return self.local is not None and self.local.put(digest, value, compile_seconds, kind=kind)
