"""The store tiers one backend has opened: each once per store and namespace, shared by its threads.

The local store, the read-only base stores (``ISOCACHE_BASE``) and Redis each
cost an open (a checked walk, a connection); a backend opens each the first
time a namespace needs it and keeps it. What they are opened with (the root,
``config.current()``'s bases, Redis URL and key) is part of the key, so a
changed setting opens a new tier rather than reusing a stale one.
"""

from __future__ import annotations

import threading
from typing import Callable

from .. import config
from .base_store import BaseTier
from .local import LocalTier
from .redis import RedisTier

__all__ = ["OpenedTiers"]


class OpenedTiers:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Redis's own: a connection may take its timeout, and local lookups must not wait behind it.
        self._redis_lock = threading.Lock()
        self._locals: dict[tuple[str, str, bytes | None], LocalTier | None] = {}
        self._bases: dict[tuple[tuple[str, ...], str, bytes | None], BaseTier | None] = {}
        self._redis: dict[tuple[str | None, str, bytes | None], RedisTier] = {}

    def local(self, root: str, namespace: str, describe: Callable[[], str]) -> LocalTier | None:
        """The local store under `root` for `namespace` (None: it cannot be used, warned once); a store
        opened for the first time records `describe()` (what makes the namespace)."""
        key = (root, namespace, config.current().key)
        with self._lock:
            if key not in self._locals:
                tier = LocalTier.open(root, namespace, key[2])
                if tier is not None:
                    tier.describe(describe())
                self._locals[key] = tier
            return self._locals[key]

    def base(self, namespace: str) -> BaseTier | None:
        """The base stores' tier for `namespace`; None when ``ISOCACHE_BASE`` names none."""
        cfg = config.current()
        if not cfg.base:
            return None
        key = (tuple(str(p) for p in cfg.base), namespace, cfg.key)
        with self._lock:
            if key not in self._bases:
                self._bases[key] = BaseTier.open(cfg.base, namespace, cfg.key)
            return self._bases[key]

    def redis(self, url: str | None, namespace: str) -> RedisTier | None:
        """Redis at `url` (default ``ISOCACHE_REDIS_URL``) for `namespace`; None when off (warned once)."""
        cfg = config.current()
        key = (url or cfg.redis_url, namespace, cfg.key)
        with self._redis_lock:
            remote = self._redis.get(key)
            if remote is None:
                remote = RedisTier.configured(key[0], namespace, cfg.key)
                if remote is not None:  # a failed connection is tried again by the next chain
                    self._redis[key] = remote
            return remote
