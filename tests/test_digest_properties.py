"""Property tests: random FX graphs from a small grammar of ops.

For every generated graph the Rust encoder must produce the reference
encoder's bytes; renaming everything keeps the digest; changing any one op,
constant, shape, dtype, stride or the input order changes it, and `explain`
names what changed.
"""

from __future__ import annotations

import dataclasses
import math
import operator
import struct
from typing import Any, Callable

import pytest
import torch
import torch.fx as fx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import isocache
from isocache import _core
from reference_encoder import reference_digest, reference_encode

aten = torch.ops.aten
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64)


@dataclasses.dataclass(frozen=True)
class Op:
    """How to build one node: target, arity and which constant slots it has."""

    kind: str  # "function" or "method"
    target: Any
    arity: int
    build: Callable[[list[Any], Any], tuple[tuple[Any, ...], dict[str, Any]]]
    const: st.SearchStrategy[Any] | None = None


ints = st.integers(-4, 4)
floats = st.floats(-8, 8, allow_nan=False, width=64)
OPS: dict[str, Op] = {
    "add": Op("function", aten.add.Tensor, 2, lambda a, c: ((a[0], a[1]), {"alpha": c}), ints),
    "mul": Op("function", aten.mul.Tensor, 2, lambda a, c: ((a[0], a[1]), {}), None),
    "sub": Op("function", operator.sub, 2, lambda a, c: ((a[0], a[1]), {}), None),
    "where": Op("function", torch.where, 2, lambda a, c: ((c, a[0], a[1]), {}), st.booleans()),
    "relu": Op("function", aten.relu.default, 1, lambda a, c: ((a[0],), {}), None),
    "torch_relu": Op("function", torch.relu, 1, lambda a, c: ((a[0],), {}), None),
    "clamp": Op("function", aten.clamp.default, 1, lambda a, c: ((a[0], c[0], c[1]), {}), st.tuples(floats, floats)),
    "sum": Op(
        "method", "sum", 1, lambda a, c: ((a[0],), {"dim": c[0], "keepdim": c[1]}), st.tuples(ints, st.booleans())
    ),
    "view": Op(
        "function", aten.view.default, 1, lambda a, c: ((a[0], list(c)), {}), st.lists(ints, min_size=1, max_size=3)
    ),
    "getitem": Op(
        "function", operator.getitem, 1, lambda a, c: ((a[0], (Ellipsis, slice(None, c, None))), {}), st.integers(1, 9)
    ),
    "to": Op("method", "to", 1, lambda a, c: ((a[0],), {"dtype": c}), st.sampled_from(DTYPES)),
    "scale": Op("function", aten.mul.Scalar, 1, lambda a, c: ((a[0], c), {}), floats),
    "full": Op(
        "function",
        aten.full.default,
        0,
        lambda a, c: (([2, c], 1.5), {"dtype": torch.float32, "device": torch.device("cpu")}),
        st.integers(1, 5),
    ),
}


@dataclasses.dataclass(frozen=True)
class InputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype
    transposed: bool
    requires_grad: bool
    via_meta: bool

    def tensor(self) -> torch.Tensor:
        shape = self.shape
        if self.transposed:
            stride = tuple(reversed(_contiguous_strides(tuple(reversed(shape)))))
        else:
            stride = _contiguous_strides(shape)
        t = torch.empty_strided(shape, stride, dtype=self.dtype)
        if self.requires_grad and self.dtype.is_floating_point:
            t.requires_grad_(True)
        return t


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(shape):
        strides.append(acc)
        acc *= d
    return tuple(reversed(strides))


@dataclasses.dataclass(frozen=True)
class NodeSpec:
    op: str
    operands: tuple[int, ...]
    const: Any


@dataclasses.dataclass(frozen=True)
class GraphSpec:
    inputs: tuple[InputSpec, ...]
    nodes: tuple[NodeSpec, ...]
    constant: tuple[float, ...] | None  # a get_attr tensor constant
    outputs: tuple[int, ...]


@st.composite
def graph_specs(draw: st.DrawFn) -> GraphSpec:
    n_inputs = draw(st.integers(1, 4))
    inputs = tuple(
        InputSpec(
            # The leading dim is unique per input, so inputs never look alike.
            shape=(i + 2, draw(st.integers(2, 4)), *tuple(draw(st.lists(st.integers(1, 3), max_size=1)))),
            dtype=draw(st.sampled_from(DTYPES)),
            transposed=draw(st.booleans()),
            requires_grad=draw(st.booleans()),
            via_meta=draw(st.booleans()),
        )
        for i in range(n_inputs)
    )
    constant = draw(st.none() | st.tuples(floats, floats))
    available = n_inputs + (1 if constant is not None else 0)
    nodes = []
    for _ in range(draw(st.integers(1, 8))):
        name = draw(st.sampled_from(sorted(OPS)))
        op = OPS[name]
        operands = tuple(draw(st.integers(0, available - 1)) for _ in range(op.arity))
        const = draw(op.const) if op.const is not None else None
        nodes.append(NodeSpec(name, operands, const))
        available += 1
    outputs = tuple(sorted(set(draw(st.lists(st.integers(0, available - 1), min_size=1, max_size=3)))))
    return GraphSpec(inputs, tuple(nodes), constant, outputs)


def build(spec: GraphSpec, prefix: str = "x", order: list[int] | None = None) -> tuple[fx.GraphModule, list[Any]]:
    """Builds the graph; `prefix` names everything, `order` permutes placeholders."""
    root = torch.nn.Module()
    g = fx.Graph()
    order = order if order is not None else list(range(len(spec.inputs)))
    placeholders: dict[int, fx.Node] = {}
    example_inputs: list[Any] = []
    for position, i in enumerate(order):
        node = g.placeholder(f"{prefix}_in{i}_{position}")
        inp = spec.inputs[i]
        t = inp.tensor()
        if inp.via_meta:
            node.meta["val"] = t
            example_inputs.append(None)
        else:
            example_inputs.append(t)
        node.meta["stack_trace"] = f"File {prefix}.py, line {i}"
        placeholders[i] = node
    values: list[fx.Node] = [placeholders[i] for i in range(len(spec.inputs))]
    if spec.constant is not None:
        attr = f"{prefix}_const"
        setattr(root, attr, torch.tensor(spec.constant))
        values.append(g.get_attr(attr))
    for k, n in enumerate(spec.nodes):
        op = OPS[n.op]
        args, kwargs = op.build([values[i] for i in n.operands], n.const)
        kind = "call_function" if op.kind == "function" else "call_method"
        node = g.create_node(kind, op.target, args, kwargs, name=f"{prefix}_n{k}")
        node.meta["nn_module_stack"] = {prefix: (prefix, object)}
        values.append(node)
    g.output(tuple(values[i] for i in spec.outputs))
    return fx.GraphModule(root, g), example_inputs


def digest(gm: fx.GraphModule, inputs: list[Any]) -> str:
    return isocache.graph_digest(gm, inputs)


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(graph_specs())
def test_rust_matches_reference_encoder(spec: GraphSpec) -> None:
    gm, inputs = build(spec)
    encoded = _core.encode(gm, inputs)
    assert encoded.unencodable is None
    assert encoded.data == reference_encode(gm, inputs)
    assert _core.digest(gm, inputs, "ns")[0] == reference_digest(gm, inputs, "ns")


@SETTINGS
@given(graph_specs())
def test_renaming_everything_keeps_the_digest(spec: GraphSpec) -> None:
    a, inputs_a = build(spec, prefix="alpha")
    b, inputs_b = build(spec, prefix="layer_17_beta")
    assert [n.name for n in a.graph.nodes] != [n.name for n in b.graph.nodes]
    assert digest(a, inputs_a) == digest(b, inputs_b)
    assert isocache.explain(a, b, inputs_a, inputs_b) is None


def _float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _changed_const(old: Any, strategy: st.SearchStrategy[Any], data: st.DataObject) -> Any:
    new = data.draw(strategy)
    if isinstance(old, float):
        assume(_float_bits(new) != _float_bits(old))
    elif isinstance(old, tuple) and old and isinstance(old[0], float):
        assume(tuple(map(_float_bits, new)) != tuple(map(_float_bits, old)))
    else:
        assume(new != old or type(new) is not type(old))
    return new


MUTATIONS = ("op", "const", "shape", "dtype", "stride", "order")


@SETTINGS
@given(graph_specs(), st.sampled_from(MUTATIONS), st.data())
def test_any_single_change_changes_the_digest(spec: GraphSpec, mutation: str, data: st.DataObject) -> None:
    order = None
    expected = {
        "op": "target",
        "const": "constant",
        "shape": "shape",
        "dtype": "dtype",
        "stride": "stride",
        "order": "node",
    }[mutation]
    if mutation in ("op", "const"):
        candidates = [
            k
            for k, n in enumerate(spec.nodes)
            if (
                mutation == "op"
                and any(o.arity == OPS[n.op].arity and o.target is not OPS[n.op].target for o in OPS.values())
            )
            or (mutation == "const" and OPS[n.op].const is not None)
        ]
        assume(candidates)
        k = data.draw(st.sampled_from(candidates))
        node = spec.nodes[k]
        if mutation == "op":
            others = sorted(
                name for name, o in OPS.items() if o.arity == OPS[node.op].arity and o.target is not OPS[node.op].target
            )
            new_op = data.draw(st.sampled_from(others))
            const = (
                node.const
                if OPS[new_op].const is OPS[node.op].const
                else (data.draw(OPS[new_op].const) if OPS[new_op].const is not None else None)
            )
            new_node = NodeSpec(new_op, node.operands, const)
            if OPS[new_op].kind != OPS[node.op].kind:
                expected = "op call_"
        else:
            strategy = OPS[node.op].const
            assert strategy is not None
            new_node = NodeSpec(node.op, node.operands, _changed_const(node.const, strategy, data))
        nodes = list(spec.nodes)
        nodes[k] = new_node
        mutated = dataclasses.replace(spec, nodes=tuple(nodes))
    elif mutation == "order":
        assume(len(spec.inputs) >= 2)
        mutated = spec
        order = list(reversed(range(len(spec.inputs))))
    else:
        j = data.draw(st.integers(0, len(spec.inputs) - 1))
        inp = spec.inputs[j]
        if mutation == "shape":
            new = dataclasses.replace(inp, shape=(*inp.shape[:-1], inp.shape[-1] + 1))
        elif mutation == "dtype":
            new = dataclasses.replace(inp, dtype=data.draw(st.sampled_from([d for d in DTYPES if d != inp.dtype])))
        else:
            new = dataclasses.replace(inp, transposed=not inp.transposed)
        inputs = list(spec.inputs)
        inputs[j] = new
        mutated = dataclasses.replace(spec, inputs=tuple(inputs))
    a, inputs_a = build(spec)
    b, inputs_b = build(mutated, order=order)
    assert digest(a, inputs_a) != digest(b, inputs_b), mutation
    why = isocache.explain(a, b, inputs_a, inputs_b)
    assert why is not None
    assert expected in why, (mutation, why)


def test_float_constants_compare_by_bit_pattern() -> None:
    def graph(c: float) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(aten.mul.Scalar, (x, c)),))
        gm = fx.GraphModule(torch.nn.Module(), g)
        next(iter(gm.graph.nodes)).meta["val"] = torch.empty(3)
        return gm

    assert digest(graph(0.0), []) != digest(graph(-0.0), [])
    assert digest(graph(math.nan), []) == digest(graph(math.nan), [])
    assert digest(graph(1.0), []) != digest(graph(1.0 + 2**-52), [])


def test_constant_tensors_are_hashed_by_content() -> None:
    def graph(values: list[float], name: str) -> fx.GraphModule:
        root = torch.nn.Module()
        setattr(root, name, torch.tensor(values))
        g = fx.Graph()
        x = g.placeholder("x")
        c = g.get_attr(name)
        g.output((g.call_function(aten.add.Tensor, (x, c)),))
        gm = fx.GraphModule(root, g)
        next(iter(gm.graph.nodes)).meta["val"] = torch.empty(2)
        return gm

    assert digest(graph([1.0, 2.0], "a"), []) == digest(graph([1.0, 2.0], "renamed"), [])
    assert digest(graph([1.0, 2.0], "a"), []) != digest(graph([1.0, 2.5], "a"), [])
    why = isocache.explain(graph([1.0, 2.0], "a"), graph([1.0, 2.5], "a"))
    assert why is not None and "content" in why


def test_large_constant_tensor_is_hashed_detached_and_correctly() -> None:
    big = torch.arange(1 << 19, dtype=torch.float32)  # 2 MiB: takes the detached path

    def graph(t: torch.Tensor) -> fx.GraphModule:
        root = torch.nn.Module()
        root.w = t
        g = fx.Graph()
        g.output((g.get_attr("w"),))
        return fx.GraphModule(root, g)

    assert _core.encode(graph(big)).data == reference_encode(graph(big))
    changed = big.clone()
    changed[-1] += 1
    assert digest(graph(big), []) != digest(graph(changed), [])
    # A non-contiguous view hashes its logical content.
    assert _core.encode(graph(big.view(2, -1).t())).data == reference_encode(graph(big.view(2, -1).t()))


def test_nested_graph_modules_are_encoded_recursively() -> None:
    def inner(scale: float) -> fx.GraphModule:
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(aten.mul.Scalar, (x, scale)),))
        return fx.GraphModule(torch.nn.Module(), g)

    def outer(scale: float, name: str) -> fx.GraphModule:
        root = torch.nn.Module()
        setattr(root, name, inner(scale))
        g = fx.Graph()
        x = g.placeholder("x")
        sub = g.get_attr(name)
        g.output((g.call_function(torch.ops.higher_order.wrap, (sub, x)),))
        gm = fx.GraphModule(root, g)
        next(iter(gm.graph.nodes)).meta["val"] = torch.empty(2)
        return gm

    assert digest(outer(2.0, "body0"), []) == digest(outer(2.0, "body_renamed"), [])
    assert digest(outer(2.0, "body0"), []) != digest(outer(3.0, "body0"), [])
    assert _core.encode(outer(2.0, "b")).data == reference_encode(outer(2.0, "b"))
    why = isocache.explain(outer(2.0, "b"), outer(3.0, "b"))
    assert why is not None and "nested graph" in why and "constant" in why


def test_leaf_modules_are_encoded_by_type_config_and_state() -> None:
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4)
    a = fx.symbolic_trace(torch.nn.Sequential(lin))
    b = fx.symbolic_trace(torch.nn.Sequential(lin))
    c = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4)))
    d = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 5)))
    x = [torch.empty(2, 4)]
    assert digest(a, x) == digest(b, x)
    assert digest(a, x) != digest(c, x)  # other weights
    assert digest(a, x) != digest(d, x)  # other configuration
    assert _core.encode(a, x).data == reference_encode(a, x)


def test_symbolic_sizes_are_renamed_canonically_with_ranges() -> None:
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    from torch.utils._sympy.value_ranges import ValueRanges

    def graph(names: tuple[str, str], upper: int, skip: int) -> fx.GraphModule:
        env = ShapeEnv()
        syms = []
        for k in range(skip + 2):
            source = ConstantSource(f"{names[0]}{k}")
            sym = env.create_symbol(8 + k, source, dynamic_dim=DimDynamic.DYNAMIC)
            syms.append(env.create_symintnode(sym, hint=8 + k, source=source))
        s0, s1 = syms[skip:]
        env.var_to_range[s0.node.expr] = ValueRanges(2, upper)
        with FakeTensorMode(shape_env=env):
            t = torch.empty(s0, s1)
        g = fx.Graph()
        x = g.placeholder(names[0])
        y = g.placeholder(names[1])
        g.output((g.call_function(aten.add.Tensor, (x, y)),))
        gm = fx.GraphModule(torch.nn.Module(), g)
        nodes = list(gm.graph.nodes)
        nodes[0].meta["val"] = t
        nodes[1].meta["val"] = s1
        return gm

    a, b = graph(("a", "b"), 100, skip=0), graph(("p", "q"), 100, skip=3)
    sa, sb = (str(next(iter(g.graph.nodes)).meta["val"].shape[0]) for g in (a, b))
    assert sa != sb, "the two graphs use different symbol names"
    assert _core.encode(a).data == _core.encode(b).data, "symbols are renamed c0, c1"
    assert _core.encode(b).data == reference_encode(b)
    assert b"c0" in _core.encode(a).data and b"c1" in _core.encode(a).data
    assert digest(a, []) != digest(graph(("a", "b"), 200, skip=0), []), "ranges are part of the digest"


def test_unencodable_graphs_are_never_shared(caplog: pytest.LogCaptureFixture) -> None:
    def graph() -> fx.GraphModule:
        factor = 2.0
        g = fx.Graph()
        x = g.placeholder("x")
        g.output((g.call_function(lambda t: t * factor, (x,)),))
        return fx.GraphModule(torch.nn.Module(), g)

    caplog.set_level("WARNING", logger="isocache")
    a, b = graph(), graph()
    d1, d2 = digest(a, [torch.empty(1)]), digest(a, [torch.empty(1)])
    assert d1 != d2 and len(d1) == 64
    assert digest(b, [torch.empty(1)]) not in (d1, d2)
    warnings = [r for r in caplog.records if "never shared" in r.getMessage()]
    assert len(warnings) == 1, "one warning per reason, not per graph"
    assert "local function" in warnings[0].getMessage()
    assert _core.encode(a).unencodable is not None
