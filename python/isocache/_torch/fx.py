"""FX and symbolic shapes: the ranges of a graph's symbolic sizes; graphs sent to another process.

Written against torch 2.11-2.15 (``ShapeEnv.var_to_range``,
``torch.fx._graph_pickler.GraphPickler``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["inline_regions", "pickle_graph", "region_call_count", "symbol_ranges", "unpickle_graph"]


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


_META_FOR_COMPILING = ("val", "example_value", "tensor_meta", "unbacked_bindings")


def pickle_graph(gm: torch.fx.GraphModule) -> bytes:
    """`gm` as bytes another process can rebuild, fake tensors and symbolic sizes included.

    Inductor's own out-of-process compile sends graphs this way. Raises when
    the graph holds something that does not pickle (an opaque object, a local
    function); the caller then compiles in this process.
    """
    from torch.fx._graph_pickler import GraphPickler

    # Only the values compiling needs travel: other node metadata (module stacks,
    # source functions, Dynamo's bookkeeping) may hold objects that do not pickle,
    # and the worker has no use for them.
    saved = [(node, node.meta) for node in gm.graph.nodes]
    try:
        for node, meta in saved:
            node.meta = {k: meta[k] for k in _META_FOR_COMPILING if k in meta}
        return GraphPickler.dumps(gm)
    finally:
        for node, meta in saved:
            node.meta = meta


def unpickle_graph(data: bytes) -> torch.fx.GraphModule:
    """The graph `pickle_graph` sent, its fake tensors in a fresh fake mode of this process."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    gm = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
    assert isinstance(gm, torch.fx.GraphModule)
    return gm


def _invoke_subgraph() -> Any:
    return getattr(torch.ops.higher_order, "invoke_subgraph", None)


def region_call_count(gm: torch.fx.GraphModule) -> int:
    """How many calls of nested compile regions (``invoke_subgraph``) `gm` holds."""
    hop = _invoke_subgraph()
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is hop)


def inline_regions(gm: torch.fx.GraphModule) -> int:
    """Replaces each call of a nested compile region with a copy of the region's nodes; returns how many.

    Dynamo traces a marked block once and calls its subgraph at every call
    site (``invoke_subgraph``). isocache cuts and digests the graph as if each
    block had been traced in place: the pieces, their digests and the
    steady-state forward are those of a whole trace. Written against torch
    2.11-2.15 (``torch.ops.higher_order.invoke_subgraph(subgraph, identifier,
    *operands)``, whose users take ``getitem`` of its outputs).
    """
    import operator

    hop = _invoke_subgraph()
    calls = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is hop]
    graph = gm.graph
    for call in calls:
        sub = getattr(gm, call.args[0].target)
        env: dict[torch.fx.Node, Any] = {}
        lookup = env.__getitem__
        operands = list(call.args[2:])
        outputs: Any = None
        site = call.meta.get("nn_module_stack")
        with graph.inserting_before(call):
            for node in sub.graph.nodes:
                if node.op == "placeholder":
                    env[node] = operands.pop(0)
                elif node.op == "output":
                    outputs = torch.fx.map_arg(node.args[0], lookup)
                elif node.op == "get_attr":
                    name = f"_isocache_region_{call.name}_{node.target}".replace(".", "_")
                    setattr(gm, name, getattr(sub, node.target))
                    env[node] = graph.get_attr(name)
                    env[node].meta = dict(node.meta)
                else:
                    env[node] = graph.node_copy(node, lookup)
                    if site is not None:  # the block this call is, not the one first traced
                        env[node].meta["nn_module_stack"] = dict(site)
        outputs = list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]
        for user in list(call.users):
            if user.op != "call_function" or user.target is not operator.getitem:
                raise ValueError(f"a region's result is used by {user.format_node()}, not by getitem")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
        graph.erase_node(call)
    for node in list(graph.nodes):
        if node.op == "get_attr" and not node.users:
            target = node.target
            graph.erase_node(node)
            if isinstance(target, str) and hasattr(gm, target) and isinstance(getattr(gm, target), torch.nn.Module):
                delattr(gm, target)
    if calls:
        gm.recompile()
    return len(calls)
