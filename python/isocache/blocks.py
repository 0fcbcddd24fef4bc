"""What a repeated block is: found in a module, keyed in a Dynamo graph, and explained when reuse is lost.

A repeated block is one of two or more parts of a model that run the same
code on the same shapes, so that one compiled piece serves them all (a
transformer's layers, a ResNet stage's residual blocks). isocache meets them
three times, and each time it groups candidates by a signature and keeps the
groups that repeat (`_repeats`):

- in a module, before tracing (`find_blocks`, for marking): the children of
  one ``ModuleList``/``Sequential`` with equal `_module_signature` (class,
  parameter and buffer shapes and dtypes, plain attributes other than
  ``layer_idx``); the outermost stacks only;
- in a traced graph (`block_keys`, for ``split="blocks"``/``"auto"``): the
  children of an indexed container on Dynamo's ``nn_module_stack`` with
  equal `_node_shape`s (ops and value shapes), counted across every instance
  of the container (``stages.*.layers``); a node belongs to the outermost
  repeated block on its path;
- among a graph's compiled pieces (`reuse_lost`, one INFO hint): pieces
  between the first and the last with one `_op_sequence`.

The signatures differ on purpose, each the one its stage can see and needs.
A module is compared before anything runs, so by what it holds; a graph by
what its nodes do. `reuse_lost` looks for blocks that *should* share a digest
but do not, so it compares ops only (a per-layer constant is exactly what it
looks for) and then drops groups whose first two pieces differ in a shape
(`_NOT_REPEATS`: blocks of different widths, not repeats). It also asks for
three pieces, not two: a hint about one pair would mostly be noise.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterable, Sequence
from typing import Any, Callable, TypeVar

import torch
import torch.fx

from .digest import explain, target_name

__all__ = ["block_keys", "find_blocks", "reuse_lost", "stack_difference"]

T = TypeVar("T")


def _repeats(items: Iterable[T], signature: Callable[[T], Hashable], at_least: int = 2) -> list[list[T]]:
    """`items` grouped by equal `signature`, in order of each group's first item; groups of `at_least` or more."""
    groups: dict[Hashable, list[T]] = {}
    for item in items:
        groups.setdefault(signature(item), []).append(item)
    return [members for members in groups.values() if len(members) >= at_least]


# -- in a module ----------------------------------------------------------------

#: Per-layer attributes that only name the block's KV-cache layer (which marking's stand-in cache handles).
_INDEX_ATTRIBUTES = frozenset({"layer_idx", "training"})


def _constants(module: torch.nn.Module) -> tuple[Any, ...]:
    """Each submodule's plain attributes (a scaling, a window size, a flag): a block traced once bakes
    them in, so blocks that differ in one are not one stack."""
    found = []
    for name, sub in module.named_modules():
        for key, value in sorted(sub.__dict__.items()):
            if key in _INDEX_ATTRIBUTES or key.startswith("_"):
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                found.append((name, key, value))
            elif isinstance(value, (tuple, list)) and all(isinstance(v, (bool, int, float, str)) for v in value):
                found.append((name, key, repr(tuple(value))))
    return tuple(found)


def _module_signature(module: torch.nn.Module) -> tuple[Any, ...]:
    params = tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters())
    buffers = tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers())
    return (type(module), params, buffers, _constants(module))


def find_blocks(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Module]]]:
    """Each outermost stack of repeated blocks: ``(name, its blocks)``.

    A stack is two or more children of one ``ModuleList`` or ``Sequential``
    with the same class, equal parameter and buffer shapes and equal plain
    attributes other than ``layer_idx`` (T5's first block, which alone holds
    the relative position bias, stays out of its stack; GPT-2 blocks whose
    attention scales by the layer index are not a stack). Modules inside a stack's blocks are not searched: a block is
    traced once as a whole.
    """
    stacks: list[tuple[str, list[torch.nn.Module]]] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        stacked: set[int] = set()
        if isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
            for members in _repeats(children, lambda child: _module_signature(child[1])):
                names = [n for n, _ in members]
                label = f"{prefix or type(model).__name__}[{names[0]}..{names[-1]}]"
                stacks.append((label, [m for _, m in members]))
                stacked.update(id(m) for _, m in members)
        for name, child in module.named_children():
            if id(child) not in stacked:
                visit(f"{prefix}.{name}" if prefix else name, child)

    visit("", model)
    return stacks


def stack_difference(paths: Sequence[str], blocks: Sequence[torch.nn.Module]) -> str | None:
    """The first way the blocks at `paths` are no longer one stack (as `find_blocks` compares them),
    readable; None when they still are."""
    first = _module_signature(blocks[0])
    for path, block in zip(paths[1:], blocks[1:]):
        other = _module_signature(block)
        if other != first:
            return _difference(paths[0], first, path, other)
    return None


def _difference(name_a: str, a: tuple[Any, ...], name_b: str, b: tuple[Any, ...]) -> str:
    """The first way two blocks' `_module_signature`s differ, readable."""
    if a[0] is not b[0]:
        return f"{name_b} is a {b[0].__qualname__}, {name_a} a {a[0].__qualname__}"
    constants_a, constants_b = dict(((n, k), v) for n, k, v in a[3]), dict(((n, k), v) for n, k, v in b[3])
    for key in [*constants_a, *constants_b]:
        if constants_a.get(key) != constants_b.get(key):
            attribute = ".".join(p for p in (key[0], key[1]) if p)
            return f"{name_b}.{attribute} is {constants_b.get(key)!r}, {name_a}.{attribute} is {constants_a.get(key)!r}"
    return f"{name_b}'s parameter or buffer shapes differ from {name_a}'s"


# -- in a traced graph ------------------------------------------------------------

#: A block in a graph: (its container's path, its index there).
GraphBlock = tuple[str, int]


def _indexed_path(path: str) -> GraphBlock | None:
    """``("L['self'].layers", 3)`` for ``"L['self'].layers.3"`` or ``"L['self'].layers[3]"``; else None."""
    path = path.rstrip()
    if path.endswith("]"):
        head, _, index = path[:-1].rpartition("[")
    else:
        head, _, index = path.rpartition(".")
    if not head or not index.isdigit():
        return None
    return head, int(index)


def _block_chain(node: torch.fx.Node) -> list[GraphBlock]:
    """The indexed-container children on `node`'s module path, outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    chain = []
    for value in stack.values():
        path = value[0] if isinstance(value, tuple) else None
        block = _indexed_path(path) if isinstance(path, str) else None
        if block is not None and block not in chain:
            chain.append(block)
    return chain


def _pattern(container: str) -> str:
    """A container's path with block indices wildcarded: ``stages.1.layers`` -> ``stages.*.layers``."""
    return re.sub(r"\.\d+(?=\.|$)|\[\d+\]", ".*", container)


def _value_shape(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return (str(tuple(value.shape)), str(value.dtype))
    if isinstance(value, (tuple, list)):
        return tuple(_value_shape(v) for v in value)
    return type(value).__name__


def _node_shape(node: torch.fx.Node) -> tuple[Any, ...]:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", repr(node.target))
    return (node.op, target, _value_shape(node.meta.get("example_value", node.meta.get("val"))))


def _separated_by_ops(
    gm: torch.fx.GraphModule,
    members: dict[GraphBlock, list[torch.fx.Node]],
    with_op: set[GraphBlock],
    splitting: set[torch.fx.Node],
) -> set[str]:
    """Container patterns whose consecutive blocks always have a splitting op between them: the
    attention cuts already separate those blocks, and cutting them again would only split fusions."""
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    ops = [position[n] for n in splitting]
    spans: dict[str, list[tuple[int, int]]] = {}
    for block, nodes in members.items():
        if block not in with_op:
            spans.setdefault(block[0], []).append((position[nodes[0]], position[nodes[-1]]))
    gaps_without_op: dict[str, bool] = {}
    for container, found in spans.items():
        found.sort()
        pattern = _pattern(container)
        for (_, end), (start, _) in zip(found, found[1:]):
            if not any(end < op < start for op in ops):
                gaps_without_op[pattern] = True
        gaps_without_op.setdefault(pattern, False)
    return {pattern for pattern, open_gap in gaps_without_op.items() if not open_gap}


def block_keys(
    gm: torch.fx.GraphModule, splitting: set[torch.fx.Node], leave_to_ops: bool
) -> dict[torch.fx.Node, GraphBlock | None]:
    """Each call node's block (None: outside every block that cuts).

    A node's block is the outermost block on its module path whose container
    repeats: two of the container's children (across every instance of the
    container, `stages.*.layers`) run the same ops on the same shapes. A
    ResNet's stages differ in width, so its blocks are the residual blocks
    inside them; a transformer's blocks are its layers. With `leave_to_ops`
    (``split="auto"``) a block with a splitting op inside is left to the
    attention cuts, and so is everything inside it, as are blocks that a
    splitting op between each two of them already separates.
    """
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    chains = {n: _block_chain(n) for n in calls}
    members: dict[GraphBlock, list[torch.fx.Node]] = {}
    for node, chain in chains.items():
        for block in chain:
            members.setdefault(block, []).append(node)
    by_pattern: dict[str, list[GraphBlock]] = {}
    for block in members:
        by_pattern.setdefault(_pattern(block[0]), []).append(block)
    repeating = {
        pattern
        for pattern, blocks in by_pattern.items()
        if _repeats(blocks, lambda block: tuple(_node_shape(n) for n in members[block]))
    }
    with_op: set[GraphBlock] = set()
    if leave_to_ops:
        for node in splitting:
            with_op.update(chains.get(node, ()))
        repeating -= _separated_by_ops(gm, members, with_op, splitting)
    keys: dict[torch.fx.Node, GraphBlock | None] = {}
    for node, chain in chains.items():
        key = None
        for block in chain:
            if block in with_op:
                break  # attention cuts this block (and what is inside it)
            if _pattern(block[0]) in repeating:
                key = block
                break
        keys[node] = key
    _inside_blocks(calls, chains, keys)
    return keys


def _inside_blocks(
    calls: list[torch.fx.Node],
    chains: dict[torch.fx.Node, list[GraphBlock]],
    keys: dict[torch.fx.Node, GraphBlock | None],
) -> None:
    """Gives nodes without a module path (Dynamo records none for some, such as the
    ``_vmap_decrement_nesting`` that closes a ``torch.vmap`` inside a block) the block
    of their neighbours when both sides are one block: a cut there would split the
    block, and could separate a vmap level's push from its pop."""
    pending: list[torch.fx.Node] = []
    previous: GraphBlock | None = None
    for node in calls:
        if not chains[node]:
            pending.append(node)
            continue
        if pending and previous is not None and keys[node] == previous:
            for inner in pending:
                keys[inner] = previous
        pending = []
        previous = keys[node]


# -- among compiled pieces --------------------------------------------------------


def _op_sequence(gm: torch.fx.GraphModule) -> tuple[tuple[str, str], ...]:
    """A graph's op sequence, names and values aside: pieces of repeated blocks have equal ones."""
    return tuple((n.op, target_name(n.target) if n.op.startswith("call") else "") for n in gm.graph.nodes)


#: Differences that make two pieces different blocks rather than repeats (see `digest._tensor_diff`).
_NOT_REPEATS = ("shape", "dtype", "device type", "layout", "rank", "symbolic sizes")


def reuse_lost(pieces: Sequence[tuple[int, torch.fx.GraphModule]], digests: Sequence[str]) -> str | None:
    """Why a graph's repeated pieces do not share, or None when they do (or nothing repeats).

    `pieces` are ``(index in the split graph, module)`` of the compiled pieces, in
    order, with their `digests`. Pieces between the first and the last that
    have one op sequence line up as repeated blocks; when three or more do and
    no two of them share a digest, the first two are explained.
    """
    middle = list(range(1, len(pieces) - 1))
    for members in _repeats(middle, lambda k: _op_sequence(pieces[k][1]), at_least=3):
        if len({digests[k] for k in members}) < len(members):
            continue
        a, b = members[0], members[1]
        why = explain(pieces[a][1], pieces[b][1]) or "they encode differently"
        if any(what in why for what in _NOT_REPEATS):
            continue  # blocks of different widths (a UNet's levels), not repeats that lost their sharing
        return (
            f"{len(members)} pieces line up as repeated blocks but none shares its compiled code; "
            f"pieces {pieces[a][0]} and {pieces[b][0]} differ at {why}"
        )
    return None
