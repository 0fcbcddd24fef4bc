"""`graph_digest` and `explain`: what the Rust core decides, in user terms."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.fx

from . import _core
from ._namespace import graph_device, namespace_of
from ._once import warn_once

if TYPE_CHECKING:
    from .model_pieces import ModelPiece

__all__ = ["digest_with_reason", "explain", "graph_digest", "target_name"]


def _warn_unencodable(reason: str) -> None:
    warn_once(
        ("unencodable", reason),
        "isocache: a graph cannot be encoded canonically (%s); it gets a unique digest and is never shared",
        reason,
    )


def digest_with_reason(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any] | None = None,
    namespace: str | None = None,
) -> tuple[str, str | None]:
    """The digest and, for a non-reusable graph, why it is not reusable."""
    if namespace is None:
        namespace = namespace_of(graph_device(gm, example_inputs)).name
    digest, reason = _core.digest(gm, example_inputs, namespace)
    if reason is not None:
        _warn_unencodable(reason)
    return digest, reason


def graph_digest(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> str:
    """The canonical digest of `gm`: 64 lowercase hex characters.

    Equal for graphs that differ only in names (of nodes, placeholders,
    attributes) and debug metadata; different when anything that shapes the
    compiled code differs. Tensor metadata of inputs comes from
    ``node.meta["val"]``/``node.meta["example_value"]`` or else from
    `example_inputs`. A graph that cannot be encoded gets a unique digest.
    """
    return digest_with_reason(gm, example_inputs)[0]


def explain(
    gm_a: torch.fx.GraphModule | ModelPiece,
    gm_b: torch.fx.GraphModule | ModelPiece,
    example_inputs_a: Sequence[Any] | None = None,
    example_inputs_b: Sequence[Any] | None = None,
) -> str | None:
    """`None` when the two graphs are isometric, else the first difference.

    Takes graph modules, or two of `isocache.pieces(model, ...)`'s pieces.
    """
    gm_a, gm_b = _graph_of(gm_a), _graph_of(gm_b)
    enc_a = _core.encode(gm_a, example_inputs_a, spans=True)
    enc_b = _core.encode(gm_b, example_inputs_b, spans=True)
    for label, enc in (("A", enc_a), ("B", enc_b)):
        if enc.unencodable is not None:
            return f"graph {label} is not reusable: {enc.unencodable}"
    namespaces = namespace_of(graph_device(gm_a, example_inputs_a)).diff(
        namespace_of(graph_device(gm_b, example_inputs_b))
    )
    for key, (a, b) in namespaces.items():
        return f"namespace differs: {key} {a} vs {b}"
    if enc_a.data == enc_b.data:
        return None
    nodes_a = list(gm_a.graph.nodes)
    nodes_b = list(gm_b.graph.nodes)
    spans_a = enc_a.spans or []
    spans_b = enc_b.spans or []
    for i, (sa, sb) in enumerate(zip(spans_a, spans_b)):
        if enc_a.data[sa[0] : sa[1]] != enc_b.data[sb[0] : sb[1]]:
            return _NodeDiff(gm_a, gm_b, example_inputs_a, example_inputs_b).describe(i, nodes_a[i], nodes_b[i])
    if len(nodes_a) != len(nodes_b):
        k = min(len(nodes_a), len(nodes_b))
        longer, label = (nodes_a, "A") if len(nodes_a) > len(nodes_b) else (nodes_b, "B")
        return (
            f"node count: {len(nodes_a)} vs {len(nodes_b)}; graph {label} goes on at "
            f"node {k}: {longer[k].format_node()}"
        )
    return "the graphs encode differently (symbolic sizes or their ranges)"


def _graph_of(value: torch.fx.GraphModule | ModelPiece) -> torch.fx.GraphModule:
    """A graph module, or the module of an `isocache.pieces` piece."""
    return value if isinstance(value, torch.fx.GraphModule) else value.module


def _float_bits(x: float) -> int:
    return int(struct.unpack("<Q", struct.pack("<d", x))[0])


class _NodeDiff:
    """Describes how two nodes at the same position differ."""

    def __init__(
        self,
        gm_a: torch.fx.GraphModule,
        gm_b: torch.fx.GraphModule,
        inputs_a: Sequence[Any] | None,
        inputs_b: Sequence[Any] | None,
    ) -> None:
        self.gm = (gm_a, gm_b)
        self.inputs = (inputs_a, inputs_b)
        self.pos = (
            {n: i for i, n in enumerate(gm_a.graph.nodes)},
            {n: i for i, n in enumerate(gm_b.graph.nodes)},
        )

    def describe(self, i: int, a: torch.fx.Node, b: torch.fx.Node) -> str:
        where = f"node {i} ({a.name} / {b.name})"
        if a.op != b.op:
            return f"{where}: op {a.op} vs {b.op}"
        if a.op == "placeholder":
            detail = self._placeholder(a, b)
        elif a.op == "get_attr":
            detail = self._attr(a, b)
        else:
            detail = self._target(a, b) or self._values("args", a.args, b.args)
            if detail is None:
                detail = self._values("kwargs", a.kwargs, b.kwargs)
        return f"{where}: {detail or 'encodes differently'}"

    def _target(self, a: torch.fx.Node, b: torch.fx.Node) -> str | None:
        if a.op == "call_function":
            ta, tb = target_name(a.target), target_name(b.target)
        else:
            ta, tb = str(a.target), str(b.target)
            if a.op == "call_module":
                ta = type(self.gm[0].get_submodule(ta)).__qualname__ + f" {ta}"
                tb = type(self.gm[1].get_submodule(tb)).__qualname__ + f" {tb}"
                return None if ta.split()[0] == tb.split()[0] else f"module {ta} vs {tb}"
        return None if ta == tb else f"target {ta} vs {tb}"

    def _example(self, side: int, node: torch.fx.Node) -> Any:
        value = node.meta.get("val", node.meta.get("example_value"))
        inputs = self.inputs[side]
        if value is None and inputs is not None:
            index = [n for n in self.gm[side].graph.nodes if n.op == "placeholder"].index(node)
            if index < len(inputs):
                value = inputs[index]
        return value

    def _placeholder(self, a: torch.fx.Node, b: torch.fx.Node) -> str | None:
        va, vb = self._example(0, a), self._example(1, b)
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            return _tensor_diff(va, vb) or "symbolic sizes or their ranges differ"
        if type(va) is not type(vb):
            return f"input kind {type(va).__name__} vs {type(vb).__name__}"
        if va != vb:
            return f"input value {va!r} vs {vb!r}"
        return self._values("default", a.args, b.args)

    def _attr(self, a: torch.fx.Node, b: torch.fx.Node) -> str:
        va = _resolve(self.gm[0], str(a.target))
        vb = _resolve(self.gm[1], str(b.target))
        if isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor):
            return _tensor_diff(va, vb) or "constant tensor content differs"
        if isinstance(va, torch.fx.GraphModule) and isinstance(vb, torch.fx.GraphModule):
            inner = explain(va, vb)
            return f"nested graph differs: {inner}"
        return f"attribute {type(va).__name__} vs {type(vb).__name__}"

    def _values(self, path: str, a: Any, b: Any) -> str | None:
        if isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node):
            pa, pb = self.pos[0].get(a), self.pos[1].get(b)
            return None if pa == pb else f"{path}: refers to node {pa} vs node {pb}"
        if type(a) is not type(b):
            return f"{path}: {_kind(a)} vs {_kind(b)}"
        if isinstance(a, (tuple, list)):
            if len(a) != len(b):
                return f"{path}: constant {_kind(a)} of {len(a)} vs {len(b)} items"
            for k, (x, y) in enumerate(zip(a, b)):
                found = self._values(f"{path}[{k}]", x, y)
                if found:
                    return found
            return None
        if isinstance(a, dict):
            if sorted(map(str, a)) != sorted(map(str, b)):
                return f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
            for k in a:
                found = self._values(f"{path}[{k!r}]", a[k], b[k])
                if found:
                    return found
            return None
        if isinstance(a, slice):
            return self._values(path, (a.start, a.stop, a.step), (b.start, b.stop, b.step))
        if isinstance(a, float):
            same = _float_bits(a) == _float_bits(b)
        elif isinstance(a, torch.Tensor):
            diff = _tensor_diff(a, b)
            return f"{path}: constant tensor {diff or 'content differs'}" if diff or not torch.equal(a, b) else None
        else:
            try:
                same = bool(a == b)
            except Exception:
                same = a is b
        if same:
            return None
        return f"{path}: constant {a!r} vs {b!r}"


def _kind(v: Any) -> str:
    return type(v).__name__


def target_name(target: Any) -> str:
    """A call's canonical target name (`isocache._core.canonical_target`), or why it has none."""
    try:
        return _core.canonical_target(target)
    except _core.CacheError as e:
        return f"<{e}>"


def _resolve(gm: torch.nn.Module, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part, None)
    return obj


def _tensor_diff(a: torch.Tensor, b: torch.Tensor) -> str | None:
    checks: tuple[tuple[str, object, object], ...] = (
        ("dtype", a.dtype, b.dtype),
        ("device type", a.device.type, b.device.type),
        ("layout", a.layout, b.layout),
        ("requires_grad", a.requires_grad, b.requires_grad),
        ("rank", a.dim(), b.dim()),
    )
    for name, x, y in checks:
        if x != y:
            return f"{name} {x} vs {y}"
    sizes: tuple[tuple[str, tuple[Any, ...], tuple[Any, ...]], ...] = (
        ("shape", tuple(a.shape), tuple(b.shape)),
        ("stride", tuple(a.stride()), tuple(b.stride())),
        ("storage offset", (a.storage_offset(),), (b.storage_offset(),)),
    )
    for name, x, y in sizes:
        if any(_concrete(p) and _concrete(q) and p != q for p, q in zip(x, y)):
            return f"{name} {x} vs {y}"
        if any(_concrete(p) != _concrete(q) for p, q in zip(x, y)):
            return f"{name} {x} vs {y} (static vs symbolic)"
    return None


def _concrete(v: Any) -> bool:
    return (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and math.isfinite(v))
