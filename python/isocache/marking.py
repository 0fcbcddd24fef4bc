"""Marking repeated blocks: have Dynamo trace each stack's block once.

Dynamo traces every layer of a 32-layer model one after another, and that
trace grows with depth. ``torch.compiler.nested_compile_region`` marks a
function whose calls Dynamo may trace once and call again (``invoke_subgraph``).
`mark_blocks` marks the blocks of each stack of one model instance (children
of a ``ModuleList``/``Sequential`` of one class with equal parameter shapes,
outermost stacks only: an encoder's and a decoder's stacks separately; what
a stack is, is `blocks.find_blocks`'s to say). The
backend inlines each region before cutting the graph (`_torch.fx.inline_regions`),
so pieces, digests and the steady-state forward are those of a whole trace.

A call whose arguments are not plain (tensors, numbers, strings, None and
tuples or lists of them) runs unmarked, traced in place, as without marking:
a block that updates a Python object cannot be replayed from one trace. One
such object is handled: a transformers ``DynamicCache`` whose layer for the
block holds nothing yet (a prefill, the first call of every model run with
``use_cache``). The block is traced once with a stand-in cache that returns
the new keys and values (what an empty ``DynamicLayer`` returns), and the
real cache is updated with them after the block, outside the traced region.
A cache that already holds tokens (a decode step) runs the block unmarked.

Dynamo replays a region's trace only if the region has no side effects. The
``kernels`` package's ``use_kernelized_func`` (transformers 5 decorates
attention with it) routes a function to the module's private kernel by setting
a global (``_ACTIVE_KERNEL_FUNCS``) around every forward: a side effect, so
each block was traced again. Where nothing is kernelized that routing selects
the function itself, so inside a marked block, while Dynamo traces, such a
module's forward runs without it (`_unrouted_forward`); everywhere else the
routed forward runs as before, and a block whose routing selects a kernel
runs unmarked.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import types
from typing import Any, Callable

import torch

from .blocks import find_blocks, stack_difference

__all__ = ["any_marked", "is_marked", "mark_blocks", "mark_stacks", "marked_stacks", "unmark_blocks"]

logger = logging.getLogger("isocache")

_MARK = "_isocache_block_forward"

#: Blocks marked in this process and not unmarked (the backend explains graphs that have none traced once).
_marked_count = 0


def any_marked() -> bool:
    return _marked_count > 0


# Loops, not generators: Dynamo traces this at every call, and generators cost it more.
def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        for v in value:  # noqa: SIM110
            if not _plain(v):
                return False
        return True
    return False


class _FreshLayerCache:
    """Stands in for a transformers ``DynamicCache`` inside a block traced once.

    Used only where the block's own cache layer is a ``DynamicLayer`` with
    nothing cached yet (a prefill): that layer's ``update`` returns the new
    keys and values themselves, which is what this returns. It keeps them, so
    the real cache is updated with them outside the traced block.
    """

    def __init__(self) -> None:
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys = key_states
        self.values = value_states
        return key_states, value_states


#: The names transformers gives a block's KV-cache parameter (``cache`` from 5.x, the older names before).
_CACHE_NAMES = ("cache", "past_key_values", "past_key_value")


@dataclasses.dataclass(frozen=True)
class _CacheParameter:
    """Where a block's forward takes its KV cache: by name, and at which position when passed positionally."""

    name: str
    position: int | None


def _cache_parameter(forward: Callable[..., Any]) -> _CacheParameter | None:
    try:
        parameters = list(inspect.signature(forward).parameters.values())[1:]  # after self
    except (TypeError, ValueError):
        return None
    for i, parameter in enumerate(parameters):
        if parameter.name in _CACHE_NAMES:
            positional = parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
            return _CacheParameter(parameter.name, i if positional else None)
    return None


def _fresh_dynamic_layer(value: Any, index: int) -> bool:
    """`value` is a transformers DynamicCache whose layer `index` is a DynamicLayer with nothing cached."""
    cls = type(value)
    if cls.__name__ != "DynamicCache" or not cls.__module__.startswith("transformers."):
        return False
    if getattr(value, "offloading", False):
        return False
    layers = getattr(value, "layers", None)
    if not isinstance(layers, list):
        return False
    if index >= len(layers):
        replicated = getattr(value, "layer_class_to_replicate", None)
        return replicated is not None and replicated.__name__ == "DynamicLayer"
    layer = layers[index]
    return type(layer).__name__ == "DynamicLayer" and not layer.is_initialized


def _prefill_region(
    nested: Callable[..., Any], plain: Callable[..., Any], cache: _CacheParameter, positional: bool
) -> Callable[..., Any]:
    """A block traced once that takes a fresh cache layer: it runs with a stand-in and returns the new keys and values."""
    name, position = cache.name, cache.position or 0

    def prefill(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        stand_in = _FreshLayerCache()
        if positional:
            args = (*args[:position], stand_in, *args[position + 1 :])
        else:
            kwargs[name] = stand_in
        out = plain(self, *args, **kwargs)
        keys, values = stand_in.keys, stand_in.values
        if keys is None or values is None:
            return out, None, None
        # A region's outputs may not alias each other (GPT-2's keys and values are views of one tensor).
        return out, keys.clone(), values.clone()

    marked: Callable[..., Any] = nested(prefill)
    return marked


def _marked_forward(nested: Callable[..., Any], plain: Callable[..., Any]) -> Callable[..., Any]:
    """One stack's forward: its block traced once where the call allows, else the block's own forward."""
    region = nested(_copy_function(plain))
    cache = _cache_parameter(plain)
    # Where the call may pass a prefill's cache: by keyword (`name`) or at `position`.
    name = cache.name if cache is not None else None
    position = cache.position if cache is not None else None
    by_name = by_position = region
    if cache is not None:
        by_name = _prefill_region(nested, _copy_function(plain), cache, positional=False)
        if position is not None:
            by_position = _prefill_region(nested, _copy_function(plain), cache, positional=True)

    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        # A block whose kernel routing selects a kernel runs unmarked: the region's trace (shared by the
        # stack) is made without the routing, and Dynamo's reuse of it does not check the kernels.
        routed = self.__dict__.get(_ROUTED)
        if routed is not None and torch.compiler.is_compiling():
            for module in routed:
                if not _routes_nothing(module):
                    return plain(self, *args, **kwargs)
        index = self.__dict__.get(_LAYER_INDEX)
        fresh = None  # the call's KV cache, when its layer for this block holds nothing yet
        by_keyword = False
        for key, value in kwargs.items():  # a cache object usually comes as a keyword
            if _plain(value):
                continue
            takes = fresh is None and key == name
            if not (takes and index is not None and _fresh_dynamic_layer(value, index)):
                return plain(self, *args, **kwargs)
            fresh, by_keyword = value, True
        for i, value in enumerate(args):
            if _plain(value):
                continue
            takes = fresh is None and i == position
            if not (takes and index is not None and _fresh_dynamic_layer(value, index)):
                return plain(self, *args, **kwargs)
            fresh = value
        if fresh is None:
            return region(self, *args, **kwargs)
        if by_keyword:
            kwargs = {k: v for k, v in kwargs.items() if k != name}
            out, keys, values = by_name(self, *args, **kwargs)
        else:
            at = position or 0
            args = (*args[:at], None, *args[at + 1 :])
            out, keys, values = by_position(self, *args, **kwargs)
        if keys is not None:  # the block updated its layer: the real cache gets the same keys and values
            fresh.update(keys, values, index)
        return out

    return forward


_LAYER_INDEX = "_isocache_layer_index"


def _layer_index(block: torch.nn.Module) -> int | None:
    """The block's ``layer_idx`` (transformers' index of its KV-cache layer), when it has exactly one."""
    found: set[int] = set()
    for module in block.modules():
        index = getattr(module, "layer_idx", None)
        if isinstance(index, int):
            found.add(index)
    return found.pop() if len(found) == 1 else None


def mark_blocks(model: torch.nn.Module) -> int:
    """Marks `model`'s repeated blocks so Dynamo traces each stack's block once; returns how many blocks.

    Changes only this instance (each block's ``forward`` attribute; eager
    behaviour is unchanged), and calling it again changes nothing. Use it
    before ``torch.compile(model, backend="isocache")``; `isocache.compile`
    does it itself. `unmark_blocks` undoes it.
    """
    marked = 0
    for name, blocks in find_blocks(model):
        count = _mark_stack(blocks)
        marked += count
        if count:
            logger.info(
                "isocache: %s: %d blocks of %s marked: Dynamo traces one and reuses it for calls that pass "
                "only tensors and plain values",
                name,
                count,
                type(blocks[0]).__qualname__,
            )
    return marked


def _mark_stack(blocks: list[torch.nn.Module]) -> int:
    """Marks one stack's unmarked blocks with one region function; returns how many."""
    global _marked_count
    nested = getattr(torch.compiler, "nested_compile_region", None)
    fresh = [block for block in blocks if _MARK not in block.__dict__]
    if nested is None or not fresh:
        return 0
    # One region function per stack: Dynamo reuses a region's trace for calls of the same function.
    forward = _marked_forward(nested, type(fresh[0]).forward)
    for block in fresh:
        block.forward = types.MethodType(forward, block)
        block.__dict__[_MARK] = True
        block.__dict__[_LAYER_INDEX] = _layer_index(block)
        routed = []
        for module in block.modules():
            if _kernel_routed(module):
                module.forward = types.MethodType(_unrouted_forward(module), module)
                module.__dict__[_UNROUTED] = True
                routed.append(module)
        if routed:
            block.__dict__[_ROUTED] = tuple(routed)
    _marked_count += len(fresh)
    return len(fresh)


def marked_stacks(model: torch.nn.Module) -> list[list[str]]:
    """The paths of `model`'s marked blocks, one list per stack (blocks that share a region function)."""
    stacks: dict[int, list[str]] = {}
    for name, module in model.named_modules():
        if module.__dict__.get(_MARK):
            stacks.setdefault(id(getattr(module.__dict__.get("forward"), "__func__", None)), []).append(name)
    return list(stacks.values())


def mark_stacks(model: torch.nn.Module, stacks: list[list[str]]) -> str | None:
    """Marks the blocks at these paths as `marked_stacks` listed them (a saved entry's record of how its
    model was traced). A stack is traced once, with its first block's plain attributes and shapes,
    and Dynamo guards them for that block only: so each stack's blocks must still be equal (as
    `blocks.find_blocks` compares them). Returns what differs, marking nothing, when they are not."""
    found: list[list[torch.nn.Module]] = []
    for paths in stacks:
        try:
            blocks = [model.get_submodule(path) for path in paths]
        except (AttributeError, TypeError):
            return f"{paths[0]}..{paths[-1]} is no longer a stack of blocks"
        difference = stack_difference(paths, blocks)
        if difference is not None:
            return f"the repeated blocks traced once differ now: {difference}"
        found.append(blocks)
    for blocks in found:
        _mark_stack(blocks)
    return None


def is_marked(model: torch.nn.Module) -> bool:
    """Whether any of `model`'s blocks is marked."""
    return any(_MARK in module.__dict__ for module in model.modules())


def unmark_blocks(model: torch.nn.Module) -> int:
    """Undoes `mark_blocks`; returns how many blocks were unmarked."""
    global _marked_count
    count = 0
    for module in model.modules():
        if module.__dict__.pop(_MARK, None):
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_LAYER_INDEX, None)
            module.__dict__.pop(_ROUTED, None)
            count += 1
        if module.__dict__.pop(_UNROUTED, None):
            module.__dict__.pop("forward", None)
    _marked_count = max(0, _marked_count - count)
    return count


_UNROUTED = "_isocache_unrouted_forward"
#: In a marked block's __dict__: its modules with ``kernels``' routing.
_ROUTED = "_isocache_kernel_routed"

#: ``kernels``' routing global (``_ACTIVE_KERNEL_FUNCS``), once a module routed by it is marked. A global
#: here, not a closure's or an attribute's value: a saved model's guards refer to it by name (it cannot
#: be pickled).
_kernel_routing_global: Any = None

#: One unrouted forward per routed one (a stack's blocks share it, as Dynamo's reuse needs one function).
_unrouted: dict[Callable[..., Any], Callable[..., Any]] = {}


def _kernel_routed(module: torch.nn.Module) -> bool:
    """Whether `module`'s class forward is ``kernels``' routing wrapper (``use_kernelized_func``), with the
    routing global `_kernel_routing_global` (recorded by the first such module)."""
    global _kernel_routing_global
    routed = type(module).forward
    if (
        not isinstance(routed, types.FunctionType)
        or not isinstance(getattr(routed, "__wrapped__", None), types.FunctionType)
        or routed.__code__.co_name != "new_forward"
        or not str(routed.__globals__.get("__name__", "")).startswith("kernels.")
        or not isinstance(module.__dict__.get("_kernel_funcs"), dict)
        or "forward" in module.__dict__
    ):
        return False
    routing = routed.__globals__.get("_ACTIVE_KERNEL_FUNCS")
    if not callable(getattr(routing, "get", None)):
        return False
    if _kernel_routing_global is None:
        _kernel_routing_global = routing
    return routing is _kernel_routing_global


def _routes_nothing(module: torch.nn.Module) -> bool:
    """While compiling: `module`'s routing selects the function itself, as when nothing is kernelized.

    That holds when no enclosing module routes a kernel (nothing active) and none of the module's
    private kernels has a forward of its own (``kernels``' own test, made while compiling).
    """
    if _kernel_routing_global.get() is not None:
        return False
    for kernel in module.__dict__["_kernel_funcs"].values():
        # Spelled so that Dynamo guards it (a test of the instance's __dict__ is not guarded).
        if kernel.forward.__func__ is not type(kernel).__dict__.get("forward"):
            return False
    return True


def _unrouted_forward(module: torch.nn.Module) -> Callable[..., Any]:
    """A forward that, while Dynamo traces and the routing selects nothing, calls the wrapped forward
    without the routing's global side effect; the routed forward otherwise (and always in eager)."""
    routed = type(module).forward
    found = _unrouted.get(routed)
    if found is None:
        direct: Callable[..., Any] = getattr(routed, "__wrapped__")  # noqa: B009

        def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
            if torch.compiler.is_compiling() and _routes_nothing(self):
                return direct(self, *args, **kwargs)
            return routed(self, *args, **kwargs)

        found = _unrouted[routed] = forward
    return found


def _copy_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of `fn` that `nested_compile_region` may annotate without touching the class's function."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy
