"""Whole-store maintenance: every namespace under one root, least-recently-used first.

Configuration comes from `config.current()`; the functions below that read it
are thin wrappers kept for callers that import them from here.
"""

from __future__ import annotations

import logging
import os
from typing import NamedTuple, Union

from . import _core, config

logger = logging.getLogger("isocache")

Root = Union[str, "os.PathLike[str]"]

__all__ = [
    "max_store_bytes",
    "DEFAULT_MAX_BYTES",
    "default_root",
    "open_stores",
    "gc_root",
    "GcResult",
    "signing_key",
    "total_bytes",
]

DEFAULT_MAX_BYTES = config.DEFAULT_MAX_BYTES


def max_store_bytes() -> int:
    """The size cap (`ISOCACHE_MAX_BYTES`, parsed by `config`)."""
    return config.current().max_bytes


def default_root() -> str | None:
    """The store root (`ISOCACHE_DIR` or the user's cache directory); None when there is none."""
    directory = config.current().dir
    return None if directory is None else str(directory)


def signing_key() -> bytes | None:
    """The decoded `ISOCACHE_KEY`, or None when unset or unusable (`config` warned)."""
    return config.current().key


def open_stores(root: Root, writable: bool = False) -> list[tuple[str, _core.Store]]:
    """Every namespace's store under `root` (none when the root does not exist).

    Read-only by default: such a store creates, cleans and moves nothing. The
    root and its parent directories are checked either way
    (`InsecureStoreError` when someone else could write to them).
    """
    key = signing_key()
    return [(ns, _core.Store(root, ns, key, create=writable)) for ns in _core.list_namespaces(root)]


class GcResult(NamedTuple):
    removed: int
    freed_bytes: int
    remaining: int
    remaining_bytes: int


def gc_root(root: Root, max_bytes: int) -> GcResult:
    """Brings all namespaces under `root` down to at most `max_bytes`.

    Quarantined entries count toward the cap and go first (they are never
    loaded again), then the least recently used artifacts. Old namespaces
    (another torch version, another config) age out first because nothing
    loads their artifacts any more. `removed`/`remaining` count artifacts;
    the byte figures include the quarantine.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
    stores = open_stores(root, writable=True)
    for _, store in stores:
        store.gc(2**63)  # no eviction: stale temporary and lock files, quarantine past its age and caps
    entries: list[tuple[tuple[int, float], int, str, bool, _core.Store]] = []
    for _, store in stores:
        for name, size, quarantined_at in store.quarantine():
            entries.append(((0, quarantined_at), size, name, True, store))
        for digest, size, last_used, _ in store.list():
            entries.append(((1, last_used), size, digest, False, store))
    total = sum(e[1] for e in entries)
    artifacts = sum(1 for e in entries if not e[3])
    removed = freed = 0
    for _, size, name, quarantined, store in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if store.remove_quarantined(name) if quarantined else store.remove(name):
            total -= size
            freed += size
            removed += 0 if quarantined else 1
    return GcResult(removed, freed, artifacts - removed, total)


def total_bytes(root: Root) -> int:
    """Bytes of every namespace's artifacts and quarantine under `root` (reads only)."""
    return sum(store.total_bytes() for _, store in open_stores(root))
