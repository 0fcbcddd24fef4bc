"""isocache: compile each distinct piece of a model once, share it everywhere.

A drop-in ``torch.compile`` backend: ``torch.compile(model, backend="isocache")``.
"""

from __future__ import annotations

from ._core import CacheError, InsecureStoreError, InvalidDigestError, StoreError
from ._core import __version__
from .digest import explain, graph_digest

__all__ = [
    "CacheError",
    "InsecureStoreError",
    "InvalidDigestError",
    "StoreError",
    "__version__",
    "explain",
    "graph_digest",
]
