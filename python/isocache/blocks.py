"""Repeated blocks: find a model's stacks of identical layers and have Dynamo trace each stack's block once.

Dynamo traces every layer of a 32-layer model one after another, and that
trace grows with depth. ``torch.compiler.nested_compile_region`` marks a
function whose calls Dynamo may trace once and call again (``invoke_subgraph``).
`mark_blocks` marks the blocks of each stack of one model instance (children
of a ``ModuleList``/``Sequential`` of one class with equal parameter shapes,
outermost stacks only: an encoder's and a decoder's stacks separately). The
backend inlines each region before cutting the graph (`_torch.fx.inline_regions`),
so pieces, digests and the steady-state forward are those of a whole trace.

A call whose arguments are not plain (tensors, numbers, strings, None and
tuples or lists of them; a KV cache object, say) runs unmarked: a block that
updates a Python object cannot be replayed from one trace, and Dynamo traces
it in place, as without marking.
"""

from __future__ import annotations

import logging
import types
from typing import Any, Callable

import torch

__all__ = ["any_marked", "find_blocks", "mark_blocks", "unmark_blocks"]

logger = logging.getLogger("isocache")

_MARK = "_isocache_block_forward"

#: Blocks marked in this process and not unmarked (the backend explains graphs that have none traced once).
_marked_count = 0


def any_marked() -> bool:
    return _marked_count > 0


def _signature(module: torch.nn.Module) -> tuple[Any, ...]:
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return (type(module), params, buffers)


def find_blocks(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """Each outermost stack of repeated blocks: ``(name, its blocks)``.

    A stack is two or more children of one ``ModuleList`` or ``Sequential``
    with the same class and equal parameter and buffer shapes (T5's first
    block, which alone holds the relative position bias, stays out of its
    stack). Modules inside a stack's blocks are not searched: a block is
    traced once as a whole.
    """
    stacks: list[tuple[str, list[torch.nn.Module]]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        stacked: set[int] = set()
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            groups: dict[tuple[Any, ...], list[tuple[str, torch.nn.Module]]] = {}
            for name, child in module.named_children():
                if any(True for _ in child.parameters()):
                    groups.setdefault(_signature(child), []).append((name, child))
            for members in groups.values():
                if len(members) >= 2:
                    names = [n for n, _ in members]
                    label = f"{prefix or type(model).__name__}[{names[0]}..{names[-1]}]"
                    stacks.append((label, [m for _, m in members]))
                    stacked.update(id(m) for _, m in members)
        for name, child in module.named_children():
            if id(child) not in stacked:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return stacks


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


def _marked_forward(region: Callable[..., Any], plain: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        for value in kwargs.values():  # a cache object usually comes as a keyword
            if not _plain(value):
                return plain(self, *args, **kwargs)
        for value in args:
            if not _plain(value):
                return plain(self, *args, **kwargs)
        return region(self, *args, **kwargs)

    return forward


def mark_blocks(model: torch.nn.Module) -> int:
    """Marks `model`'s repeated blocks so Dynamo traces each stack's block once; returns how many blocks.

    Changes only this instance (each block's ``forward`` attribute; eager
    behaviour is unchanged), and calling it again changes nothing. Use it
    before ``torch.compile(model, backend="isocache")``; `isocache.compile`
    does it itself. `unmark_blocks` undoes it.
    """
    global _marked_count
    nested = getattr(torch.compiler, "nested_compile_region", None)
    if nested is None:
        return 0
    marked = 0
    for name, blocks in find_blocks(model):
        fresh = [block for block in blocks if _MARK not in block.__dict__]
        if not fresh:
            continue
        cls = type(fresh[0])
        plain = cls.forward
        # One region function per stack: Dynamo reuses a region's trace for calls of the same function.
        forward = _marked_forward(nested(_copy_function(plain)), plain)
        for block in fresh:
            block.forward = types.MethodType(forward, block)
            block.__dict__[_MARK] = True
        marked += len(fresh)
        logger.info(
            "isocache: %s: %d blocks of %s marked: Dynamo traces one and reuses it for calls that pass "
            "only tensors and plain values",
            name,
            len(fresh),
            cls.__qualname__,
        )
    _marked_count += marked
    return marked


def unmark_blocks(model: torch.nn.Module) -> int:
    """Undoes `mark_blocks`; returns how many blocks were unmarked."""
    global _marked_count
    count = 0
    for module in model.modules():
        if module.__dict__.pop(_MARK, None):
            module.__dict__.pop("forward", None)
            count += 1
    _marked_count = max(0, _marked_count - count)
    return count


def _copy_function(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A copy of `fn` that `nested_compile_region` may annotate without touching the class's function."""
    if not isinstance(fn, types.FunctionType):
        return fn
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__dict__.update(fn.__dict__)
    copy.__qualname__ = fn.__qualname__
    return copy
