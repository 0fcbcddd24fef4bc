"""Piecewise split of a Dynamo graph at splitting ops (attention by default).

Each splitting op becomes a piece of its own that runs as it is; the code
between two splitting ops becomes a piece that isocache compiles (or reuses).
Cut this way, the pieces of an N-layer transformer are one first piece, N-1
isometric middle pieces and one last piece.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
from collections.abc import Iterable

import torch
import torch.fx
from torch.fx.passes.split_module import split_module

from . import _core

__all__ = ["DEFAULT_SPLITTING_OPS", "Piece", "SplitGraph", "normalize_splitting_ops", "split_graph"]

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
        else:
            try:
                name = _core.canonical_target(op)
            except _core.CacheError as e:
                raise _core.CacheError(
                    f"splitting op {op!r} has no canonical name ({e}); pass its name as a string"
                ) from None
            names.add(name.removeprefix("packet:"))
    return frozenset(names)


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


def split_graph(gm: torch.fx.GraphModule, splitting_ops: frozenset[str]) -> SplitGraph:
    """Cuts `gm` before and after every splitting op."""
    partition: dict[torch.fx.Node, int] = {}
    current = 0
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if is_splitting_node(node, splitting_ops):
            current += 1
            partition[node] = current
            current += 1
        else:
            partition[node] = current
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
