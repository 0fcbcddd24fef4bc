"""Pure-Python reference of isocache's canonical graph encoding (format 1).

This is the oracle the Rust encoder (`rust/canon.rs`, `rust/canon/fx.rs`) must
agree with byte for byte. It is written for clarity, not speed, and shares no
code with the package beyond `_core.digest_encoding` for the final hash.
"""

from __future__ import annotations

import marshal
import operator
import struct
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

MAGIC = b"ISOCANON"
FORMAT_VERSION = 1

NONE, FALSE, TRUE, INT, BIGINT, FLOAT, STR, NODE = range(8)
TUPLE, LIST, DICT, DTYPE, DEVICE, LAYOUT, MEMORY_FORMAT, SLICE = range(8, 16)
ELLIPSIS, SIZE, CALLABLE, SYM_INT, SYM_FLOAT, SYM_BOOL, COMPLEX, TENSOR = range(16, 24)
GRAPH, LEAF_MODULE = 0x18, 0x19
TENSOR_META, NO_META, UNENCODABLE = 0x20, 0x21, 0xFF

OPS = {
    "placeholder": b"P",
    "get_attr": b"G",
    "call_function": b"F",
    "call_method": b"M",
    "call_module": b"C",
    "output": b"O",
}

PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter, torch.nn.parameter.Buffer)


def _u32(v: int) -> bytes:
    return struct.pack("<I", v)


def _i64(v: int) -> bytes:
    return struct.pack("<q", v)


def _str(s: str) -> bytes:
    b = s.encode()
    return _u32(len(b)) + b


def _float_bits(v: float) -> bytes:
    return struct.pack("<d", v)


def blake3(data: bytes) -> bytes:
    from isocache import _core

    return bytes.fromhex(_core.blake3_hex(data))


def _is_pybind11_record(owner: Any) -> bool:
    return owner is not None and type(owner).__name__.startswith("pybind11_detail_function_record")


def target_name(target: Any) -> str | None:
    """Canonical name of a call target, or None when it has none."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target.name())
    if isinstance(target, torch._ops.OpOverloadPacket):
        return "packet:" + target._qualified_op_name
    if isinstance(target, torch._ops.HigherOrderOperator):
        return "hop:" + target.name()
    module = getattr(target, "__module__", None)
    qualname = getattr(target, "__qualname__", None)
    owner = getattr(target, "__self__", None)
    if isinstance(target, types.BuiltinFunctionType) and _is_pybind11_record(owner):
        # pybind11 (>= 2.13, torch 2.11) binds module functions to an internal
        # record: still a plain function of its module.
        qualname, owner = target.__name__, None
    if module is None or qualname is None:
        return None
    if "<locals>" in qualname:
        # A factory-made function published under its name (torch.nn.functional.max_pool2d).
        name = getattr(target, "__name__", None)
        owner_module = sys.modules.get(module)
        if isinstance(name, str) and owner_module is not None and getattr(owner_module, name, None) is target:
            qualname = name
    full = f"{module}.{qualname}"
    if "<locals>" in qualname or "<lambda>" in qualname:
        return None
    if owner is not None and not isinstance(owner, (types.ModuleType, type)):
        return None
    trusted = any(
        module == m or module.startswith(m + ".") for m in ("torch", "_operator", "operator", "builtins", "math")
    )
    if isinstance(target, types.FunctionType) and not trusted:
        if target.__closure__ is not None:
            return None
        return full + "#" + blake3(marshal.dumps(target.__code__))[:8].hex()
    return full


class ReferenceEncoder:
    def __init__(self, gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None) -> None:
        self.gm = gm
        self.inputs = list(example_inputs or [])
        self.out = bytearray()
        self.positions: dict[torch.fx.Node, int] = {}
        self.symbols: dict[str, int] = {}
        self.unencodable: str | None = None

    # -- primitives -------------------------------------------------------
    def tag(self, t: int) -> None:
        self.out.append(t)

    def mark_unencodable(self, reason: str) -> None:
        self.tag(UNENCODABLE)
        self.out += _str(reason)
        if self.unencodable is None:
            self.unencodable = reason

    # -- graph ------------------------------------------------------------
    def encode(self) -> bytes:
        nodes = list(self.gm.graph.nodes)
        self.out += MAGIC + bytes([FORMAT_VERSION]) + _u32(len(nodes))
        placeholder = 0
        for position, node in enumerate(nodes):
            self.positions[node] = position
            self.out += OPS[node.op]
            if node.op == "placeholder":
                self.out += _u32(placeholder)
                example = self.inputs[placeholder] if placeholder < len(self.inputs) else None
                self.meta(node, example)
                self.value(node.args)
                placeholder += 1
            elif node.op == "get_attr":
                obj = self.resolve(node.target)
                if obj is None:
                    self.mark_unencodable("get_attr target does not exist")
                else:
                    self.attr(obj)
            elif node.op == "output":
                self.value(node.args)
            else:
                if node.op == "call_function":
                    self.callable(node.target)
                elif node.op == "call_method":
                    self.tag(STR)
                    self.out += _str(node.target)
                else:
                    mod = self.resolve(node.target)
                    if mod is None:
                        self.mark_unencodable("call_module target does not exist")
                    else:
                        self.module(mod)
                self.value(node.args)
                self.value(node.kwargs)
        return bytes(self.out)

    def resolve(self, path: Any) -> Any:
        if not isinstance(path, str):
            return None
        obj: Any = self.gm
        for part in path.split("."):
            if not hasattr(obj, part):
                return None
            obj = getattr(obj, part)
        return obj

    def meta(self, node: torch.fx.Node, example: Any) -> None:
        value = node.meta.get("val")
        if value is None:
            value = node.meta.get("example_value")
        if value is None:
            value = example
        if value is None:
            self.tag(NO_META)
        elif isinstance(value, torch.Tensor):
            self.tag(TENSOR_META)
            self.tensor_meta(value)
        else:
            self.value(value)

    def tensor_meta(self, t: torch.Tensor) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        if type(t) not in (*PLAIN_TENSOR_TYPES, FakeTensor):
            self.mark_unencodable(f"tensor subclass {type(t).__qualname__} is not supported")
        self.out += _str(str(t.dtype)) + _str(t.device.type) + _str(str(t.layout))
        self.value(bool(t.requires_grad))
        self.out += _u32(t.dim())
        for d in t.shape:
            self.value(d)
        stride = t.stride()
        self.out += _u32(len(stride))
        for s in stride:
            self.value(s)
        self.value(t.storage_offset())

    # -- values -----------------------------------------------------------
    def value(self, v: Any) -> None:
        if isinstance(v, torch.fx.Node):
            if v in self.positions:
                self.tag(NODE)
                self.out += _u32(self.positions[v])
            else:
                self.mark_unencodable("reference to a node of another graph")
        elif v is None:
            self.tag(NONE)
        elif isinstance(v, bool):
            self.tag(TRUE if v else FALSE)
        elif isinstance(v, int):
            if -(2**63) <= v < 2**63:
                self.tag(INT)
                self.out += _i64(v)
            else:
                self.tag(BIGINT)
                self.out += _str(str(v))
        elif isinstance(v, float):
            self.tag(FLOAT)
            self.out += _float_bits(v)
        elif isinstance(v, str):
            self.tag(STR)
            self.out += _str(v)
        elif type(v) is torch.Size:
            self.sequence(SIZE, v)
        elif isinstance(v, tuple):
            self.sequence(TUPLE, v)
        elif isinstance(v, list):
            self.sequence(LIST, v)
        elif isinstance(v, dict):
            self.tag(DICT)
            self.out += _u32(len(v))
            if all(isinstance(k, str) for k in v):
                for k in sorted(v):
                    self.value(k)
                    self.value(v[k])
            else:
                for k, x in v.items():
                    self.value(k)
                    self.value(x)
        elif type(v) is torch.dtype:
            self.tag(DTYPE)
            self.out += _str(str(v))
        elif type(v) is torch.device:
            self.tag(DEVICE)
            self.out += _str(v.type) + _i64(-1 if v.index is None else v.index)
        elif type(v) is torch.layout:
            self.tag(LAYOUT)
            self.out += _str(str(v))
        elif type(v) is torch.memory_format:
            self.tag(MEMORY_FORMAT)
            self.out += _str(str(v))
        elif isinstance(v, slice):
            self.tag(SLICE)
            self.value(v.start)
            self.value(v.stop)
            self.value(v.step)
        elif v is Ellipsis:
            self.tag(ELLIPSIS)
        elif type(v) is torch.SymInt:
            self.symbolic(SYM_INT, v)
        elif type(v) is torch.SymFloat:
            self.symbolic(SYM_FLOAT, v)
        elif type(v) is torch.SymBool:
            self.symbolic(SYM_BOOL, v)
        elif isinstance(v, torch.Tensor):
            self.tensor_content(v)
        elif isinstance(v, torch.fx.GraphModule):
            self.nested(v)
        elif isinstance(v, complex):
            self.tag(COMPLEX)
            self.out += _float_bits(v.real) + _float_bits(v.imag)
        elif callable(v):
            self.callable(v)
        else:
            self.mark_unencodable(f"value of type {type(v).__qualname__}")

    def sequence(self, t: int, items: Sequence[Any]) -> None:
        self.tag(t)
        self.out += _u32(len(items))
        for item in items:
            self.value(item)

    def callable(self, target: Any) -> None:
        name = target_name(target)
        if name is None:
            self.mark_unencodable("call target has no canonical name")
        else:
            self.tag(CALLABLE)
            self.out += _str(name)

    def rename(self, name: str) -> tuple[str, bool]:
        if name in self.symbols:
            return f"c{self.symbols[name]}", False
        self.symbols[name] = len(self.symbols)
        return f"c{self.symbols[name]}", True

    def symbol_range(self, node: Any, symbol: Any, canonical: str) -> bytes:
        shape_env = getattr(node, "shape_env", None)
        vr = None if shape_env is None else shape_env.var_to_range.get(symbol)
        lower, upper = ("?", "?") if vr is None else (str(vr.lower), str(vr.upper))
        return _str(canonical) + _str(lower) + _str(upper)

    def symbolic(self, t: int, v: Any) -> None:
        import sympy

        node = v.node
        expr = node.expr
        introduced: list[bytes] = []
        if expr.is_Symbol:
            text, new = self.rename(str(expr))
            if new:
                introduced.append(self.symbol_range(node, expr, text))
        else:
            free = sorted(expr.free_symbols, key=str)
            if not free:
                text = str(expr)
            else:
                mapping = {}
                for s in free:
                    canonical, new = self.rename(str(s))
                    if new:
                        introduced.append(self.symbol_range(node, s, canonical))
                    mapping[s] = sympy.Symbol(canonical)
                text = str(expr.xreplace(mapping))
        self.tag(t)
        self.out += _str(text) + _u32(len(introduced)) + b"".join(introduced)

    def attr(self, obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            self.tensor_content(obj)
        elif isinstance(obj, torch.fx.GraphModule):
            self.nested(obj)
        else:
            self.mark_unencodable(f"get_attr of a {type(obj).__qualname__}")

    def tensor_content(self, t: torch.Tensor) -> None:
        from torch._subclasses.fake_tensor import FakeTensor

        self.tag(TENSOR)
        self.tensor_meta(t)
        if isinstance(t, FakeTensor) or t.device.type == "meta":
            self.mark_unencodable("constant tensor without data (fake or meta tensor)")
            return
        if t.layout != torch.strided:
            self.mark_unencodable("constant tensor with a non-strided layout")
            return
        data = t.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b""
        self.out += blake3(raw)

    def nested(self, gm: torch.fx.GraphModule) -> None:
        inner = ReferenceEncoder(gm, None)
        data = inner.encode()
        if inner.unencodable is not None:
            self.mark_unencodable(f"nested graph: {inner.unencodable}")
        else:
            self.tag(GRAPH)
            self.out += blake3(data)

    def module(self, m: Any) -> None:
        if isinstance(m, torch.fx.GraphModule):
            self.nested(m)
            return
        if not isinstance(m, torch.nn.Module):
            self.mark_unencodable("call_module target is not a module")
            return
        cls = type(m)
        if not cls.__module__.startswith("torch.nn.") or any(True for _ in m.children()):
            self.mark_unencodable(
                f"call_module of {cls.__module__}.{cls.__qualname__}: only torch.nn leaf modules are encodable"
            )
            return
        self.tag(LEAF_MODULE)
        self.out += _str(f"{cls.__module__}.{cls.__qualname__}") + _str(str(m.extra_repr()))
        self.value(bool(m.training))
        state = list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False))
        self.out += _u32(len(state))
        for name, t in state:
            self.out += _str(name)
            self.tensor_content(t)


def reference_encode(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None) -> bytes:
    return ReferenceEncoder(gm, example_inputs).encode()


def reference_digest(gm: torch.fx.GraphModule, example_inputs: Sequence[Any] | None = None, namespace: str = "") -> str:
    from isocache import _core

    return _core.digest_encoding(reference_encode(gm, example_inputs), namespace)


__all__ = ["operator", "reference_digest", "reference_encode", "target_name"]
