"""Entry validity: what a saved model's trace depended on, recorded when it is saved, checked when it loads.

Dynamo specialises a trace on far more than the model's tensors: the code of
every function it inlined (wherever defined: another file, ``__main__``, code
with no file), module globals, attributes of modules and objects, ``training``,
global torch state. Its guards list those facts, but most of them compare
object ids, which mean nothing in another process. A saved entry therefore
carries its own list of *facts*, portable forms of the same guards:

- ``holds``: a Python expression over the call's frame (``L``) and the
  traced function's globals (``G``) that must be true, such as
  ``L['self']._modules['blocks']._modules['0'].alpha == 0.5`` (Dynamo's own
  check, where it names no object id);
- ``is``: an expression whose value must have the same `fingerprint`: a
  function by the hash of its code (bytecode, constants, names, nested code),
  a class by the code of its methods (its own and its bases' outside torch), a
  module by its name, a plain value by its ``repr``.

At save time the facts are compiled into one check function (marshalled into
the entry, so a warm start does not compile it again) and checked once
against the live model: an entry whose facts do not hold where they were
recorded is never saved. At load the check runs before anything is loaded;
the first fact that fails is described in one line (`describe`).
"""

from __future__ import annotations

import builtins
import dataclasses
import enum
import functools
import json
import marshal
import re
import sys
import sysconfig
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

from . import _core

__all__ = ["Dependencies", "Fact", "Uncheckable", "code_digest", "fingerprint", "readable"]

#: The version of the facts' encoding and of the generated check (part of every entry's record).
FACTS_FORMAT = 1


class Uncheckable(_core.CacheError):
    """Something a trace depended on that no fact can check in another process: the entry is not saved."""


@dataclasses.dataclass(frozen=True)
class Fact:
    """One thing a trace depended on (see the module docstring). `subject` names what a ``holds`` fact
    is about (shown with its current value when the fact fails)."""

    kind: str  # "holds" | "is" | "equals" (`expr` evaluates to the string `expected`)
    expr: str
    expected: str = ""
    subject: str = ""

    def source(self) -> str:
        """The fact as one Python condition (``___fp`` is `fingerprint`)."""
        if self.kind == "holds":
            return f"({self.expr})"
        if self.kind == "equals":
            return f"({self.expr} == {self.expected!r})"
        return f"(___fp({self.expr}) == {self.expected!r})"


# -- fingerprints ----------------------------------------------------------------------------------------------

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


# -- readable names ------------------------------------------------------------------------------------------

_READABLE = [
    (re.compile(r"^___members\((.*), \([^()]*\)\)$"), lambda m: f"the code of {m.group(1)}"),
    (re.compile(r"G\['__import_([A-Za-z0-9_]+)'\]"), lambda m: m.group(1).replace("_dot_", ".")),
    (re.compile(r"L\['([A-Za-z_][A-Za-z0-9_]*)'\]"), lambda m: m.group(1)),
    (re.compile(r"G\['([A-Za-z_][A-Za-z0-9_]*)'\]"), lambda m: m.group(1)),
    (re.compile(r"\._modules\['(\d+)'\]"), lambda m: f"[{m.group(1)}]"),
    (re.compile(r"\._modules\['([A-Za-z_][A-Za-z0-9_]*)'\]"), lambda m: f".{m.group(1)}"),
    (
        re.compile(r"dict\(type\(([^()]*)\)\.__dict__\)\['([A-Za-z_][A-Za-z0-9_]*)'\]"),
        lambda m: f"type({m.group(1)}).{m.group(2)}",
    ),
]


def readable(expr: str) -> str:
    """A guard's expression as a person would write it: ``L['self']._modules['layers']._modules['3'].alpha``
    -> ``self.layers[3].alpha``, ``G['__import_helpers'].helper`` -> ``helpers.helper``."""
    for pattern, replace in _READABLE:
        expr = pattern.sub(replace, expr)
    return expr


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the record ----------------------------------------------------------------------------------------------


class Globals(Mapping[str, Any]):
    """The traced function's globals as Dynamo's guards name them: also the modules it imported under
    ``__import_<name>``, the builtins under ``__builtins_dict___<n>``, and `modules`: other names
    Dynamo bound to modules, with the modules' names."""

    def __init__(self, scope: Mapping[str, Any], modules: Mapping[str, str] = {}) -> None:
        self._scope = scope
        self._modules = modules

    def __getitem__(self, name: str) -> Any:
        try:
            return self._scope[name]
        except KeyError:
            pass
        module = self._modules.get(name)
        if module is None and name.startswith("__import_"):
            module = name.removeprefix("__import_").replace("_dot_", ".")
        if module is not None:
            import importlib

            return importlib.import_module(module)
        if name.startswith("__builtins_dict__"):
            return builtins.__dict__
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._scope)

    def __len__(self) -> int:
        return len(self._scope)


_CHECK_NAME = "___isocache_check"


class Dependencies:
    """The facts one saved entry depends on, and its compiled check. Read from an entry, the facts are
    parsed only when needed (a check that passes runs only the compiled code)."""

    def __init__(
        self, facts: Iterable[Fact] | None = None, *, facts_json: bytes | None = None, code: bytes | None = None
    ) -> None:
        self._facts = None if facts is None else list(dict.fromkeys(facts))
        self._facts_json = facts_json
        self._marshalled = code
        self._code: types.CodeType | None = None

    @property
    def facts(self) -> list[Fact]:
        if self._facts is None:
            try:
                record = json.loads(zlib.decompress(self._facts_json) if self._facts_json else b"null")
            except zlib.error as e:
                raise ValueError(f"the dependency record is damaged ({e})") from None
            if not isinstance(record, dict) or record.get("format") != FACTS_FORMAT:
                raise ValueError("the dependency record has another format")
            self._facts = [Fact(str(k), str(e), str(x), str(s)) for k, e, x, s in record["facts"]]
        return self._facts

    # -- (de)serialisation
    def to_bytes(self) -> bytes:
        """The facts as compressed JSON (read only when one fails: a tenth of the size to read at every
        warm start), then the marshalled check (Python-version specific, like the namespace)."""
        text = zlib.compress(
            json.dumps(
                {"format": FACTS_FORMAT, "facts": [[f.kind, f.expr, f.expected, f.subject] for f in self.facts]}
            ).encode()
        )
        code = marshal.dumps(self._compile())
        return len(text).to_bytes(4, "little") + text + code

    @classmethod
    def from_bytes(cls, data: bytes) -> Dependencies:
        """A `to_bytes` record (its facts parsed on first use)."""
        size = int.from_bytes(data[:4], "little")
        if len(data) < 4 or size + 4 > len(data):
            raise ValueError("the dependency record is truncated")
        return cls(facts_json=data[4 : 4 + size], code=data[4 + size :])

    def digest(self) -> str:
        return _core.blake3_hex(json.dumps([dataclasses.astuple(f) for f in self.facts]).encode())[:32]

    # -- checking
    def _source(self) -> str:
        lines = [f"def {_CHECK_NAME}(L, G):"]
        lines += [f"    if not {fact.source()}: return {i}" for i, fact in enumerate(self.facts)]
        lines.append("    return -1")
        return "\n".join(lines) + "\n"

    def _compile(self) -> types.CodeType:
        if self._code is None:
            if self._marshalled is not None:
                self._code = marshal.loads(self._marshalled)
            else:
                self._code = compile(self._source(), "<isocache dependency check>", "exec")
        return self._code

    def first_failure(
        self, frame: Mapping[str, Any], globals_: Mapping[str, Any], scope: Mapping[str, Any]
    ) -> tuple[Fact, str] | None:
        """The first fact that does not hold for this call, with what is found instead; None when all hold."""
        full = dict(scope, ___fp=_cached_fingerprint(), ___members=_cached_members())
        namespace = dict(full)
        exec(self._compile(), namespace)  # from a checked, private store: the same trust as the code beside it
        try:
            index = namespace[_CHECK_NAME](frame, globals_)
        except Exception:
            index = None  # some fact raised: find which, one by one
        if index == -1:
            return None
        facts = self.facts if index is None else [self.facts[index]]
        for fact in facts:
            found = _evaluate(fact, frame, globals_, full)
            if found is not None:
                return fact, found
        return None if index is None else (self.facts[index], "")

    def differences(self, other: Dependencies, limit: int = 5) -> list[str]:
        """How this record and `other` differ, one readable line a subject (for `explain`): what each
        expects of it, at most `limit` lines and a count of the rest."""
        mine = {f.subject or f.expr: f for f in self.facts}
        theirs = {f.subject or f.expr: f for f in other.facts}
        lines = []
        for key in [*mine, *(k for k in theirs if k not in mine)]:
            a, b = mine.get(key), theirs.get(key)
            if a != b:
                lines.append(f"{readable(key)}: {_expected_text(a)} | {_expected_text(b)}")
        if len(lines) > limit:
            lines = [*lines[:limit], f"... and {len(lines) - limit} more"]
        return lines


def _expected_text(fact: Fact | None) -> str:
    if fact is None:
        return "not checked"
    return readable(fact.expr) if fact.kind == "holds" else _short(fact.expected, 60)


def _recall(memo: dict[Any, tuple[Any, str]], key: Any, obj: Any, make: Callable[[], str]) -> str:
    """`make()` once per object in one check: `memo` maps `key` (built on ``id(obj)``) to the object
    and its text; holding the object keeps its id from being reused."""
    hit = memo.get(key)
    if hit is not None and hit[0] is obj:
        return hit[1]
    text = make()
    memo[key] = (obj, text)
    return text


def _cached_fingerprint() -> Callable[[Any], str]:
    """`fingerprint` with one check's memory: 32 layers of one class are fingerprinted once."""
    seen: dict[Any, tuple[Any, str]] = {}
    classes: dict[Any, tuple[Any, str]] = {}
    return lambda obj: _recall(seen, id(obj), obj, lambda: fingerprint(obj, None, classes))


def _cached_members() -> Callable[[Any, tuple[str, ...]], str]:
    """`members` with one check's memory (32 layers of one class)."""
    seen: dict[Any, tuple[Any, str]] = {}
    return lambda cls, names: _recall(seen, (id(cls), names), cls, lambda: members(cls, names))


def _evaluate(fact: Fact, frame: Mapping[str, Any], globals_: Mapping[str, Any], scope: dict[str, Any]) -> str | None:
    """None when `fact` holds, else what was found instead (readable)."""
    names = dict(scope, L=frame, G=globals_)
    try:
        if fact.kind == "holds":
            if eval(fact.expr, names):  # the fact's own expression, from the checked store
                return None
            if fact.subject:
                try:
                    return f"{readable(fact.subject)} is {_short(repr(eval(fact.subject, names)))}"
                except Exception as e:
                    return f"{readable(fact.subject)} cannot be read ({type(e).__name__})"
            return "it no longer holds"
        found = eval(fact.expr, names)
        found = found if fact.kind == "equals" else scope["___fp"](found)
    except Exception as e:
        return f"it cannot be evaluated ({type(e).__name__}: {_short(str(e), 60)})"
    return None if found == fact.expected else found


def describe(fact: Fact, found: str) -> str:
    """One readable clause for a fact that failed (`found`: what `first_failure` returned)."""
    what = readable(fact.expr)
    if fact.expr.startswith("___members("):
        subject = readable(fact.expr[len("___members(") :].rsplit(", (", 1)[0])
        return f"the code of {fact.expected.split('|')[0]} (the class of {subject}) changed"
    if fact.kind == "holds":
        return f"{what} was true when it was traced; now {found}" if found else f"{what} no longer holds"
    kind = fact.expected.split(":", 1)[0]
    if kind == "function" and found.startswith("function:"):
        return f"the code of {what} ({fact.expected.split(':')[1]}) changed"
    if kind in ("type", "object") and found.startswith(kind + ":"):
        return f"the code of the class of {what} ({fact.expected.split(':')[1].split('|')[0]}) changed"
    return f"{what} is {_short(found)}, it was {_short(fact.expected)} when traced"
