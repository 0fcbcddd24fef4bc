"""isocache: compile each distinct piece of a model once, share it everywhere.

A drop-in ``torch.compile`` backend: ``torch.compile(model, backend="isocache")``.
"""

from __future__ import annotations

from ._core import CacheError, InsecureStoreError, InvalidDigestError, StoreError
from ._core import __version__
from .backend import Backend
from .digest import explain, graph_digest
from .report import reset_stats, stats

__all__ = [
    "Backend",
    "CacheError",
    "InsecureStoreError",
    "InvalidDigestError",
    "StoreError",
    "__version__",
    "explain",
    "graph_digest",
    "reset_stats",
    "stats",
]
