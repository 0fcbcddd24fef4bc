"""Dynamo: ahead-of-time capture, saved compiled functions, guards, restarts.

Written against torch 2.11-2.15 (``torch.compile(...).aot_compile`` and
``torch.compiler.load_compiled_function`` are experimental there); the
``torch.compile`` call a backend is resolved for (`compile_call`) and the
backend a compiled module's call comes from (`called_from_backend`) against
torch 2.15 (``_dynamo_backend_init``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import threading
import time
import types
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.fx
from torch._dynamo.aot_compile_types import SerializableCallable

from . import release

__all__ = [
    "AOT_COMPILE_SINCE",
    "CompileCall",
    "SerializableCallable",
    "aot_compile",
    "aot_compile_supported",
    "backend_init_supported",
    "calling_compile",
    "clear_dynamic_marks",
    "compile_call",
    "dynamic_dims",
    "is_guard_failure",
    "is_restart",
    "load_compiled_function",
    "mark_dynamic",
    "module_globals_wanted",
    "module_source",
    "note_tracing_started",
    "saved_backend_output",
    "tracing_seconds",
    "watch_tracing",
]

_frame_started = threading.local()


def _on_compile_start(args: Any) -> None:
    if getattr(args, "callback_trigger", None) is torch._dynamo.callback.CallbackTrigger.DYNAMO:
        note_tracing_started()


def note_tracing_started() -> None:
    """This thread's Dynamo starts tracing a frame now (ahead-of-time capture runs no start callbacks)."""
    _frame_started.at = time.perf_counter()


def watch_tracing() -> None:
    """Notes when Dynamo starts tracing each frame, for `tracing_seconds` (idempotent).

    ``torch._dynamo.reset()`` forgets the callback; the backend calls this again
    after every graph. Written against torch 2.11-2.15
    (``torch._dynamo.callback_handler.register_start_callback``).
    """
    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is not None and _on_compile_start not in handler.start_callbacks:
        handler.register_start_callback(_on_compile_start)


def tracing_seconds() -> float | None:
    """Seconds since Dynamo started tracing the frame whose graph this thread handles, or None if unknown."""
    started: float | None = getattr(_frame_started, "at", None)
    _frame_started.at = None
    return None if started is None else time.perf_counter() - started


def is_restart(e: BaseException) -> bool:
    """Dynamo asks to trace the frame again (for example to specialize float inputs)."""
    try:
        from torch._dynamo.exc import RestartAnalysis
    except ImportError:  # pragma: no cover
        return False
    return isinstance(e, RestartAnalysis)


def is_guard_failure(e: BaseException) -> bool:
    """A loaded compiled function refused its inputs (its guards failed).

    Torch raises a plain RuntimeError for it; its text is the only mark.
    """
    return isinstance(e, RuntimeError) and "GuardManager check failed" in str(e)


#: The oldest torch whose ahead-of-time capture isocache.compile can save and load.
#: Shim, torch 2.11: ``aot_compile`` is attached only under
#: ``torch._dynamo.config.enable_aot_compile`` (default from 2.12), and even with it
#: the capture of a transformers model fails its external-reference check on
#: builtins ("Missing required external references: ['type']").
AOT_COMPILE_SINCE = (2, 12)


def aot_compile_supported() -> bool:
    return release() >= AOT_COMPILE_SINCE


def aot_compile(
    target: torch.nn.Module | Callable[..., Any],
    backend: Callable[..., Any],
    *,
    dynamic: bool | None,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    guard_filter: Callable[[list[Any]], list[bool]] = torch.compiler.keep_portable_guards_unsafe,
    traced_code: list[types.CodeType] | None = None,
) -> Any:
    """Traces a module's call, or a function, once (``fullgraph=True``) through torch's ahead-of-time path.

    The result is called with the module as its first argument (``compiled(model, *args)``), or, for a
    function, with the same arguments as the function. `guard_filter` chooses the guards saved with it
    (it must keep only guards another process can check); `traced_code`, when given, receives every
    code object Dynamo traced or inlined.
    """
    optimized: Any = torch.compile(
        target,
        fullgraph=True,
        dynamic=dynamic,
        backend=backend,
        options={"guard_filter_fn": guard_filter},
    )
    traced = optimized.forward if isinstance(target, torch.nn.Module) else optimized
    with _source_recorded_once_per_code(traced_code):
        return traced.aot_compile((args, kwargs))


def mark_dynamic(tensor: torch.Tensor, dim: int) -> None:
    """Traces `tensor`'s dimension `dim` as a symbolic size (one graph for every size >= 2)."""
    torch._dynamo.mark_dynamic(tensor, dim)


#: What ``torch._dynamo.mark_dynamic`` sets on a tensor (torch 2.11-2.15).
_MARKS = (
    "_dynamo_dynamic_indices",
    "_dynamo_dynamic_range",
    "_dynamo_hint_overrides",
    "_specialize_on",
    "_has_dynamo_dim_marking",
)


def clear_dynamic_marks(tensors: list[torch.Tensor]) -> None:
    """Removes `mark_dynamic`'s marks. Shim, torch 2.12-2.15: the guards of a loaded compiled function
    refuse a tensor that carries marks ("_has_dynamo_dim_marking is present on runtime tensor but was
    absent at compile time"), even when the marked dimension was saved as symbolic."""
    for tensor in tensors:
        for name in _MARKS:
            if name in tensor.__dict__:
                delattr(tensor, name)


_SOURCE_INFO_LOCK = threading.Lock()


@contextlib.contextmanager
def _source_recorded_once_per_code(traced_code: list[types.CodeType] | None = None) -> Iterator[None]:
    """Records each traced code object's source once, not once per call site.

    Shim, torch 2.11-2.15: ``aot_compile`` passes every traced code to
    ``SourceInfo.add_code``, once per inlined call, and each call reads and
    tokenizes the source again (``inspect.getsourcelines``): about 2 s of a
    64-layer model's cold start for a set that ends up with a few dozen
    entries. The same code object always yields the same entry, so skipping
    repeats saves the same record.
    """
    try:
        from torch._dynamo.package import SourceInfo
    except ImportError:  # pragma: no cover
        yield
        return
    original = SourceInfo.__dict__.get("add_code")
    # A capture that wants the traced code waits for another thread's; others share its patch.
    if original is None or not _SOURCE_INFO_LOCK.acquire(blocking=traced_code is not None):
        yield  # another thread is capturing: its patch dedups for both
        return
    seen: dict[int, set[Any]] = {}

    def add_code(self: Any, code: Any) -> None:
        codes = seen.setdefault(id(self), set())
        if code not in codes:
            codes.add(code)
            if traced_code is not None:
                traced_code.append(code)
            original(self, code)

    SourceInfo.add_code = add_code  # type: ignore[method-assign]
    try:
        yield
    finally:
        SourceInfo.add_code = original  # type: ignore[method-assign]
        _SOURCE_INFO_LOCK.release()


def load_compiled_function(data: bytes, f_globals: dict[str, Any]) -> Any:
    """A compiled function saved by ``save_compiled_function``, bound to `f_globals`."""
    return torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=f_globals)


def saved_backend_output(compiled: Any) -> Any:
    """What the backend returned when a loaded compiled function was traced, as torch rebuilt it
    (``deserialize_compile_artifacts``' result). Written against torch 2.12-2.15
    (``AOTCompiledFunction._artifacts.compiled_fn``)."""
    return getattr(getattr(compiled, "_artifacts", None), "compiled_fn", None)


def module_globals_wanted(compiled: Any) -> tuple[set[str], list[dict[str, Any]]]:
    """The per-process module globals a compiled function refers to (``___module_<name>_<id>_c0``)
    and the scopes it carries that may bind them."""
    env = getattr(getattr(compiled, "_artifacts", None), "runtime_env", None)
    wanted = {n for n in getattr(env, "external_refs", ()) if n.startswith("___module_")}
    return wanted, [getattr(compiled, "_extra_globals", None) or {}]


def module_source(gm: torch.fx.GraphModule) -> str:
    """A graph module's forward as standalone Python source (imports, then code)."""
    from torch.fx.graph_module import _format_import_block
    from torch.package.importer import sys_importer

    python_code = gm.recompile()
    return str(_format_import_block(python_code.globals, sys_importer)) + "\n" + python_code.src


def dynamic_dims(tensor: torch.Tensor) -> list[int]:
    """The dimensions marked dynamic (``torch._dynamo.mark_dynamic``) on an input."""
    return sorted(getattr(tensor, "_dynamo_dynamic_indices", ()) or ())


def backend_init_supported() -> bool:
    """Whether ``torch.compile`` calls a backend's ``_dynamo_backend_init`` while it resolves the backend,
    before it wraps the model (torch 2.15: ``torch._dynamo.eval_frame._maybe_fire_backend_init``, reached
    from ``_optimize``/``optimize_assert`` through ``get_compiler_fn``; torch 2.11 has no such hook)."""
    from torch._dynamo import eval_frame

    return hasattr(eval_frame, "_maybe_fire_backend_init") and hasattr(torch, "_TorchCompileWrapper")


@dataclasses.dataclass(frozen=True)
class CompileCall:
    """The arguments of the ``torch.compile`` call that is resolving a backend now."""

    model: Any
    fullgraph: bool
    dynamic: bool | None
    #: Arguments other than the model, fullgraph and dynamic that differ from torch.compile's defaults.
    other: dict[str, Any]


#: torch.compile's defaults for the arguments `CompileCall.other` reports (torch 2.15).
_COMPILE_DEFAULTS: dict[str, Any] = {
    "mode": "default",
    "options": None,
    "disable": False,
    "dynamic_shapes": None,
    "recompile_limit": None,
    "isolate_recompiles": False,
    "guard_filter_fn": None,
    "use_aoti": False,
    "name": None,
}


def compile_call() -> CompileCall | None:
    """From a backend's ``_dynamo_backend_init``: the ``torch.compile`` call resolving it (its frame, found
    by code identity a few frames up, read and never changed), or None (``torch._dynamo.optimize``, or
    a torch whose frames differ). Shim, torch 2.15: the hook gets no arguments, so the model is read from
    ``torch.compile``'s own frame, where ``mode`` is already ``"default"`` when none was given and
    ``options`` has lost ``guard_filter_fn`` and ``use_aoti`` to locals of the same name."""
    target = getattr(torch.compile, "__code__", None)
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(16):
        if frame is None:
            return None
        if frame.f_code is target:
            break
        frame = frame.f_back
    else:
        return None
    local = frame.f_locals
    if "model" not in local:
        return None
    other = {k: local.get(k, d) for k, d in _COMPILE_DEFAULTS.items() if local.get(k, d) != d}
    return CompileCall(local["model"], bool(local.get("fullgraph")), local.get("dynamic"), other)


def _compile_wrapper_code() -> types.CodeType | None:
    """The code of the function a compiled module's ``forward`` is (``_TorchDynamoContext.__call__``'s
    nested ``compile_wrapper``, torch 2.11-2.15)."""
    from torch._dynamo.eval_frame import _TorchDynamoContext

    for const in _TorchDynamoContext.__call__.__code__.co_consts:
        if isinstance(const, types.CodeType) and const.co_name == "compile_wrapper":
            return const
    return None


_WRAPPER_CODE: list[types.CodeType | None] = []


def calling_compile() -> tuple[Any, Any] | None:
    """The ``torch.compile``d module whose call is running now, as ``(its Dynamo context, its backend)``:
    the nearest ``compile_wrapper`` frame up the stack; None for an eager call. Written against torch
    2.15 (``_is_in_optimized_module``, ``innermost_backend``, ``_TorchCompileWrapper.compiler_fn``)."""
    from torch._dynamo import eval_frame

    if not eval_frame._is_in_optimized_module():
        return None
    if not _WRAPPER_CODE:
        _WRAPPER_CODE.append(_compile_wrapper_code())
    code = _WRAPPER_CODE[0]
    frame: types.FrameType | None = sys._getframe(1)
    for _ in range(12):
        if frame is None or code is None:
            return None
        if frame.f_code is code:
            local = frame.f_locals
            inner: Any = eval_frame.innermost_backend(local["callback"]) if "callback" in local else None
            return local.get("self"), getattr(inner, "compiler_fn", inner)
        frame = frame.f_back
    return None
