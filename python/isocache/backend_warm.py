"""``torch.compile(model, backend="isocache")`` starts warm: the module's forward as an `isocache.compile` entry.

Dynamo calls a backend only after it traced, so a warm start has to take over
before Dynamo traces the compiled module's first frame. Torch 2.15 calls a
backend's ``_dynamo_backend_init`` while ``torch.compile`` resolves it, before
it wraps the model; there (`_on_resolve`) the model's instance gets a
``forward`` of its own (as `mark_blocks` gives blocks theirs): a function
Dynamo never traces (``torch._dynamo.disable``) that, for calls coming from a
module compiled with this backend, runs the model's class ``forward`` as a
`compiled_model.CompiledModel` entry (slot ``<class>.forward``): a saved entry
is loaded when its recorded facts hold (the same checks as
``isocache.compile``: code of every traced function wherever defined, values
specialised on, configuration, module structure, call form, train/eval),
otherwise Dynamo traces it once through torch's ahead-of-time capture and the
entry is saved. Calls an entry was not compiled for, and models that cannot be
traced as one graph, run ``torch.compile(<class>.forward, backend=isocache)``:
what the backend did before, tracing at every start. Eager calls of the model run the class
``forward`` untouched; calls from a module compiled with another backend run
it under that module's Dynamo context (traced as it would have been).

Experimental, so opt-in (``ISOCACHE_BACKEND_WARM=1``): the model gets an
instance ``forward`` (a whole-module ``torch.save`` of it no longer pickles),
each call from a compiled module inspects the stack, and a model that cannot
be captured as one graph pays a failed capture at every start.

Nothing is attached (the backend traces at every start, as before) without
``ISOCACHE_BACKEND_WARM=1``, on a torch
without the hook (2.11), without ahead-of-time capture, with ``ISOCACHE_DISABLE``,
for a function rather than a module, for a module with a ``forward`` of its own,
or for ``torch.compile`` arguments the entry cannot honour (``fullgraph=True``,
a mode, options, ``dynamic_shapes``...).

The entry point ``torch_dynamo_backends: isocache`` names `isocache_backend`
here, so the hook is attached whenever torch resolves the backend by name.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch

from . import config
from ._torch import dynamo
from .backend import check_compile_call, default_backend, isocache_backend
from .compiled_model import CompiledModel

__all__ = ["attached", "isocache_backend"]

logger = logging.getLogger("isocache")

_internal = threading.local()  # set while isocache itself calls torch.compile (its fallback): never attach


@contextlib.contextmanager
def _isocache_compiling() -> Iterator[None]:
    previous = getattr(_internal, "active", False)
    _internal.active = True
    try:
        yield
    finally:
        _internal.active = previous


def attached(model: torch.nn.Module) -> CompiledModel | None:
    """The entry behind `model`'s warm forward, once its first compiled call made one (None otherwise)."""
    forward = model.__dict__.get("forward")
    state = getattr(getattr(forward, "__func__", None), "_isocache_warm", None)
    return None if state is None else state.get("entry")


def _unsupported(call: dynamo.CompileCall) -> str | None:
    """Why this torch.compile call keeps tracing at every start (None: it can start warm)."""
    model = call.model
    if not isinstance(model, torch.nn.Module):
        return "not a module"
    if "forward" in model.__dict__:
        return "the module has a forward of its own"
    if not isinstance(getattr(type(model), "forward", None), types.FunctionType):
        return "its class forward is not a Python function"
    if call.fullgraph:
        return "fullgraph=True (an entry falls back to tracing with graph breaks)"
    if call.other:
        return f"torch.compile arguments {sorted(call.other)}"
    return None


def _on_resolve() -> None:
    """``_dynamo_backend_init``: torch.compile is resolving the isocache backend for a model now."""
    if getattr(_internal, "active", False):
        return
    check_compile_call()  # a bad mode or option fails here, at torch.compile, not at the first call
    cfg = config.current()
    if cfg.disable or not cfg.backend_warm:
        return
    if not (dynamo.backend_init_supported() and dynamo.aot_compile_supported()):
        return
    call = dynamo.compile_call()
    if call is None:
        return
    why = _unsupported(call)
    if why is not None:
        logger.debug("isocache: torch.compile(%s) traces at every start: %s", type(call.model).__name__, why)
        return
    model = call.model
    model.forward = types.MethodType(_warm_forward(call.dynamic), model)


def _warm_forward(dynamic: bool | None) -> Any:
    state: dict[str, Any] = {}

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        caller = dynamo.calling_compile()
        if caller is None:  # an eager call
            return type(self).forward(self, *args, **kwargs)
        context, backend = caller
        if backend is not isocache_backend:  # a module compiled with another backend: traced as it would be
            return context(type(self).forward)(self, *args, **kwargs)
        entry = state.get("entry")
        if entry is None or entry.model is not self:  # a copy (deepcopy keeps the bound method's state)
            entry = state["entry"] = CompiledModel(
                self, dynamic=dynamic, function=type(self).forward, backend=default_backend()
            )
        with _isocache_compiling():
            return entry(*args, **kwargs)

    forward._isocache_warm = state  # type: ignore[attr-defined]
    disabled: Any = torch.compiler.disable(forward)  # type: ignore[no-untyped-call]  # Dynamo never traces it: it calls what it needs compiled
    disabled._isocache_warm = state
    return disabled


isocache_backend._dynamo_backend_init = _on_resolve  # type: ignore[attr-defined]
