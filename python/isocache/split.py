"""Piecewise split of a Dynamo graph: at splitting ops (attention), at repeated blocks, or both.

``"attention"``: each splitting op becomes a piece of its own that runs as
it is; the code between two splitting ops becomes a piece that isocache
compiles (or reuses). Cut this way, the pieces of an N-layer transformer are
one first piece, N-1 isometric middle pieces and one last piece.

``"blocks"``: the graph is cut where its nodes enter or leave a repeated
block, a child of an indexed container (``layers.3``, ``stages.1.layers.0``)
two of whose children run the same ops on the same shapes. Dynamo records
each node's module path (``nn_module_stack``); a node belongs to the
outermost such block on its path (`blocks.block_keys`). Every block is a piece, with or without a splitting
op inside (Gemma-2's hand-written attention, Mamba, ResNet blocks).

``"auto"`` (the default): attention cuts, plus block cuts around repeated
blocks that have no splitting op inside them or above them and none between
one block and the next (there the attention cuts already separate them), so
a model whose blocks call attention is cut exactly as with ``"attention"``.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterable
from typing import Any, Callable

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from . import _core
from .blocks import GraphBlock, block_keys

__all__ = [
    "DEFAULT_SPLITTING_OPS",
    "SPLIT_MODES",
    "Piece",
    "SplitGraph",
    "check_split_mode",
    "normalize_splitting_ops",
    "split_graph",
]

#: How a graph may be cut (see the module docstring).
SPLIT_MODES = ("auto", "attention", "blocks")


def check_split_mode(mode: str) -> None:
    """Raises a ValueError naming the choices unless `mode` is one of `SPLIT_MODES`."""
    if mode not in SPLIT_MODES:
        raise ValueError(f"split={mode!r}: expected one of {', '.join(repr(m) for m in SPLIT_MODES)}")


logger = logging.getLogger("isocache")

#: Canonical names (see `isocache._core.canonical_target`) of the ops that cut
#: a graph. Names without an overload (`aten::foo`) match every overload.
DEFAULT_SPLITTING_OPS: tuple[str, ...] = (
    "torch._C._nn.scaled_dot_product_attention",
    "torch.nn.functional.scaled_dot_product_attention",
    "aten::scaled_dot_product_attention",
    "aten::_scaled_dot_product_flash_attention",
    "aten::_scaled_dot_product_flash_attention_for_cpu",
    "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention",
)


@dataclasses.dataclass(frozen=True)
class Piece:
    """One piece of a split graph."""

    index: int
    name: str
    module: torch.fx.GraphModule
    is_splitting_op: bool


@dataclasses.dataclass(frozen=True)
class SplitGraph:
    """The top-level graph that calls the pieces, and the pieces in call order."""

    graph: torch.fx.GraphModule
    pieces: tuple[Piece, ...]

    @property
    def compiled_pieces(self) -> tuple[Piece, ...]:
        return tuple(p for p in self.pieces if not p.is_splitting_op)

    def install(self, piece: Piece, fn: Callable[..., Any]) -> None:
        """Makes the split graph call `fn` for `piece`."""
        # The split graph's code calls `self.<name>(...)`; an instance attribute
        # shadows the submodule without touching `_modules`.
        self.graph.__dict__[piece.name] = fn


def normalize_splitting_ops(ops: Iterable[object] | None) -> frozenset[str]:
    """Accepts canonical names, op overloads/packets or Python callables."""
    if ops is None:
        return frozenset(DEFAULT_SPLITTING_OPS)
    names = set()
    for op in ops:
        if isinstance(op, str):
            names.add(op.replace(".default", "") if op.startswith("aten::") else op)
            # "torch.relu" names the same function as its canonical name
            # "torch._VariableFunctionsClass.relu": accept what users write.
            resolved = _resolve_dotted(op)
            if resolved is not None:
                canonical = _canonical(resolved)
                if canonical is not None:
                    names.add(canonical.removeprefix("packet:"))
            elif not _names_an_op(op):
                raise ValueError(_unknown_op(op))
        else:
            try:
                name = _core.canonical_target(op)
            except _core.CacheError as e:
                raise _core.CacheError(
                    f"splitting op {op!r} has no canonical name ({e}); pass its name as a string"
                ) from None
            names.add(name.removeprefix("packet:"))
    return frozenset(names)


def _names_an_op(name: str) -> bool:
    """Whether `name` is a registered op (``aten::relu``, ``aten::relu.default``, ``mylib::op``)."""
    if "::" not in name:
        return False
    namespace, _, rest = name.partition("::")
    op, _, overload = rest.partition(".")
    try:
        packet = getattr(getattr(torch.ops, namespace), op)
    except (AttributeError, RuntimeError):
        return False
    return not overload or hasattr(packet, overload)


def _unknown_op(name: str) -> str:
    """What to say of a splitting op name that names nothing: the nearest defaults, and the forms accepted."""
    import difflib

    near = difflib.get_close_matches(name, DEFAULT_SPLITTING_OPS, n=2, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(n) for n in near)}? " if near else ""
    return (
        f"splitting op {name!r} names no op or function: {hint}pass an op as 'namespace::name' "
        "('aten::scaled_dot_product_attention'; a library's own ops once it is imported), a function's "
        "dotted path ('torch.nn.functional.scaled_dot_product_attention'), or the op or function itself"
    )


def _resolve_dotted(name: str) -> object | None:
    """The object a dotted Python path names (`torch.nn.functional.silu`), if any."""
    if "::" in name or "." not in name:
        return None
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return None
        return obj if callable(obj) else None
    return None


def _canonical(target: object) -> str | None:
    try:
        return _core.canonical_target(target)
    except _core.CacheError:
        return None


def is_splitting_node(node: torch.fx.Node, ops: frozenset[str]) -> bool:
    if node.op != "call_function":
        return False
    name = _canonical(node.target)
    if name is None:
        return False
    if name in ops:
        return True
    # `aten::foo.overload` matches `aten::foo`.
    return "::" in name and name.rsplit(".", 1)[0] in ops


def split_graph(gm: torch.fx.GraphModule, splitting_ops: frozenset[str], mode: str = "attention") -> SplitGraph:
    """Cuts `gm` as `mode` says (`SPLIT_MODES`): around splitting ops, at repeated blocks, or both."""
    check_split_mode(mode)
    cut_at_ops = mode != "blocks"
    splitting = {n for n in gm.graph.nodes if is_splitting_node(n, splitting_ops)}
    keys = block_keys(gm, splitting, leave_to_ops=mode == "auto") if mode != "attention" else {}
    partition: dict[torch.fx.Node, int] = {}
    current = 0
    block: GraphBlock | None = None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if cut_at_ops and node in splitting:
            current += 1
            partition[node] = current
            current += 1
            continue
        if node in keys and keys[node] != block:
            block = keys[node]
            current += 1
        partition[node] = current
    return _split(gm, partition, splitting_ops if cut_at_ops else frozenset())


def _split(gm: torch.fx.GraphModule, partition: dict[torch.fx.Node, int], splitting_ops: frozenset[str]) -> SplitGraph:
    split = split_module(gm, None, lambda n: partition[n], keep_original_order=True)  # type: ignore[arg-type]
    names = {n.target for n in split.graph.nodes if n.op == "call_module"}
    pieces: list[Piece] = []
    for node in split.graph.nodes:
        if node.op != "call_module" or node.target not in names:
            continue
        sub = split.get_submodule(str(node.target))
        assert isinstance(sub, torch.fx.GraphModule)
        inner = [n for n in sub.graph.nodes if n.op not in ("placeholder", "output")]
        splitting = len(inner) == 1 and is_splitting_node(inner[0], splitting_ops)
        pieces.append(Piece(len(pieces), str(node.target), sub, splitting))
    return SplitGraph(split, tuple(pieces))
