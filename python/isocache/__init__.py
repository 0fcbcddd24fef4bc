"""isocache: compile each distinct piece of a model once, share it everywhere.

A drop-in ``torch.compile`` backend: ``torch.compile(model, backend="isocache")``.

``import isocache`` is cheap: the parts that need torch load on first use, so
the command line (``python -m isocache stats``) does not import torch.
"""

from __future__ import annotations

import importlib
import types
from typing import TYPE_CHECKING, Any, Callable

from . import _log
from ._core import CacheError, InsecureStoreError, InvalidDigestError, InvalidKeyError, StoreError, __version__
from .report import reset_stats, stats

_log.install()  # no line reads "isocache:isocache: ..." (see _log.py)

if TYPE_CHECKING:
    from .backend import Backend
    from .compile_workers import prewarm
    from .digest import explain, graph_digest
    from .marking import mark_blocks, unmark_blocks
    from .model_pieces import pieces

_LAZY = {
    "Backend": ".backend",
    "explain": ".digest",
    "graph_digest": ".digest",
    "mark_blocks": ".marking",
    "pieces": ".model_pieces",
    "unmark_blocks": ".marking",
    "prewarm": ".compile_workers",
}


def compile(
    model: Any,
    *,
    dynamic: bool | None = None,
    cache_dir: Any = None,
    split: str = "auto",
    mode: str | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Compiles `model` with isocache; later processes load it without tracing.

    Takes what ``torch.compile`` takes: a module, a function, or a bound method
    such as ``model.forward``; use the result like the original. On its first
    call the compiled model is loaded from the store if it was saved for the
    same model source, configuration and input specs (no Dynamo tracing), else
    traced once with ``fullgraph=True`` and saved. Weights are passed at call
    time, never saved. `split` chooses how graphs are cut into pieces, as for
    `Backend` (``"auto"``, ``"attention"`` or ``"blocks"``). `mode` and `options` are
    ``torch.compile``'s, as the backend takes them (`Backend.configured`: checked here, a
    ValueError names what is wrong).

    For a transformers generation model, ``isocache.compile(model).generate(...)``
    and ``model.forward = isocache.compile(model.forward)`` run prefill and each
    decode step through compiled forwards, saved as entries of their own: a
    later process generates without tracing (see `generation.py`).
    """
    import torch

    from .backend import Backend
    from .compiled_model import CompiledModel
    from .generation import CompiledForward, GenerationModel

    backend = Backend(cache_dir=cache_dir, split=split).configured(mode=mode, options=options)
    if isinstance(model, torch.nn.Module):
        if callable(getattr(model, "generate", None)):
            return GenerationModel(model, dynamic=dynamic, backend=backend)
        return CompiledModel(model, dynamic=dynamic, backend=backend)
    owner = getattr(model, "__self__", None)
    if isinstance(owner, torch.nn.Module) and isinstance(model, types.MethodType):
        return CompiledForward(owner, model.__func__, dynamic=dynamic, backend=backend)
    if not callable(model):
        raise TypeError(f"isocache.compile takes a module, a function or a bound method, not {type(model).__name__}")
    function: Callable[..., Any] = model
    return CompiledModel(None, function=function, dynamic=dynamic, backend=backend)


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
