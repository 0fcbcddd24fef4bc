"""Entry validity's parts, in process: code digests, fingerprints, the compiled check, the guard recorder."""

from __future__ import annotations

import functools
import textwrap
import types
from typing import Any

import pytest

from isocache._torch.guards import GuardRecorder, check_scope
from isocache.entry import ENTRY_MAGIC, EntryRefused, pack, unpack
from isocache.fingerprint import code_digest, fingerprint
from isocache.validity import Dependencies, Fact, Globals, Uncheckable, describe, readable


def define(source: str, filename: str = "<test>", name: str = "f") -> Any:
    scope: dict[str, Any] = {}
    exec(compile(textwrap.dedent(source), filename, "exec"), scope)
    return scope[name]


def test_code_digest_is_the_code_not_where_it_lives() -> None:
    f = define("def f(x):\n    return x * 2\n", "a.py")
    moved = define("\n\n\n# a comment\ndef f(x):\n    return x * 2\n", "/elsewhere/b.py")
    edited = define("def f(x):\n    return x * 3\n", "a.py")
    assert code_digest(f.__code__) == code_digest(moved.__code__), "file and line numbers are not the code"
    assert code_digest(f.__code__) != code_digest(edited.__code__), "a changed constant is"


def test_nested_code_and_closures_are_part_of_a_function() -> None:
    outer = "def f(x):\n    def g(y):\n        return y + {n}\n    return g(x)\n"
    assert fingerprint(define(outer.format(n=1))) != fingerprint(define(outer.format(n=2)))

    def wrap(inner: Any) -> Any:
        @functools.wraps(inner)
        def wrapper(*args: Any) -> Any:
            return inner(*args)

        return wrapper

    one = wrap(define("def f(x):\n    return x + 1\n"))
    two = wrap(define("def f(x):\n    return x + 2\n"))
    assert one.__code__ is two.__code__
    assert fingerprint(one) != fingerprint(two), "a wrapper is checked with what it wraps"
    assert fingerprint(define("def f(x, k=1):\n    return x\n")) != fingerprint(
        define("def f(x, k=2):\n    return x\n")
    )


def test_fingerprints_of_values_modules_and_classes() -> None:
    assert fingerprint(0.5) == "float:0.5" and fingerprint(True) != fingerprint(1)
    assert fingerprint(types) == "module:types"
    assert fingerprint(int).startswith("type:builtins.int")


def test_readable_names() -> None:
    assert readable("L['self']._modules['layers']._modules['3'].alpha") == "self.layers[3].alpha"
    assert readable("G['__import_pkg_dot_helpers'].helper") == "pkg.helpers.helper"
    assert readable("G['SCALE'] == 1.0") == "SCALE == 1.0"


class Obj:
    alpha = 0.5


def check(dependencies: Dependencies, frame: dict[str, Any], scope: dict[str, Any] | None = None) -> Any:
    return dependencies.first_failure(frame, Globals(scope or {}), check_scope())


def test_a_check_survives_its_round_trip_and_names_what_failed() -> None:
    facts = [
        Fact("holds", "L['self'].alpha == 0.5", subject="L['self'].alpha"),
        Fact("is", "G['helpers_mod']", fingerprint(functools)),
    ]
    saved = Dependencies.from_bytes(Dependencies(facts).to_bytes())
    obj = Obj()
    assert check(saved, {"self": obj}, {"helpers_mod": functools}) is None
    obj.alpha = 0.25
    failed = check(Dependencies.from_bytes(Dependencies(facts).to_bytes()), {"self": obj}, {"helpers_mod": functools})
    assert failed is not None
    fact, found = failed
    assert fact is not None and fact.expr.startswith("L['self'].alpha")
    assert "self.alpha is 0.25" in describe(fact, found)
    obj.alpha = 0.5
    fact, found = check(saved, {"self": obj}, {"helpers_mod": types})
    assert "helpers_mod is module:types" in describe(fact, found)


def test_a_fact_that_raises_is_a_failure_not_an_error() -> None:
    dependencies = Dependencies([Fact("holds", "L['self'].missing == 1", subject="L['self'].missing")])
    _, found = check(dependencies, {"self": Obj()})
    assert "cannot be" in found


def test_modules_named_by_dynamo_resolve_by_import() -> None:
    scope = Globals({}, {"___module_fn_1234_c0": "functools"})
    assert scope["__import_functools"] is functools
    assert scope["___module_fn_1234_c0"] is functools
    with pytest.raises(KeyError):
        scope["nothing"]


class _Entry:
    """A stand-in for torch's GuardFilterEntry, with the fields the recorder reads."""

    def __init__(self, guard_type: str, name: str, value: Any = None, code_parts: tuple[str, ...] = ()) -> None:
        self.guard_type = guard_type
        self.name = name
        self.has_value = value is not None
        self.value = value
        self.is_global = name.startswith("G[")
        self.code_parts = code_parts
        self.orig_guard = types.SimpleNamespace(name=name, create_fn=lambda: None)


def test_a_guard_no_fact_can_check_is_not_saved() -> None:
    recorder = GuardRecorder()
    recorder([_Entry("SOME_NEW_GUARD", "L['self'].x")])
    with pytest.raises(Uncheckable, match="SOME_NEW_GUARD"):
        recorder.finish([])


def test_traced_code_that_no_guard_reaches_is_not_saved() -> None:
    recorder = GuardRecorder()
    recorder([_Entry("CONSTANT_MATCH", "L['self'].alpha", 0.5, ("L['self'].alpha == 0.5",))])
    stray = define("def stray(x):\n    return x\n", "/somewhere/user_code.py", "stray")
    with pytest.raises(Uncheckable, match="stray"):
        recorder.finish([stray.__code__])
    ok = GuardRecorder()
    ok([_Entry("FUNCTION_MATCH", "G['stray']", stray)])
    facts = ok.finish([stray.__code__])
    assert any(f.expr == "G['stray']" for f in facts)


def test_an_entry_of_an_older_format_is_refused() -> None:
    """An entry saved before entries recorded what they depend on is never run (it is traced again)."""
    with pytest.raises(EntryRefused, match="saved by an older isocache"):
        unpack(b"ISOCMODEL1\n" + (2).to_bytes(4, "little") + b"{}")
    packed = pack({"model": "M"}, b"torch", b"facts", {"ab": (b"piece", 1.5)})
    assert packed.startswith(ENTRY_MAGIC)
    entry = unpack(packed)
    assert (entry.compiled, entry.dependencies, entry.bundle) == (b"torch", b"facts", {"ab": (b"piece", 1.5)})
    with pytest.raises(EntryRefused, match="length"):
        unpack(packed + b"x")
