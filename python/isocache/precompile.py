"""`isocache.compile(model)`: warm starts that skip Dynamo tracing.

The first process traces the model once (``fullgraph=True``) through torch's
ahead-of-time path with the isocache backend, and saves the result: Dynamo's
guards and bytecode, plus the *split graph and the digests of its pieces* (not
compiled code). A later process loads that entry without tracing and takes
every piece from the isocache store (index, local store, then Redis), so
models and processes keep sharing pieces.

An entry lives in the store like an artifact (checked, signed with
``ISOCACHE_KEY``), under a digest of what selects it (its *slot*): the model's
class, the input specs, torch and isocache versions and the namespace. It
records the model's configuration and structure and every fact its trace
depended on (`validity.py`); an entry is used only where all of them hold,
else the model is traced again (one INFO line says what differs). A slot
keeps up to eight variants (configurations, attribute values), the newest in
the slot, the others under their own digests. The entry also bundles a
copy of every distinct piece, so a warm start reads one file: the pieces come
from memory when this process has them, else from the bundle, else from the
store's tiers.

The entry's format is `entry.py`'s (torch-free, for the command line); what
it depends on is `validity.py`'s.
"""

from __future__ import annotations

import builtins
import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from typing import Any, Callable

import torch
import torch.fx

from . import _core
from ._once import warn_once
from ._torch import dynamo, guards, inductor
from .backend import Backend
from .entry import Entry, EntryRefused, entry_manifest, pack, unpack
from .marking import is_marked, mark_blocks, mark_stacks, marked_stacks, unmark_blocks
from .report import GraphReport, record_model_load
from .tiers.bundle import BundleTier
from .tiers.local import LocalTier
from .validity import Dependencies, Uncheckable, describe

__all__ = ["CompiledModel", "SplitGraphCallable", "compile", "entry_manifest"]

logger = logging.getLogger("isocache")

SPLIT_FORMAT = 1
#: Entries of one slot (model class, inputs, namespace) kept side by side: configurations and values differ.
_MAX_VARIANTS = 8


@dataclasses.dataclass(frozen=True)
class _Call:
    """The arguments of the call an entry is loaded or traced for."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class _Stale:
    """Why a saved variant does not fit, and how far its check got (the closest variant is reported)."""

    reason: str
    progress: int  # the index of the first fact that failed; -1: its configuration or structure


@dataclasses.dataclass
class _LoadContext:
    backend: Backend
    model_name: str
    #: The pieces the entry carries (None: an entry saved without them).
    bundle: BundleTier | None = None
    #: Filled while loading: the pieces' report, and seconds spent loading the pieces.
    report: GraphReport | None = None
    pieces_seconds: float = 0.0


# Set while a saved entry loads, so the pieces come from the right stores and
# report under the model's name. Torch calls deserialize without arguments.
_LOADING: contextvars.ContextVar[_LoadContext | None] = contextvars.ContextVar("isocache_loading", default=None)


def _function_from(source: str, name: str) -> Callable[..., Any]:
    scope: dict[str, Any] = {}
    exec(builtins.compile(source, f"<isocache {name}>", "exec"), scope)  # checked, signed store
    forward: Callable[..., Any] = scope["forward"]
    return forward


class _SplitRunner:
    """Runs a saved split graph: its forward, with pieces as attributes (no FX re-trace)."""

    def __init__(self, forward: Callable[..., Any], parts: dict[str, Callable[..., Any]]) -> None:
        self.__dict__.update(parts)
        self._forward = forward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._forward(self, *args, **kwargs)


class SplitGraphCallable(dynamo.SerializableCallable):
    """The isocache backend's output in torch's `SerializableCallable` form.

    It serializes the split graph's code and, for each compiled piece, its
    digest (never its compiled code); deserializing takes every piece from
    the isocache tiers through the backend's one reporting exit.
    """

    def __init__(
        self, graph: Callable[..., Any], pieces: list[tuple[str, str]], namespace: str, state: bytes | None = None
    ) -> None:
        self.graph = graph
        self.pieces = pieces
        self.namespace = namespace
        self._state = state

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph(*args, **kwargs)

    @classmethod
    def serialize_compile_artifacts(cls, fn: Any) -> bytes:
        if fn._state is not None:
            return bytes(fn._state)
        graph = fn.graph
        assert isinstance(graph, torch.fx.GraphModule)
        compiled = dict(fn.pieces)
        eager = {}
        returns_tuple = {}
        for node in graph.graph.nodes:
            if node.op != "call_module":
                continue
            # `_modules`, not getattr: the compiled pieces shadow the submodules.
            sub = graph._modules[str(node.target)]
            assert isinstance(sub, torch.fx.GraphModule)
            if node.target in compiled:
                returns_tuple[str(node.target)] = inductor.returns_tuple(sub)
            else:
                eager[str(node.target)] = dynamo.module_source(sub)
        return pickle.dumps(
            {
                "format": SPLIT_FORMAT,
                "namespace": fn.namespace,
                "pieces": fn.pieces,
                "returns_tuple": returns_tuple,
                "forward": dynamo.module_source(graph),
                "eager": eager,
            }
        )

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> SplitGraphCallable:
        state = pickle.loads(data)
        if not isinstance(state, dict) or state.get("format") != SPLIT_FORMAT:
            raise EntryRefused("the saved split graph has an unknown format")
        start = time.perf_counter()
        context = _LOADING.get() or _LoadContext(Backend(), "model")
        pieces: list[tuple[str, str]] = state["pieces"]
        parts: dict[str, Callable[..., Any]] = {
            name: functools.partial(_function_from(source, name), None) for name, source in state["eager"].items()
        }
        resolver = context.backend.resolver(state["namespace"], [context.bundle] if context.bundle else ())
        report = context.report = GraphReport(len(pieces), "saved", model_name=context.model_name)
        for index, (name, digest) in enumerate(pieces):
            with report.piece(index) as event:
                event.digest = digest
                fn = resolver.load(digest, bool(state["returns_tuple"][name]), event)
                if fn is None:
                    raise EntryRefused(f"piece {digest[:16]} is in no store (evicted?)")
            parts[name] = fn
        runner = _SplitRunner(_function_from(state["forward"], "split graph"), parts)
        context.pieces_seconds = time.perf_counter() - start
        return cls(runner, pieces, state["namespace"], data)


def serializable_backend(backend: Backend) -> Callable[[torch.fx.GraphModule, list[Any]], SplitGraphCallable]:
    """The backend for torch's aot_compile: isocache's pipeline, serializable output."""

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SplitGraphCallable:
        compiled = backend.compile_graph(gm, example_inputs)
        if compiled.graph is None or compiled.namespace is None:
            raise _core.CacheError("isocache is disabled (ISOCACHE_DISABLE); nothing to save")
        return SplitGraphCallable(compiled.graph, list(compiled.pieces), compiled.namespace)

    return compile_graph


def _spec(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        dynamic = dynamo.dynamic_dims(value)
        return {
            "dtype": str(value.dtype),
            "shape": [None if i in dynamic else int(s) for i, s in enumerate(value.shape)],
            "stride": [int(s) for s in value.stride()] if not dynamic else None,
            "device": value.device.type,
            "requires_grad": value.requires_grad,
        }
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_spec(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _spec(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def _manifest(model: torch.nn.Module | None) -> dict[str, str]:
    """What selects an entry's variant before anything is traced: the model's configuration and
    module structure (the code it runs and the values it reads are its recorded facts)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        config_text = config.to_json_string(use_diff=False)
    else:
        config_text = repr(config)
    structure: list[Any] = []
    if model is not None:
        structure = [(name, type(m).__qualname__, m.extra_repr()) for name, m in model.named_modules()] + [
            (name, str(p.dtype), list(p.shape)) for name, p in model.named_parameters()
        ]
    return {
        "config": _core.blake3_hex(config_text.encode()),
        "structure": _core.blake3_hex(json.dumps(structure).encode()),
    }


def _qualified(obj: Any) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def _slot(
    target: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    namespace: str,
    dynamic: bool | None,
    split: str,
) -> str:
    """The digest a saved entry is stored under (`target`: what is traced, and for which phase)."""
    key = {
        "isocache": _core.__version__,
        "torch": torch.__version__,
        "namespace": namespace,
        "class": target,
        "inputs": _spec([list(args), kwargs]),
        "dynamic": dynamic,
        "grad": torch.is_grad_enabled(),
        "split": split,
    }
    return _core.blake3_hex(json.dumps(key, sort_keys=True, default=str).encode())


@contextlib.contextmanager
def _loading(context: _LoadContext) -> Iterator[None]:
    token = _LOADING.set(context)
    try:
        yield
    finally:
        _LOADING.reset(token)


def _graph_break(e: BaseException) -> str:
    """The line of a Dynamo error that says what went wrong (its "Explanation:", else its first line)."""
    text = [line.strip() for line in str(e).strip().splitlines()]
    for line in text:
        if line.startswith("Explanation:"):
            return line.removeprefix("Explanation:").strip()
    return text[0] if text else type(e).__name__


_PLAIN = (bool, int, float, str, type(None))


def _call_form(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """What a call's guards do not check: how many positional arguments, which keywords, and the
    values of plain ones (tensors and other objects by type)."""
    return (
        tuple(a if isinstance(a, _PLAIN) else type(a) for a in args),
        tuple(sorted((k, v if isinstance(v, _PLAIN) else type(v)) for k, v in kwargs.items())),
    )


@dataclasses.dataclass
class GuardWarning:
    """Whether the warning for inputs outside what an entry was compiled for was given: once per
    compiled model (shared by a generation's entries), DEBUG after."""

    given: bool = False


class CompiledModel:
    """What `isocache.compile` returns for a module or a function: call it like the original.

    One saved entry: the module's ``__call__`` or `function` (called with the
    module as its first argument when there is one) traced for one family of
    inputs. `label` names the entry in log lines and its slot (a generation
    phase, see `generation.py`).
    """

    def __init__(
        self,
        model: torch.nn.Module | None,
        *,
        dynamic: bool | None,
        cache_dir: Any = None,
        split: str = "auto",
        function: Callable[..., Any] | None = None,
        label: str | None = None,
        backend: Backend | None = None,
        guard_warning: GuardWarning | None = None,
    ) -> None:
        if model is None and function is None:
            raise TypeError("isocache.compile needs a module or a function")
        self._model = model
        self._function = function  # traced with the model as its first argument; None: the model's __call__
        self._bound: tuple[Any, ...] = () if model is None else (model,)
        self._dynamic = dynamic
        self._backend = backend if backend is not None else Backend(cache_dir=cache_dir, split=split)
        self._compiled: Any = None  # the loaded or freshly traced AOT function
        self._fallback: Any = None  # torch.compile(model or function, backend=isocache), when needed
        self._guard_warning = guard_warning if guard_warning is not None else GuardWarning()
        self._call_form: tuple[Any, ...] = ()  # the first call's `_call_form`: what the entry serves
        self._training = False  # the model's mode at the first call: what the entry serves
        named = function if model is None else type(model)
        self._target = _qualified(named) + ("" if function is None or model is None else f".{function.__name__}")
        self._target += "" if label is None else f" ({label})"
        self._name = getattr(named, "__qualname__", "function") + ("" if label is None else f" ({label})")
        #: Seconds of each part of a warm start until its first call returns (empty when none is pending).
        self._warm_start: dict[str, float] = {}
        self._warm_report: GraphReport | None = None
        self._generation: Any = None  # generation.CompiledForward, made by the first generate()

    def __getattr__(self, name: str) -> Any:
        # Module-like: everything else is the model's (or the function's).
        target = self.__dict__["_model"]
        return getattr(target if target is not None else self.__dict__["_function"], name)

    def __repr__(self) -> str:
        return f"isocache.compile({self._name})"

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model

    @property
    def prepared(self) -> bool:
        """Whether the first call has loaded or traced this entry."""
        return self._compiled is not None or self._fallback is not None

    @property
    def ahead_of_time(self) -> bool:
        """Whether this entry runs a saved or freshly saved ahead-of-time function (not the plain backend)."""
        return self._compiled is not None

    def prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Loads or traces this entry for a call with `args` and `kwargs` without making the call (the
        first call does it otherwise)."""
        if not self.prepared:
            self._prepare(args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate`` (transformers), with prefill and decode steps run through compiled
        forwards, each a saved entry of its own (see `generation.py`)."""
        from .generation import CompiledForward

        model: Any = self._model
        if model is None or not callable(getattr(model, "generate", None)):
            raise AttributeError(f"{self._name} has no generate(): compile a transformers generation model")
        if self._generation is None:
            self._generation = CompiledForward(model, type(model).forward, dynamic=self._dynamic, backend=self._backend)
        with self._generation.routed():
            return model.generate(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is None and self._fallback is None:
            self._prepare(args, kwargs)
        if self._compiled is None:
            return self._fallback_call(args, kwargs)
        if _call_form(args, kwargs) != self._call_form:
            # Torch's saved guards check tensors, not which keywords a call passes or their plain values:
            # a call with ``output_hidden_states=True`` would run a graph traced without it.
            return self._outside(args, kwargs, "other arguments or argument values than it was compiled for")
        if self._model is not None and self._model.training is not self._training:
            # The saved guards do not check module state: the entry's facts did, once, before loading.
            return self._outside(args, kwargs, f"the model is in {'train' if self._model.training else 'eval'} mode")
        try:
            if not self._warm_start:
                return self._compiled(*self._bound, *args, **kwargs)
            start = time.perf_counter()
            try:
                return self._compiled(*self._bound, *args, **kwargs)
            finally:  # reported whether or not its inputs pass
                self._first_call_done(time.perf_counter() - start)
        except RuntimeError as e:
            if not dynamo.is_guard_failure(e):
                raise
            return self._outside(args, kwargs, _graph_break(e)[:200])

    def _outside(self, args: tuple[Any, ...], kwargs: dict[str, Any], why: str) -> Any:
        """A call this entry was not compiled for: the plain backend runs it (warned once)."""
        log = logger.debug if self._guard_warning.given else logger.warning
        self._guard_warning.given = True
        log("isocache: inputs outside what %s was compiled for (%s); compiling such calls normally", self._name, why)
        return self._fallback_call(args, kwargs)

    def _fallback_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._fallback is None:
            self._fallback = self._torch_compiled()
        try:
            return self._fallback(*self._fallback_bound, *args, **kwargs)
        except Exception as e:
            if not self._unmark_after(e):
                raise
            self._fallback = self._torch_compiled()
            return self._fallback(*self._fallback_bound, *args, **kwargs)

    def _torch_compiled(self) -> Any:
        """``torch.compile`` of what this entry traces, with the isocache backend (traced at every start)."""
        target = self._function if self._function is not None else self._model
        return torch.compile(target, backend=self._backend, dynamic=self._dynamic)

    @property
    def _fallback_bound(self) -> tuple[Any, ...]:
        return self._bound if self._function is not None else ()

    def _unmark_after(self, e: BaseException) -> bool:
        """After a failed trace: unmarks the model's blocks (one INFO line) so the next trace takes them one
        by one; False when none were marked (the failure is not theirs)."""
        if self._model is None or not is_marked(self._model):
            return False
        logger.info(
            "isocache: %s: its repeated blocks cannot be traced once (%s); tracing each block in place",
            self._name,
            _graph_break(e)[:300],
        )
        unmark_blocks(self._model)
        return True

    def _prepare(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._call_form = _call_form(args, kwargs)
        self._training = self._model is not None and self._model.training
        tensors = (a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor))
        device = next((t.device for t in tensors), torch.device("cpu"))
        if not dynamo.aot_compile_supported():
            self._backend.workers(device)  # warm while Dynamo traces
            if self._model is not None:
                mark_blocks(self._model)
            warn_once(
                "aot_compile",
                "isocache: isocache.compile's warm start (saving the traced model) needs torch >= %d.%d "
                "(this is %s); %s uses torch.compile(model, backend='isocache'), which traces at every start",
                *dynamo.AOT_COMPILE_SINCE,
                torch.__version__,
                self._name,
            )
            return
        namespace = self._backend.namespace_for(device)
        # Entries live in this machine's store only (they are small, and name pieces that every tier shares).
        entries = self._backend.local(namespace)
        checking = time.perf_counter()
        slot = _slot(self._target, args, kwargs, namespace, self._dynamic, self._backend.split)
        manifest = _manifest(self._model)
        call = _Call(args, kwargs)
        found = entries.get(slot) if entries is not None else None
        if entries is not None and found is not None:
            try:
                self._compiled = self._load_variant(found.value, entries, manifest, call, checking)
                return
            except EntryRefused as e:
                logger.info("isocache: not using the saved compiled %s: %s; tracing it again", self._name, e)
            except Exception as e:  # a bad entry is rebuilt, never fatal
                logger.warning(
                    "isocache: the saved compiled %s could not be loaded (%s: %s); rebuilding it",
                    self._name,
                    type(e).__name__,
                    e,
                )
        # Nothing saved: this process traces, each stack's block once where it can, while
        # compile workers pay Inductor's fixed cost.
        self._backend.workers(device)
        if self._model is not None:
            mark_blocks(self._model)
        previous = found.value if found is not None else None
        self._compiled = self._trace_and_save(call, manifest, entries, slot, previous)

    def _check_scope(self) -> dict[str, Any]:
        """The names the dependency check evaluates with (``___target``: a traced function itself)."""
        return dict(guards.check_scope(), ___target=self._function)

    def _traced(self) -> Any:
        return self._function if self._function is not None else self._model

    def _stale(self, entry: Entry, manifest: dict[str, Any], call: _Call) -> _Stale | None:
        """Why `entry` does not fit this model and call (None: it fits): its configuration, its module
        structure, or the first recorded fact that no longer holds."""
        saved = entry.manifest
        for key, what in (("config", "its configuration"), ("structure", "its module structure")):
            if saved.get(key) != manifest[key]:
                return _Stale(f"{what} changed since it was compiled", -1)
        try:
            dependencies = Dependencies.from_bytes(entry.dependencies)
        except ValueError as e:
            raise EntryRefused(f"its record of what it depends on is unreadable ({e})") from None
        stacks = saved.get("marked")
        if isinstance(stacks, list) and stacks and self._model is not None:
            # As when it was traced (its facts name the marked forwards).
            unequal = mark_stacks(self._model, stacks)
            if unequal is not None:
                return _Stale(unequal, -1)
        traced = self._traced()
        frame = guards.frame_locals(traced, self._bound, call.args, call.kwargs)
        scope = guards.root_globals(traced, saved.get("module_globals", {}))
        try:
            failure = dependencies.first_failure(frame, scope, self._check_scope())
        except (ValueError, EOFError, TypeError) as e:  # a record this Python cannot read
            raise EntryRefused(f"its record of what it depends on is unreadable ({e})") from None
        if failure is None:
            return None
        if stacks and self._model is not None:
            unmark_blocks(self._model)  # a trace marks the blocks that are repeated now
        return _Stale(describe(*failure), dependencies.facts.index(failure[0]))

    def _load_variant(
        self, data: bytes, entries: LocalTier, manifest: dict[str, Any], call: _Call, checking: float
    ) -> Any:
        """Loads the saved variant of this entry that fits: the slot's, else the first of the variants it
        lists whose configuration and recorded facts hold (one more read each)."""
        read = time.perf_counter() - checking
        entry = unpack(data)
        closest = self._stale(entry, manifest, call)
        if closest is None:
            return self._load(entry, read, time.perf_counter() - checking - read)
        others = [str(k) for k in entry.manifest.get("others", [])][:_MAX_VARIANTS]
        for key in others:
            hit = entries.get(key)
            if hit is None:
                continue
            try:
                other = unpack(hit.value)
            except EntryRefused:
                continue
            stale = self._stale(other, manifest, call)
            if stale is None:
                return self._load(other, read, time.perf_counter() - checking - read)
            closest = max(closest, stale, key=lambda s: s.progress)
        also = (
            f" (nor do the {len(others)} other saved variants)"
            if len(others) > 1
            else (" (nor does the other saved variant)" if others else "")
        )
        raise EntryRefused(closest.reason + also)

    def _load(self, entry: Entry, read_seconds: float, verify_seconds: float) -> Any:
        """Loads an entry whose facts hold (read in `read_seconds`, checked in `verify_seconds`); the warm
        start ends with its first call."""
        start = time.perf_counter()
        context = _LoadContext(self._backend, self._name, BundleTier(entry.bundle) if entry.bundle else None)
        with _loading(context):
            fn = dynamo.load_compiled_function(entry.compiled, self._load_globals(entry.manifest))
        self._warm_start = {
            "read": read_seconds,
            "verify": verify_seconds,
            "pieces": context.pieces_seconds,
            "guards": time.perf_counter() - start - context.pieces_seconds,
        }
        self._warm_report = context.report
        return fn

    def _first_call_done(self, seconds: float) -> None:
        """Reports a warm start once its first call returned: one INFO line, and `stats()`."""
        parts = dict(self._warm_start, first_call=seconds)
        self._warm_start = {}
        record_model_load(parts)
        summary = self._warm_report.summary() if self._warm_report is not None else f"isocache: loaded {self._name}"
        logger.info(
            "%s in %.3f s (%s)",
            summary,
            sum(parts.values()),
            ", ".join(f"{part.replace('_', ' ')} {value:.3f} s" for part, value in parts.items()),
        )

    def _load_globals(self, saved: dict[str, Any]) -> dict[str, Any]:
        """The forward's globals, plus the modules Dynamo bound under per-process
        names (``___module_collections_<id>_c0``) when the entry was saved."""
        model: Any = self._model
        traced: Any = self._function if self._function is not None else type(model).forward
        scope = dict(traced.__globals__)
        for name, module_name in saved.get("module_globals", {}).items():
            try:
                scope.setdefault(name, importlib.import_module(module_name))
            except ImportError as e:
                raise EntryRefused(f"module {module_name} it needs cannot be imported ({e})") from None
        return scope

    @staticmethod
    def _module_globals(compiled: Any, also: frozenset[str] | set[str] = frozenset()) -> dict[str, str]:
        """Module objects Dynamo bound as globals named by their id in this process
        (``___module_collections_<id>_c0``, and `also`: such names the recorded facts use): the
        loading process binds them again."""
        wanted, scopes = dynamo.module_globals_wanted(compiled)
        wanted |= also
        found: dict[str, str] = {}
        for scope in scopes + [vars(m) for m in list(sys.modules.values()) if m is not None]:
            for name in wanted - found.keys():
                value = scope.get(name)
                if isinstance(value, types.ModuleType):
                    found[name] = value.__name__
            if len(found) == len(wanted):
                break
        return found

    def _trace_and_save(
        self, call: _Call, manifest: dict[str, str], entries: LocalTier | None, slot: str, previous: bytes | None
    ) -> Any:
        start = time.perf_counter()
        dynamo.note_tracing_started()
        made: list[SplitGraphCallable] = []
        split_graph = serializable_backend(self._backend)

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SplitGraphCallable:
            made.append(split_graph(gm, example_inputs))
            return made[-1]

        recorder = guards.GuardRecorder()
        traced_code: list[types.CodeType] = []
        try:
            compiled = dynamo.aot_compile(
                self._traced(),
                backend,
                dynamic=self._dynamic,
                args=(*self._fallback_bound, *call.args),
                kwargs=call.kwargs,
                guard_filter=recorder,
                traced_code=traced_code,
            )
        except Exception as e:  # graph breaks and the like: plain isocache
            if self._unmark_after(e):
                return self._trace_and_save(call, manifest, entries, slot, previous)
            logger.warning(
                "isocache: %s cannot be compiled ahead of time as one graph (%s); "
                "using torch.compile(model, backend='isocache'), which traces at every start",
                self._name,
                _graph_break(e)[:300],
            )
            return None
        if entries is None:
            return compiled
        module_globals = self._module_globals(compiled, recorder.per_process_globals())
        try:
            dependencies = self._dependencies(recorder, traced_code, call, module_globals)
        except Uncheckable as e:
            logger.info("isocache: not saving the compiled %s: %s; it is traced again in every process", self._name, e)
            return compiled
        try:
            with tempfile.TemporaryDirectory(prefix="isocache-") as tmp:
                path = os.path.join(tmp, "compiled.bin")
                compiled.save_compiled_function(path)
                with open(path, "rb") as f:
                    data = f.read()
            # The piece map (which digest each piece has) is for `python -m isocache explain`.
            pieces = [digest for _, digest in made[-1].pieces] if made else []
            variant = _core.blake3_hex(
                f"{slot}:{manifest['config']}:{manifest['structure']}:{dependencies.digest()}".encode()
            )
            saved = dict(
                manifest,
                module_globals=module_globals,
                model=self._name,
                pieces=pieces,
                variant=variant,
                marked=marked_stacks(self._model) if self._model is not None else [],
                others=self._keep_previous(previous, variant, entries),
            )
            bundle = {d: (hit.value, hit.compile_seconds) for d in dict.fromkeys(pieces) if (hit := entries.peek(d))}
            packed = pack(saved, data, dependencies.to_bytes(), bundle)
            entries.put(slot, packed, time.perf_counter() - start, kind="model")
        except Exception as e:  # saving is best effort
            logger.warning("isocache: could not save the compiled %s (%s: %s)", self._name, type(e).__name__, e)
        return compiled

    def _dependencies(
        self,
        recorder: guards.GuardRecorder,
        traced_code: list[types.CodeType],
        call: _Call,
        module_globals: dict[str, str],
    ) -> Dependencies:
        """What the trace depended on, as facts checked once here, against the model they were recorded
        on. Raises `Uncheckable` for anything another process could not check."""
        facts = recorder.finish(traced_code, self._function)
        unbound = recorder.per_process_globals() - module_globals.keys()
        if unbound:
            raise Uncheckable(f"a guard names {sorted(unbound)[0]}, a global of this process that is not a module")
        dependencies = Dependencies(facts)
        traced = self._traced()
        frame = guards.frame_locals(traced, self._bound, call.args, call.kwargs)
        failure = dependencies.first_failure(frame, guards.root_globals(traced, module_globals), self._check_scope())
        if failure is not None:
            raise Uncheckable(f"its recorded facts do not hold right after tracing ({describe(*failure)})")
        return dependencies

    @staticmethod
    def _keep_previous(previous: bytes | None, variant: str, entries: LocalTier) -> list[str]:
        """The variants a new entry lists after itself: the one it replaces in the slot (kept under its own
        key) and those that one listed, newest first, at most `_MAX_VARIANTS`."""
        if previous is None:
            return []
        try:
            entry = unpack(previous)
        except (EntryRefused, ValueError):
            return []
        own = entry.manifest.get("variant")
        others = [str(k) for k in entry.manifest.get("others", [])]
        if isinstance(own, str) and own != variant:
            entries.put(own, previous, 0.0, kind="model")
            others.insert(0, own)
        return [k for k in dict.fromkeys(others) if k != variant][: _MAX_VARIANTS - 1]


def compile(
    model: torch.nn.Module | Callable[..., Any],
    *,
    dynamic: bool | None = None,
    cache_dir: Any = None,
    split: str = "auto",
) -> Any:
    """Compiles `model` with isocache; later processes load it without tracing.

    Takes what ``torch.compile`` takes: a module, a function, or a bound method
    such as ``model.forward``; use the result like the original. On its first
    call the compiled model is loaded from the store if it was saved for the
    same model source, configuration and input specs (no Dynamo tracing), else
    traced once with ``fullgraph=True`` and saved. Weights are passed at call
    time, never saved. `split` chooses how graphs are cut into pieces, as for
    `Backend` (``"auto"``, ``"attention"`` or ``"blocks"``).

    For a transformers generation model, ``isocache.compile(model).generate(...)``
    and ``model.forward = isocache.compile(model.forward)`` run prefill and each
    decode step through compiled forwards, saved as entries of their own: a
    later process generates without tracing (see `generation.py`).
    """
    if isinstance(model, torch.nn.Module):
        return CompiledModel(model, dynamic=dynamic, cache_dir=cache_dir, split=split)
    owner = getattr(model, "__self__", None)
    if isinstance(owner, torch.nn.Module) and isinstance(model, types.MethodType):
        from .generation import CompiledForward

        backend = Backend(cache_dir=cache_dir, split=split)
        return CompiledForward(owner, model.__func__, dynamic=dynamic, backend=backend)
    if not callable(model):
        raise TypeError(f"isocache.compile takes a module, a function or a bound method, not {type(model).__name__}")
    return CompiledModel(None, function=model, dynamic=dynamic, cache_dir=cache_dir, split=split)
