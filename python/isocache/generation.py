"""Generation through compiled forwards: prefill and decode, each a saved entry.

A transformers ``generate()`` calls the model's forward once for the prompt
(*prefill*: the KV cache is empty) and once per new token (*decode*: one new
token, a cache that grows by one each step). `CompiledForward` stands for the
model's forward and sends each call to the entry of its phase, an
`isocache.compile` entry (`compiled_model.CompiledModel`) that is saved and loaded
like any other, so a later process generates without Dynamo tracing:

- ``forward``: no cache passed (a plain forward call);
- ``prefill``: an empty cache; the prompt length is a symbolic size, so one
  entry serves every prompt of two tokens or more;
- ``decode``: one new token and a cache holding the earlier ones; the cache's
  sequence dimension is symbolic, so one entry serves every step;
- ``extend``: several new tokens on a non-empty cache (assisted decoding).

Dynamic shapes were chosen over transformers' static cache
(``cache_implementation="static"``): a static cache is sized by prompt length
plus ``max_new_tokens``, so another prompt or another number of new tokens
would need another graph, while symbolic sizes need one prefill and one decode
entry for all of them, and decoding never recompiles.

Two layout rules keep one decode entry valid for every step: the cache's
tensors are given dense strides before a decode call (after prefill they are
views of the projection's output; after the first ``torch.cat`` they are
dense; without this, the first step and the rest would differ in strides and
need two graphs), and only the sequence dimension of the cache's
``[batch, heads, sequence, head_dim]`` tensors is symbolic.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import types
from collections.abc import Iterator
from typing import Any, Callable

import torch

from ._torch import dynamo
from .backend import Backend
from .compiled_model import CompiledModel, GuardWarning

__all__ = ["CompiledForward", "GenerationModel", "phase_of"]

#: The keyword under which transformers passes the KV cache (5.x: ``cache``; 4.x: ``past_key_values``).
_CACHE_KWARGS = ("cache", "past_key_values")
#: Inputs whose dimension 1 is the new tokens' sequence: ``[batch, sequence]`` or ``[batch, sequence, hidden]``.
_TOKEN_KWARGS = ("input_ids", "inputs_embeds")
#: Per-token inputs whose last dimension is the sequence (they grow with the prompt or the cache).
_SEQUENCE_KWARGS = ("attention_mask", "position_ids", "cache_position", "token_type_ids")


def _cache_of(kwargs: dict[str, Any]) -> Any:
    for name in _CACHE_KWARGS:
        value = kwargs.get(name)
        if value is not None and callable(getattr(value, "get_seq_length", None)):
            return value
    return None


def _new_tokens(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    for name in _TOKEN_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            return int(value.shape[1])
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() >= 2:
        return int(args[0].shape[1])
    return None


def phase_of(args: tuple[Any, ...], kwargs: dict[str, Any], cache: Any = None) -> str:
    """The phase of a forward call: ``forward``, ``prefill``, ``decode`` or ``extend`` (see the module).
    `cache`: the call's KV cache when the caller found it already (`_cache_of`)."""
    cache = cache if cache is not None else _cache_of(kwargs)
    if cache is None:
        return "forward"
    if int(cache.get_seq_length()) == 0:
        return "prefill"
    return "decode" if _new_tokens(args, kwargs) == 1 else "extend"


def _cache_layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    return list(layers) if isinstance(layers, (list, tuple)) else []


def _dense_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _is_dense(value: torch.Tensor) -> bool:
    """Whether `value` has exactly the strides ``torch.cat`` gives its result. Stricter than
    ``is_contiguous()``, which ignores the strides of size-1 dimensions (a cache with one KV head), while
    the decode entry's guards check them."""
    return value.stride() == _dense_strides(value.shape)


def _dense_cache(cache: Any) -> None:
    """Gives the cache's key and value tensors the strides a decode step's ``torch.cat`` gives them (a copy
    only the first decode step after a prefill pays; later steps find the first layer's keys and values
    dense and stop there, as every layer's cache is made the same way)."""
    layers = _cache_layers(cache)
    first = [getattr(layers[0], name, None) for name in ("keys", "values")] if layers else []
    if all(not isinstance(value, torch.Tensor) or _is_dense(value) for value in first):
        return
    for layer in layers:
        for name in ("keys", "values"):
            value = getattr(layer, name, None)
            if isinstance(value, torch.Tensor) and not _is_dense(value):
                setattr(layer, name, value.clone(memory_format=torch.contiguous_format))


def _mark_sequences(args: tuple[Any, ...], kwargs: dict[str, Any], cache: Any) -> list[torch.Tensor]:
    """Marks as symbolic the sequence dimensions a phase's later calls change: the new tokens' (prompts
    of other lengths), the per-token inputs', and the cache's (one step to the next). Returns the
    tensors it marked."""
    marked: list[torch.Tensor] = []

    def mark(value: torch.Tensor, dim: int) -> None:
        dynamo.mark_dynamic(value, dim)
        marked.append(value)

    new = _new_tokens(args, kwargs)
    if new is not None and new >= 2:
        for value in [kwargs.get(name) for name in _TOKEN_KWARGS] + list(args[:1]):
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                mark(value, 1)
    length = int(cache.get_seq_length()) if cache is not None else 0
    for name in _SEQUENCE_KWARGS:
        value = kwargs.get(name)
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        if value.shape[-1] >= 2 and value.shape[-1] in (new, length + (new or 0)):
            mark(value, value.dim() - 1)
    if length >= 2:
        for layer in _cache_layers(cache):
            for name in ("keys", "values"):
                value = getattr(layer, name, None)
                if isinstance(value, torch.Tensor) and value.dim() >= 3 and value.shape[-2] == length:
                    mark(value, value.dim() - 2)
    return marked


class CompiledForward:
    """What ``isocache.compile(model.forward)`` returns, and what ``isocache.compile(model).generate``
    puts in the model's place while it generates: call it like ``model.forward``.

    Each phase (`phase_of`) is an entry of its own, made on its first call.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        function: Callable[..., Any],
        *,
        dynamic: bool | None,
        backend: Backend,
    ) -> None:
        self._model = model
        self._function = function
        self._dynamic = dynamic
        self._backend = backend
        self._entries: dict[str, CompiledModel] = {}
        self._guard_warning = GuardWarning()
        self._lock = threading.Lock()
        self._routed = 0  # generate() calls routing the model's forward here right now
        self._saved_forward: Any = None
        # transformers reads the forward's parameters (which inputs it accepts): show the model's.
        self.__signature__ = inspect.signature(types.MethodType(function, model))

    def __repr__(self) -> str:
        return f"isocache.compile({type(self._model).__qualname__}.{self._function.__name__})"

    @property
    def entries(self) -> dict[str, CompiledModel]:
        """The entries made so far, by phase."""
        return dict(self._entries)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        cache = _cache_of(kwargs)
        phase = phase_of(args, kwargs, cache)
        entry = self._entries.get(phase)
        if entry is None:
            with self._lock:
                entry = self._entries.setdefault(
                    phase,
                    CompiledModel(
                        self._model,
                        function=self._function,
                        label=phase,
                        dynamic=self._dynamic,
                        backend=self._backend,
                        guard_warning=self._guard_warning,
                    ),
                )
        if phase in ("decode", "extend"):
            _dense_cache(cache)
        if not entry.prepared:
            marked = _mark_sequences(args, kwargs, cache) if self._dynamic is not False and phase != "forward" else []
            try:
                with self._unrouted():
                    entry.prepare(args, kwargs)
            except BaseException:
                dynamo.clear_dynamic_marks(marked)
                raise
            # The marks select the entry (its slot) and shape a trace; a loaded entry's guards refuse
            # marked tensors, and a traced one no longer needs them. Without an ahead-of-time entry (an
            # older torch), they shape the plain backend's first trace instead.
            if entry.ahead_of_time:
                dynamo.clear_dynamic_marks(marked)
        return entry(*args, **kwargs)

    @contextlib.contextmanager
    def _unrouted(self) -> Iterator[None]:
        """The model without this object as its forward, while an entry traces or loads: Dynamo saves the
        model's attributes with the entry, and this object (which holds stores and locks) is not one to
        save; the entry's guards then describe the model as it is outside generation too."""
        routed = self._model.__dict__.get("forward") is self
        if routed:
            del self._model.forward
        try:
            yield
        finally:
            if routed:
                self._model.forward = self

    @contextlib.contextmanager
    def routed(self) -> Iterator[None]:
        """While open, the model's forward is this object (the model's own ``generate`` then runs prefill
        and decode through it); nested and concurrent uses share one routing."""
        with self._lock:
            if self._routed == 0:
                self._saved_forward = self._model.__dict__.get("forward")
                self._model.forward = self
            self._routed += 1
        try:
            yield
        finally:
            with self._lock:
                self._routed -= 1
                if self._routed == 0:
                    if self._saved_forward is None:
                        del self._model.forward
                    else:
                        self._model.forward = self._saved_forward
                    self._saved_forward = None


class GenerationModel(CompiledModel):
    """What `isocache.compile` returns for a transformers generation model: a `CompiledModel` whose
    ``generate`` runs prefill and decode steps through compiled forwards, each a saved entry."""

    def __init__(self, model: torch.nn.Module, *, dynamic: bool | None, backend: Backend) -> None:
        super().__init__(model, dynamic=dynamic, backend=backend)
        self._generation: CompiledForward | None = None  # made by the first generate()

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """The model's ``generate`` (transformers), with prefill and decode steps run through compiled
        forwards, each a saved entry of its own."""
        model: Any = self._model
        if self._generation is None:
            self._generation = CompiledForward(
                model, type(model).forward, dynamic=self._traced.dynamic, backend=self._backend
            )
        with self._generation.routed():
            return model.generate(*args, **kwargs)
