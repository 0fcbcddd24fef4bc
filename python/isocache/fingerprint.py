"""Fingerprints: what a guarded object is, in a form another process can compare.

A function is fingerprinted by the hash of its code (bytecode, constants,
names, nested code), its defaults and what its closure holds; a class by the
code of its methods (its own and its bases' outside torch); a module by its
name; a plain value by its ``repr``. Code in torch and the standard library is
not fingerprinted: the namespace (torch's build, Python's version) covers it.
`validity.py` compares these fingerprints in an entry's ``is`` facts.
"""

from __future__ import annotations

import enum
import functools
import sys
import sysconfig
import types
from typing import Any, Callable

from . import _core

__all__ = [
    "cached_fingerprint",
    "cached_members",
    "code_digest",
    "fingerprint",
    "library_code",
    "members",
    "traced_members",
]

_PLAIN = (type(None), bool, int, float, complex, str, bytes)
# Code in these places is covered by the namespace (torch's build, Python's version), not by facts.
_COVERED_ROOTS = tuple(
    p for p in {sysconfig.get_paths().get("stdlib"), sysconfig.get_paths().get("platstdlib")} if isinstance(p, str)
)


@functools.cache
def _torch_root() -> str:
    import torch

    return str(torch.__file__).rsplit("/", 1)[0] + "/"


def _library_module(module: str | None) -> bool:
    """Code whose version the namespace fixes: torch's and Python's own."""
    if not module:
        return False
    top = module.split(".", 1)[0]
    return top in ("torch", "builtins") or top in getattr(sys, "stdlib_module_names", ())


def library_code(code: types.CodeType) -> bool:
    """Whether `code` belongs to torch or Python's standard library (checked by the namespace)."""
    filename = code.co_filename
    return (
        filename.startswith(_torch_root())
        or filename.startswith("<frozen ")  # the standard library's frozen modules
        or (bool(_COVERED_ROOTS) and filename.startswith(_COVERED_ROOTS))
    )


# id(code) -> (code, digest): code objects never change; holding them keeps the ids valid.
_CODE_DIGESTS: dict[int, tuple[types.CodeType, str]] = {}


def _const_text(value: Any, codes: list[types.CodeType] | None) -> str:
    if isinstance(value, types.CodeType):
        return "code:" + code_digest(value, codes)
    if isinstance(value, (tuple, frozenset)):
        parts = [_const_text(v, codes) for v in value]
        if isinstance(value, frozenset):
            parts.sort()  # a frozenset's order follows string hashing, which differs between processes
        return f"{type(value).__name__}({','.join(parts)})"
    return f"{type(value).__name__}:{value!r}"


def code_digest(code: types.CodeType, codes: list[types.CodeType] | None = None) -> str:
    """A digest of what `code` does: bytecode, constants (nested code by its digest), names and
    argument counts; not its file, line numbers or qualified name, so a moved file or an added
    comment keeps it. `codes`, when given, collects `code` and every code nested in it."""
    if codes is not None:
        codes.append(code)
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                code_digest(const, codes)
    cached = _CODE_DIGESTS.get(id(code))
    if cached is not None and cached[0] is code:
        return cached[1]
    text = "\n".join(
        [
            code.co_name,
            repr((code.co_argcount, code.co_posonlyargcount, code.co_kwonlyargcount, code.co_flags)),
            code.co_code.hex(),
            repr(code.co_names),
            repr(code.co_varnames),
            repr(code.co_freevars),
            repr(code.co_cellvars),
            *(_const_text(c, None) for c in code.co_consts),
        ]
    )
    digest = _core.blake3_hex(text.encode())[:32]
    _CODE_DIGESTS[id(code)] = (code, digest)
    return digest


def _qualname(obj: Any) -> str:
    return f"{getattr(obj, '__module__', None) or '?'}.{getattr(obj, '__qualname__', None) or getattr(obj, '__name__', '?')}"


def _class_text(cls: type, codes: list[types.CodeType] | None, memo: dict[Any, tuple[Any, str]] | None = None) -> str:
    """A class by name and, for classes outside torch and the standard library, the code of every
    function defined in it or its bases (a method edited anywhere changes it). `memo`: class texts
    already made in this check (by class)."""
    if memo is not None:
        return _recall(memo, id(cls), cls, lambda: _class_text(cls, codes))
    parts = [_qualname(cls)]
    for base in cls.__mro__:
        if _library_module(getattr(base, "__module__", None)):
            continue
        for name, value in sorted(vars(base).items(), key=lambda kv: kv[0]):
            for fn in _function_of(value):
                parts.append(f"{_qualname(base)}.{name}:{_function_text(fn, codes)}")
    return "|".join(parts)


def _function_text(fn: types.FunctionType, codes: list[types.CodeType] | None, depth: int = 0) -> str:
    """A function by its code, its defaults and what its closure holds (a wrapper's wrapped function
    by its own code, a few levels deep)."""
    parts = [code_digest(fn.__code__, codes)]
    for value in (*(fn.__defaults__ or ()), *sorted((fn.__kwdefaults__ or {}).items())):
        parts.append(_value_text(value, codes, depth))
    for cell in fn.__closure__ or ():
        try:
            parts.append(_value_text(cell.cell_contents, codes, depth))
        except ValueError:  # an empty cell
            parts.append("empty")
    return parts[0] if len(parts) == 1 else _core.blake3_hex("|".join(parts).encode())[:32]


def _value_text(value: Any, codes: list[types.CodeType] | None, depth: int) -> str:
    if isinstance(value, types.FunctionType):
        return "function" if depth >= 4 else _function_text(value, codes, depth + 1)
    if isinstance(value, _PLAIN) or (isinstance(value, tuple) and all(isinstance(v, _PLAIN) for v in value)):
        return repr(value)
    return _qualname(value if isinstance(value, type) else type(value))


def _function_of(value: Any) -> list[types.FunctionType]:
    """The plain functions a class attribute holds (a method, a static or class method, a property)."""
    if isinstance(value, types.FunctionType):
        return [value]
    if isinstance(value, (staticmethod, classmethod)):
        return _function_of(value.__func__)
    if isinstance(value, property):
        return [f for f in (value.fget, value.fset, value.fdel) if isinstance(f, types.FunctionType)]
    return []


def _resolve(cls: type, name: str) -> tuple[type, Any] | None:
    """`name` as attribute lookup on `cls` finds it: the defining class and the raw value."""
    for base in cls.__mro__:
        if name in vars(base):
            return base, vars(base)[name]
    return None


def traced_members(cls: type, traced: set[int]) -> tuple[str, ...]:
    """The names of `cls`'s functions (methods, properties, static and class methods, defined outside
    torch and the standard library) whose code, or code nested in them, is in `traced` (ids)."""
    names = []
    for name in sorted({n for base in cls.__mro__ for n in vars(base)}):
        found = _resolve(cls, name)
        if found is None or _library_module(getattr(found[0], "__module__", None)):
            continue
        for fn in _function_of(found[1]):
            nested: list[types.CodeType] = []
            _function_text(fn, nested)
            if any(id(c) in traced for c in nested):
                names.append(name)
                break
    return tuple(names)


def members(cls: Any, names: tuple[str, ...], codes: list[types.CodeType] | None = None) -> str:
    """A class by its name and the code of the named members, as attribute lookup finds them (an edited
    method, or a new override in a subclass, changes it)."""
    if not isinstance(cls, type):
        return f"not a class: {_qualname(type(cls))}"
    parts = [_qualname(cls)]
    for name in names:
        found = _resolve(cls, name)
        if found is None:
            parts.append(f"{name}:missing")
            continue
        texts = [_function_text(fn, codes) for fn in _function_of(found[1])]
        parts.append(f"{_qualname(found[0])}.{name}:{','.join(texts) or type(found[1]).__name__}")
    return "|".join(parts)


def fingerprint(
    obj: Any, codes: list[types.CodeType] | None = None, memo: dict[Any, tuple[Any, str]] | None = None
) -> str:
    """What a guarded object is, in a form another process can compare (see the module docstring).
    `codes`, when given, collects every code object the fingerprint covers; `memo` keeps class texts
    for one check."""
    if isinstance(obj, _PLAIN):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, enum.Enum):
        return f"enum:{_qualname(type(obj))}.{obj.name}"
    if isinstance(obj, (tuple, list)) and len(obj) <= 64 and all(isinstance(v, _PLAIN) for v in obj):
        return f"{type(obj).__name__}:{obj!r}"
    if isinstance(obj, types.ModuleType):
        return f"module:{obj.__name__}"
    if isinstance(obj, type):
        return f"type:{_class_text(obj, codes, memo)}"
    if isinstance(obj, types.FunctionType):
        return f"function:{_qualname(obj)}:{_function_text(obj, codes)}"
    if isinstance(obj, types.MethodType):
        return f"method:{fingerprint(obj.__func__, codes)} of {_qualname(type(obj.__self__))}"
    if isinstance(obj, types.CodeType):
        return f"code:{code_digest(obj, codes)}"
    if isinstance(obj, functools.partial):
        return f"partial:{fingerprint(obj.func, codes)}"
    if isinstance(obj, (staticmethod, classmethod, property)):
        return f"{type(obj).__name__}:" + ",".join(fingerprint(f, codes) for f in _function_of(obj))
    module = type(obj).__module__
    if module == "torch" and type(obj).__name__ in ("dtype", "device", "layout", "memory_format"):
        return f"torch:{obj}"
    if callable(obj) and not hasattr(obj, "__dict__") and hasattr(obj, "__qualname__"):
        owner = getattr(obj, "__self__", None)
        of = (
            ""
            if owner is None or isinstance(owner, types.ModuleType)
            else f" of {_qualname(owner if isinstance(owner, type) else type(owner))}"
        )
        return f"builtin:{_qualname(obj)}{of}"
    tensor_spec = _tensor_spec(obj)
    if tensor_spec is not None:
        return tensor_spec
    return f"object:{_class_text(type(obj), codes, memo)}"


def _tensor_spec(obj: Any) -> str | None:
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(obj, torch.Tensor):
        return None
    return f"tensor:{obj.dtype}:{tuple(obj.shape)}:{obj.stride()}:{obj.device.type}:{obj.requires_grad}"


# -- one check's memory ----------------------------------------------------------------------------------------


def _recall(memo: dict[Any, tuple[Any, str]], key: Any, obj: Any, make: Callable[[], str]) -> str:
    """`make()` once per object in one check: `memo` maps `key` (built on ``id(obj)``) to the object
    and its text; holding the object keeps its id from being reused."""
    hit = memo.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]
    text = make()
    memo[key] = (obj, text)
    return text


def cached_fingerprint() -> Callable[[Any], str]:
    """`fingerprint` with one check's memory: 32 layers of one class are fingerprinted once."""
    seen: dict[Any, tuple[Any, str]] = {}
    classes: dict[Any, tuple[Any, str]] = {}
    return lambda obj: _recall(seen, id(obj), obj, lambda: fingerprint(obj, None, classes))


def cached_members() -> Callable[[Any, tuple[str, ...]], str]:
    """`members` with one check's memory (32 layers of one class)."""
    seen: dict[Any, tuple[Any, str]] = {}
    return lambda cls, names: _recall(seen, (id(cls), names), cls, lambda: members(cls, names))
