"""Whole-store maintenance: every namespace under one root, least-recently-used first."""

from __future__ import annotations

import logging
import os
from typing import NamedTuple

from . import _core

logger = logging.getLogger("isocache")

__all__ = ["max_store_bytes", "DEFAULT_MAX_BYTES", "default_root", "open_stores", "gc_root", "GcResult", "signing_key", "total_bytes"]


DEFAULT_MAX_BYTES = 10 * 1024**3
_SUFFIXES = {"k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def max_store_bytes() -> int:
    """`ISOCACHE_MAX_BYTES` (plain bytes, or with a K/M/G/T suffix); default 10 GiB."""
    raw = os.environ.get("ISOCACHE_MAX_BYTES", "").strip().lower().removesuffix("b").removesuffix("i")
    if not raw:
        return DEFAULT_MAX_BYTES
    try:
        if raw[-1] in _SUFFIXES:
            return int(float(raw[:-1]) * _SUFFIXES[raw[-1]])
        return int(raw)
    except ValueError:
        logger.warning("isocache: ignoring ISOCACHE_MAX_BYTES=%r (use bytes, e.g. 10G)", raw)
        return DEFAULT_MAX_BYTES


def default_root() -> str:
    return os.environ.get("ISOCACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "isocache")


def signing_key() -> bytes | None:
    secret = os.environ.get("ISOCACHE_KEY")
    return secret.encode() if secret else None


def open_stores(root: str) -> list[tuple[str, _core.Store]]:
    """Every namespace's store under `root` (none when the root does not exist)."""
    if not os.path.isdir(root):
        return []
    key = signing_key()
    return [(ns, _core.Store(root, ns, key)) for ns in _core.list_namespaces(root)]


class GcResult(NamedTuple):
    removed: int
    freed_bytes: int
    remaining: int
    remaining_bytes: int


def gc_root(root: str, max_bytes: int) -> GcResult:
    """Evicts the least recently used artifacts of all namespaces until at most `max_bytes` remain.

    Old namespaces (another torch version, another config) age out first
    because nothing loads their artifacts any more.
    """
    entries = []
    for _, store in open_stores(root):
        for digest, size, last_used, _ in store.list():
            entries.append((last_used, size, digest, store))
    total = sum(size for _, size, _, _ in entries)
    removed = freed = 0
    for _, size, digest, store in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        if store.remove(digest):
            total -= size
            removed += 1
            freed += size
    for _, store in open_stores(root):
        store.gc(2**63)  # no eviction: only stale temporary and lock files
    return GcResult(removed, freed, len(entries) - removed, total)


def total_bytes(root: str) -> int:
    return sum(store.total_bytes() for _, store in open_stores(root))
