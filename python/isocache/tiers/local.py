"""The local tier: this machine's artifact store (`_core.Store`), one namespace.

The only code on the compile path that talks to `_core.Store`. Every store
error is a miss (or a failed put) with one warning per store root; a bad file
found on a read is moved to quarantine by the store and counted here. Every
put applies the size cap (``ISOCACHE_MAX_BYTES``), whether it publishes a
compile or back-fills a value found further away. The lease is a file lock:
one process per machine compiles a digest.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Literal

from .. import _core, config
from .._once import warn_once
from .base import NO_LEASE, Hit, Lease, TierStats

__all__ = ["LocalTier", "read_payload"]

logger = logging.getLogger("isocache")

_FATES = {"gone": "already moved by another process", "left_in_place": "left in place"}


def _warn_refused(digest: str, found: _core.Lookup) -> None:
    """The one warning for an entry the store refused: the check it failed and what became of it."""
    if found.fate == "quarantined":
        fate = f"moved to {found.quarantined_to}"
    else:
        fate = _FATES.get(found.fate or "", "left in place")
    logger.warning("isocache: ignoring bad artifact %s: %s (%s)", digest, found.reason, fate)


def _sign_existing(store: _core.Store) -> None:
    """The first use of a key: the user's existing artifacts signed in place, said in one line."""
    try:
        report = store.sign_existing()
    except _core.CacheError as e:
        warn_once(f"sign:{store.root}", "isocache: could not sign the existing artifacts with the key: %s", e)
        return
    said = [
        f"signed {report.signed} existing artifacts with it" if report.signed else "",
        f"{report.damaged} failed their check and were moved aside" if report.damaged else "",
        f"{report.other_key} signed with another key were moved aside" if report.other_key else "",
        f"{report.left} could not be read and were left in place" if report.left else "",
    ]
    if any(said):
        logger.log(
            logging.INFO if not (report.damaged or report.other_key or report.left) else logging.WARNING,
            "isocache: first use of ISOCACHE_KEY in %s: %s",
            store.path,
            "; ".join(p for p in said if p),
        )


def read_payload(store: _core.Store, digest: str | _core.Digest) -> bytes | None:
    """The checked payload of `digest` in `store`, or None: a miss, or a bad entry (one warning).

    For readers outside the compile path (the command line); store errors raise.
    """
    found = store.get_checked(digest)
    if found.status == "corrupt":
        _warn_refused(found.digest.hex, found)
    return found.payload


class LocalTier:
    """One namespace of the store under one root, as a tier (values are checked bytes)."""

    name = "local"
    holder = "another process"
    network = False

    def __init__(self, store: _core.Store) -> None:
        self.store = store
        self.root = str(store.root)
        self.stats = TierStats(self.name, process={"quarantined": "quarantined"})
        self._size_lock_skips = 0

    @classmethod
    def open(cls, root: str, namespace: str, key: bytes | None) -> LocalTier | None:
        """The tier for `namespace` under `root`, or None when no store can be used there (warned once)."""
        try:
            store = _core.Store(root, namespace, key)
        except _core.CacheError as e:
            warn_once(f"store:{root}", "isocache: working without a persistent store: %s", e)
            return None
        if key is not None:
            _sign_existing(store)
        return cls(store)

    def __repr__(self) -> str:
        return f"LocalTier({self.store.path!r})"

    def describe(self, description: str) -> None:
        """Records what made this namespace beside it, so `python -m isocache stats` can say why two
        namespaces differ (rewritten only when it differs: settings outside the namespace's digest,
        which only the description lists). One INFO line when the namespace had none."""
        try:
            new = self.store.description() is None
            self.store.describe(description)
        except _core.CacheError as e:
            warn_once(f"describe:{self.root}", "isocache: could not record the namespace's fields: %s", e)
            return
        if new:
            logger.info(
                "isocache: new store namespace %s under %s (`python -m isocache stats` shows what makes it, "
                "`stats --diff NS1 NS2` how two differ)",
                self.store.namespace,
                self.root,
            )

    def get(self, digest: str) -> Hit[bytes] | None:
        """The checked artifact, or None: a miss, a bad file (moved to quarantine, warned), or a store error."""
        try:
            found = self.store.get_checked(digest)
        except _core.CacheError as e:
            self.stats.count(errors=1)
            warn_once(f"lookup:{self.root}", "isocache: the store could not be read (%s); treating it as a miss", e)
            return None
        if found.status == "hit" and found.payload is not None:
            self.stats.count(hits=1)
            return Hit(found.payload, found.compile_seconds, self.name)
        self.stats.count(misses=1)
        if found.status == "corrupt":
            self.stats.count(quarantined=1)
            _warn_refused(digest, found)
        return None

    def peek(self, digest: str) -> Hit[bytes] | None:
        """The checked artifact, not counted as a lookup (bundling a saved entry's pieces); None if absent."""
        try:
            found = self.store.get_checked(digest)
        except _core.CacheError:
            return None
        if found.status != "hit" or found.payload is None:
            return None
        return Hit(found.payload, found.compile_seconds, self.name)

    def contains(self, digest: str) -> bool:
        try:
            return digest in self.store
        except _core.CacheError:
            return False

    def put(
        self, digest: str, value: bytes, compile_seconds: float, *, kind: Literal["piece", "model"] = "piece"
    ) -> bool:
        """Writes `value`, keeping the whole root under the size cap; False (warned once) when it cannot.

        The store enforces the cap as it publishes (a running size, least
        recently used evicted first). `kind` is ``"piece"`` or ``"model"`` (an
        `isocache.compile` entry).
        """
        limit = config.current().max_bytes
        try:
            report = self.store.put(digest, value, compile_seconds, max_bytes=limit, kind=kind)
        except _core.CacheError as e:
            self.stats.count(errors=1)
            warn_once(
                f"put:{self.root}",
                "isocache: the store could not be written (%s); compiled pieces stay in memory",
                e,
            )
            return False
        self.stats.count(puts=1)
        self._warn_size_lock()
        if report is not None and report.removed:
            logger.debug(
                "isocache: evicted %d artifacts (%d bytes) to stay under %d bytes",
                report.removed,
                report.freed_bytes,
                limit,
            )
        return True

    def _warn_size_lock(self) -> None:
        """One warning when a put went on without the root's size lock (another process held it)."""
        skips = self.store.size_lock_skips
        if skips != self._size_lock_skips:
            self._size_lock_skips = skips
            warn_once(
                f"size-lock:{self.root}",
                "isocache: another process holds the size lock of the store at %s (its v1/size) past a short "
                "wait (a stopped process?); artifacts are still stored without waiting, counted by a scan once "
                "the lock is free, and the size cap is enforced then",
                self.root,
            )

    def lease(self, digest: str, timeout: float, *, expected_seconds: float | None = None) -> Lease | None:
        """The store's file lock for `digest` (None: another process held it past `timeout`).

        A lock that cannot be taken at all is skipped: `NO_LEASE`, warned once.
        """
        try:
            return self.store.lease(digest, timeout)
        except _core.CacheError as e:
            warn_once(
                f"lease:{self.root}",
                "isocache: compile leases unavailable (%s); compiling without one",
                e,
            )
            return NO_LEASE

    def discard(self, digest: str) -> None:
        with contextlib.suppress(_core.CacheError):
            self.store.remove(digest)

    def record_usage(
        self,
        *,
        hits: int = 0,
        misses: int = 0,
        saved_seconds: float = 0.0,
        remote_hits: int = 0,
        remote_misses: int = 0,
        remote_errors: int = 0,
    ) -> None:
        """Adds to the namespace's usage counters on disk (``python -m isocache stats``)."""
        if not (hits or misses or remote_hits or remote_misses or remote_errors):
            return
        try:
            self.store.record_usage(
                hits=hits,
                misses=misses,
                saved_seconds=saved_seconds,
                remote_hits=remote_hits,
                remote_misses=remote_misses,
                remote_errors=remote_errors,
                timeout=0.2,  # a short wait: the counters are skipped rather than a compile delayed
            )
        except _core.CacheError as e:
            logger.debug("isocache: could not update the store's counters: %s", e)
