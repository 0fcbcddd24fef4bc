"""A light runtime for the wrapper code of saved pieces.

Inductor's generated wrapper module (the Python that calls a piece's
kernels) imports ``extern_kernels`` from ``torch._inductor.select_algorithm``
and ``align`` from ``torch._inductor.codegen.memory_planning``. Both modules
belong to Inductor's *compiler* (lowerings, templates, code generation) and
take about 0.55 s to import, the largest single cost of a warm start, while a
loaded piece only calls a few torch functions through them.

When a piece is saved, `lighten` rewrites those two import lines of its
wrapper source: ``extern_kernels`` becomes `extern_kernels` here (the torch
functions Inductor registers under the same names, resolved on first use,
with Inductor's own namespace imported for any other name) and ``align``
comes from ``torch._inductor.utils``, where memory_planning takes it from.
Artifacts saved without the rewrite load as before. Written against torch
2.11-2.15 (``BundledAOTAutogradResult.compiled_fw.result``, a
``CompiledFxGraph`` with ``source_code`` and ``cache_key``); the tests check
every stand-in against the installed torch.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pickle
import sys
import threading
import types
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "EXTERN_TORCH_FUNCTIONS",
    "HEAVY_MODULES",
    "LIGHT_IMPORTS",
    "extern_kernels",
    "graph_lowering_deferred",
    "imported_heavy_modules",
    "lighten",
    "select_decomp_table",
]

logger = logging.getLogger("isocache")

#: Each heavy import line of a wrapper module and the line that replaces it.
LIGHT_IMPORTS = {
    "from torch._inductor.select_algorithm import extern_kernels": "from isocache._torch.runtime import extern_kernels",
    "from torch._inductor.codegen.memory_planning import _align as align": (
        "from torch._inductor.utils import _align as align"
    ),
}

#: The modules of Inductor's compiler that loading a lightened piece does not import (a stand-in
#: may stand in ``sys.modules`` for one of them: `imported_heavy_modules` tells them apart).
HEAVY_MODULES = (
    "torch._inductor.select_algorithm",
    "torch._inductor.codegen.memory_planning",
    "torch._inductor.lowering",
    "torch._inductor.graph",
    "torch._inductor.debug",
    "torch._inductor.decomposition",
    "torch._functorch.partitioners",
)


def imported_heavy_modules() -> list[str]:
    """The `HEAVY_MODULES` this process has imported (their real modules, not stand-ins)."""
    return [name for name in HEAVY_MODULES if type(sys.modules.get(name)) is types.ModuleType]


#: Inductor's extern kernels that are the torch function of that name (``extern_kernels.mm is torch.mm``),
#: by the name the wrapper calls.
EXTERN_TORCH_FUNCTIONS = {
    "mm": "mm",
    "mm_dtype": "mm",
    "addmm": "addmm",
    "bmm": "bmm",
    "bmm_dtype": "bmm",
    "baddbmm": "baddbmm",
    "convolution": "convolution",
    "_int_mm": "_int_mm",
}


class _ExternKernels:
    """``extern_kernels`` for lightened wrappers: torch functions, else Inductor's own namespace."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = EXTERN_TORCH_FUNCTIONS.get(name)
        if target is not None:
            value = getattr(torch, target)
        else:
            from torch._inductor.select_algorithm import extern_kernels as inductors

            logger.debug("isocache: extern kernel %s comes from Inductor's select_algorithm", name)
            value = getattr(inductors, name)
        setattr(self, name, value)  # resolved once
        return value


extern_kernels = _ExternKernels()


def select_decomp_table() -> Any:
    """Inductor's decomposition table, its module imported only when asked for.

    A compiled graph keeps the function that selects it (``fx_kwargs["get_decomp_fn"]``) for a
    recompile; a reference to Inductor's own would import ``torch._inductor.decomposition``
    (0.14 s) when the piece loads.
    """
    from torch._inductor.decomposition import select_decomp_table as inductors

    return inductors()


_INDUCTORS_DECOMP_FN = ("torch._inductor.decomposition", "select_decomp_table")


def lighten(bundle: bytes) -> bytes:
    """A bundled artifact's bytes (``AOTCompiledArtifact.serialize``) with its wrappers' heavy imports
    rewritten and `select_decomp_table` in place of Inductor's; the bytes unchanged where the bundle
    is not laid out as this torch lays it out."""
    try:
        data = pickle.loads(bundle)  # bytes this process just made
        entry = data[0] if isinstance(data, tuple) else data
        graphs = [getattr(getattr(entry, part, None), "result", None) for part in ("compiled_fw", "compiled_bw")]
        changed = False
        for graph in graphs:
            if graph is not None and isinstance(getattr(graph, "source_code", None), str):
                changed |= _lighten_graph(graph)
        return pickle.dumps(data) if changed else bundle
    except Exception as e:  # the heavy imports still work
        logger.debug("isocache: wrapper imports not rewritten (%s: %s)", type(e).__name__, e)
        return bundle


def _lighten_graph(graph: Any) -> bool:
    from torch._inductor.codecache import code_hash

    kwargs = getattr(graph, "fx_kwargs", None)
    decomp_fn = kwargs.get("get_decomp_fn") if isinstance(kwargs, dict) else None
    light_decomp = (
        getattr(decomp_fn, "__module__", None),
        getattr(decomp_fn, "__name__", None),
    ) == _INDUCTORS_DECOMP_FN
    if light_decomp:
        kwargs["get_decomp_fn"] = select_decomp_table  # type: ignore[index]
    lines = graph.source_code.split("\n")
    rewritten = [LIGHT_IMPORTS.get(line, line) for line in lines]
    if rewritten == lines:
        return light_decomp
    graph.source_code = "\n".join(rewritten)
    # The loader writes the source to a file named by the key, unless that file exists:
    # a new key keeps it from running the unrewritten module another compile wrote there.
    graph.cache_key = code_hash(graph.source_code)
    return True


_GRAPH = "torch._inductor.graph"


class _NoOutputCodeHook:
    """What loading reads of ``GraphLowering``: its test hook, unset."""

    save_output_code = None


_STAND_IN_LOCK = threading.RLock()


def _real_module(name: str, stand_in: types.ModuleType) -> types.ModuleType:
    """The real module `name`, imported in place of `stand_in`; importing it also replaces the
    package's attribute. One thread at a time, so that a stand-in is replaced once."""
    with _STAND_IN_LOCK:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        return importlib.import_module(name)


class _DeferredGraphModule(types.ModuleType):
    """``torch._inductor.graph`` while a piece loads: the loading thread reads ``GraphLowering``'s
    output-code hook from it; any other use imports the real module and forwards to it."""

    def __init__(self, loader: int) -> None:
        super().__init__(_GRAPH)
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        if name == "GraphLowering" and threading.get_ident() == self._loader:
            return _NoOutputCodeHook
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_module(_GRAPH, self), name)


_DEBUG = "torch._inductor.debug"
_RECORD_SWITCH = "RECORD_GRAPH_EXECUTION"


class _DeferredDebugModule(types.ModuleType):
    """``torch._inductor.debug`` until something needs more than a compiled graph's call reads.

    A loaded graph reads ``RECORD_GRAPH_EXECUTION`` (a switch for torch's own
    tests, off by default) at every call; importing the module for it costs
    0.3 s (it brings AOTAutograd's partitioner and networkx). Any other read or
    any write imports the real module, which replaces this one everywhere.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        # An entry of its own, read as fast as a real module's (every call of a compiled graph reads it).
        vars(self)[_RECORD_SWITCH] = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(_real_debug_module(self), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(_real_debug_module(self), name, value)


def _real_debug_module(stand_in: types.ModuleType) -> types.ModuleType:
    vars(stand_in).pop(_RECORD_SWITCH, None)  # a reference kept to the stand-in reads the real switch
    return _real_module(_DEBUG, stand_in)


def _defer_debug_module() -> None:
    with _STAND_IN_LOCK:
        if _DEBUG in sys.modules:
            return
        stand_in = _DeferredDebugModule(_DEBUG)
        sys.modules[_DEBUG] = stand_in
        vars(sys.modules["torch._inductor"])["debug"] = stand_in


@contextlib.contextmanager
def graph_lowering_deferred() -> Iterator[None]:
    """Loads pieces without importing ``torch._inductor.graph`` (Inductor's lowering, 0.4 s).

    Shim, torch 2.11-2.15: after loading a cached graph, Inductor imports
    ``GraphLowering`` only to read a test hook (``save_output_code``, None
    unless a test of torch's sets it, which imports the module first). While
    the module is not imported, this thread finds a stand-in with the hook
    unset; other threads that import the module meanwhile get the real one.
    ``torch._inductor.debug``, which that import used to bring and compiled
    graphs read at run time, is a stand-in until something else needs it.
    """
    _defer_debug_module()
    package = sys.modules["torch._inductor"]
    if _GRAPH in sys.modules:
        yield
        return
    stand_in = _DeferredGraphModule(threading.get_ident())
    sys.modules[_GRAPH] = stand_in
    package.graph = stand_in  # type: ignore[attr-defined]
    try:
        yield
    finally:
        if sys.modules.get(_GRAPH) is stand_in:
            del sys.modules[_GRAPH]
        if getattr(package, "graph", None) is stand_in:
            del package.graph
