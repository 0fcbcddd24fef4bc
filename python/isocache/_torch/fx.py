"""FX and symbolic shapes: the ranges of a graph's symbolic sizes; graphs sent to another process.

Written against torch 2.11-2.15 (``ShapeEnv.var_to_range``,
``torch.fx._graph_pickler.GraphPickler``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["pickle_graph", "symbol_ranges", "unpickle_graph"]


def _show(bound: Any) -> str:
    text = str(bound)
    return "inf" if text in ("oo", "int_oo") else text


def symbol_ranges(values: Any) -> dict[str, tuple[str, str]]:
    """``{symbol: (lower, upper)}`` for each symbolic size among `values`, in order of first use."""
    seen: dict[str, tuple[str, str]] = {}

    def visit(value: Any) -> None:
        if not isinstance(value, torch.SymInt):
            return
        node = value.node
        shape_env = getattr(node, "shape_env", None)
        for sym in sorted(node.expr.free_symbols, key=str):
            if str(sym) in seen:
                continue
            vr = shape_env.var_to_range.get(sym) if shape_env is not None else None
            seen[str(sym)] = ("?", "?") if vr is None else (_show(vr.lower), _show(vr.upper))

    for value in values:
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                visit(size)
        else:
            visit(value)
    return seen


def pickle_graph(gm: torch.fx.GraphModule) -> bytes:
    """`gm` as bytes another process can rebuild, fake tensors and symbolic sizes included.

    Inductor's own out-of-process compile sends graphs this way. Raises when
    the graph holds something that does not pickle (an opaque object, a local
    function); the caller then compiles in this process.
    """
    from torch.fx._graph_pickler import GraphPickler

    return GraphPickler.dumps(gm)


def unpickle_graph(data: bytes) -> torch.fx.GraphModule:
    """The graph `pickle_graph` sent, its fake tensors in a fresh fake mode of this process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
    assert isinstance(gm, torch.fx.GraphModule)
    return gm
