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
- ``is``: an expression whose value must have the same fingerprint
  (`fingerprint.py`): a function by the hash of its code (bytecode, constants,
  names, nested code), a class by the code of its methods (its own and its
  bases' outside torch), a module by its name, a plain value by its ``repr``.

At save time the facts are compiled into one check function (marshalled into
the entry, so a warm start does not compile it again) and checked once
against the live model: an entry whose facts do not hold where they were
recorded is never saved. At load the check runs before anything is loaded;
the first fact that fails is described in one line (`describe`).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import marshal
import re
import types
import zlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from . import _core
from .fingerprint import cached_fingerprint, cached_members

__all__ = ["Dependencies", "Fact", "Globals", "Uncheckable", "describe", "readable"]

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
        full = dict(scope, ___fp=cached_fingerprint(), ___members=cached_members())
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
