"""isocache: compile each distinct piece of a model once, share it everywhere.

A drop-in ``torch.compile`` backend: ``torch.compile(model, backend="isocache")``.

``import isocache`` is cheap: the parts that need torch load on first use, so
the command line (``python -m isocache stats``) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._core import CacheError, InsecureStoreError, InvalidDigestError, InvalidKeyError, StoreError, __version__
from .report import reset_stats, stats

if TYPE_CHECKING:
    from .backend import Backend
    from .compile_workers import prewarm
    from .digest import explain, graph_digest
    from .marking import mark_blocks, unmark_blocks
    from .model_pieces import pieces
    from .precompile import compile

_LAZY = {
    "Backend": ".backend",
    "compile": ".precompile",
    "explain": ".digest",
    "graph_digest": ".digest",
    "mark_blocks": ".marking",
    "pieces": ".model_pieces",
    "unmark_blocks": ".marking",
    "prewarm": ".compile_workers",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'isocache' has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "Backend",
    "CacheError",
    "InsecureStoreError",
    "InvalidDigestError",
    "InvalidKeyError",
    "StoreError",
    "__version__",
    "compile",
    "explain",
    "graph_digest",
    "mark_blocks",
    "pieces",
    "prewarm",
    "reset_stats",
    "stats",
    "unmark_blocks",
]
