"""Whole-store maintenance: every namespace under one root.

The size cap, the least-recently-used eviction and the root's running size
live in the Rust core (`_core.gc_root`, `_core.root_size`, and
`Store.put(..., max_bytes=...)`, which enforces the cap as it publishes);
the functions here are thin wrappers kept for callers that import them.
Configuration comes from `config.current()`.
"""

from __future__ import annotations

import logging
import os
from typing import Union

from . import _core, config

logger = logging.getLogger("isocache")

Root = Union[str, "os.PathLike[str]"]

__all__ = [
    "DEFAULT_MAX_BYTES",
    "GcResult",
    "default_root",
    "gc_root",
    "max_store_bytes",
    "open_stores",
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


#: What `gc_root` returns (kept as a name for callers that import it).
GcResult = _core.GcReport


def gc_root(root: Root, max_bytes: int) -> _core.GcReport:
    """Brings all namespaces under `root` down to at most `max_bytes`.

    Quarantined entries count toward the cap and go first (they are never
    loaded again), then the least recently used artifacts across namespaces:
    old namespaces (another torch version, another config) age out first
    because nothing loads their artifacts any more. `removed`/`remaining`
    count artifacts; the byte figures include the quarantine. One
    implementation, in Rust (`_core.gc_root`); it also rebuilds the root's
    running size from its scan.
    """
    if max_bytes < 0:
        raise ValueError(f"max_bytes must be at least 0, not {max_bytes}")
    return _core.gc_root(root, max_bytes)


def total_bytes(root: Root) -> int:
    """Bytes of every namespace's artifacts and quarantine under `root`.

    Reads the root's running size (O(1)); only a root without one yet is
    scanned. Reads only.
    """
    return _core.root_size(root).bytes
