"""Dynamo's guards, turned into facts another process can check (see `isocache.validity`).

A saved compiled function keeps only the guards torch can check in another
process (tensor metadata, symbolic shapes, global state); the rest compare
object ids. `GuardRecorder` is the guard filter isocache's ahead-of-time
capture runs with: it keeps what torch keeps and turns every other guard into
a `Fact`. Written against torch 2.12-2.15 (``GuardFilterEntry`` with
``code_parts`` and ``orig_guard``, ``torch._dynamo.guards._get_closure_vars``).
"""

from __future__ import annotations

import ast
import functools
import inspect
import re
import types
from typing import Any

import torch

from ..fingerprint import fingerprint, library_code, members, traced_members
from ..validity import Fact, Globals, Uncheckable

__all__ = ["GuardRecorder", "check_scope", "frame_locals", "refused_input", "root_globals", "torch_state"]

#: Guards on an object's identity: checked as the object's fingerprint.
_IDENTITY = frozenset(
    {"TYPE_MATCH", "CLASS_MATCH", "ID_MATCH", "MODULE_MATCH", "BUILTIN_MATCH", "CLOSURE_MATCH", "FUNCTION_MATCH"}
)
#: Guards on global state: one `torch_state` fact covers them.
_STATE = frozenset(
    {
        "GRAD_MODE",
        "DETERMINISTIC_ALGORITHMS",
        "TORCH_FUNCTION_STATE",
        "DEFAULT_DEVICE",
        "AUTOGRAD_SAVED_TENSORS_HOOKS",
        "GLOBAL_STATE",
        "SHAPE_ENV",
    }
)
# A rendered check that compares ids (``___check_obj_id(x, 1403...)``) means nothing in another process.
_BY_ID = re.compile(r"___check_(obj|type)_id|\bid\(|0x[0-9a-f]{6,}")
_GLOBAL = re.compile(r"G\['([^']+)'\]")
_PER_PROCESS = re.compile(r"_\d+_c\d+|___module_.*")


def torch_state() -> str:
    """The global torch state a trace is specialised on, as one string."""
    hooks = torch._C._autograd._top_saved_tensors_default_hooks(True)
    return repr(
        (
            torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(),
            torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled(),
            str(torch.get_default_dtype()),
            str(torch.get_default_device()),
            torch._C._is_torch_function_enabled(),
            hooks is not None,
        )
    )


@functools.cache
def check_scope() -> dict[str, Any]:
    """The names Dynamo's rendered checks use (``___dict_contains``, ``utils_device``, ``torch``), and
    ``___state`` for `torch_state`."""
    from torch._dynamo import guards

    scope = dict(guards._get_closure_vars())
    scope["___state"] = torch_state
    scope["___members"] = members
    scope["__builtins__"] = __builtins__
    return scope


def frame_locals(target: Any, bound: tuple[Any, ...], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The traced frame's locals for a call, as Dynamo's guards name them (``L['self']``, ``L['args']``).

    A module's call is traced from ``Module.__call__`` (``self, *args, **kwargs``); a function (or
    an unbound method called with its module first) from its own signature, plus its closure's cells.
    """
    if isinstance(target, torch.nn.Module):
        function: Any = type(target).__call__
        bound = (target,)
    else:
        function = target
    signature = inspect.signature(function, follow_wrapped=False)  # the frame is the wrapper itself
    call = signature.bind(*bound, *args, **kwargs)
    call.apply_defaults()
    frame: dict[str, Any] = {}
    code = getattr(function, "__code__", None)
    closure = getattr(function, "__closure__", None)
    if code is not None and closure:
        frame.update((name, cell.cell_contents) for name, cell in zip(code.co_freevars, closure))
    frame.update(call.arguments)
    return frame


def root_globals(target: Any, modules: dict[str, str]) -> Globals:
    """The globals of the traced frame's function (Dynamo's ``G``); `modules`: the per-process names
    Dynamo gave modules (``___module_<name>_<id>_c0``) and the modules they stand for."""
    function = type(target).__call__ if isinstance(target, torch.nn.Module) else target
    return Globals(getattr(function, "__globals__", {}), modules)


def _plain_instance(value: Any) -> bool:
    """An instance of an ordinary class (fingerprinted by its class), not a function, module or value."""
    return (
        hasattr(value, "__dict__")
        and not isinstance(value, (types.FunctionType, types.MethodType, types.ModuleType, functools.partial))
        and not callable(getattr(value, "__qualname__", None))
        and not isinstance(value, torch.Tensor)
    )


class GuardRecorder:
    """A guard filter for ahead-of-time capture: keeps what torch keeps (tensor metadata, symbolic
    shapes, global state), turns every other guard into a `Fact`."""

    def __init__(self) -> None:
        self.facts: list[Fact] = [Fact("is", "___state()", fingerprint(torch_state()))]
        self.covered: list[types.CodeType] = []  # code the facts' fingerprints cover
        self.problems: list[str] = []
        # Guards on an object's identity: (expression, object), fingerprinted once the traced code is known.
        self._identities: list[tuple[str, Any]] = []

    def __call__(self, entries: list[Any]) -> list[bool]:
        keep: list[bool] = torch.compiler.keep_portable_guards_unsafe(entries)  # type: ignore[no-untyped-call]
        for entry, kept in zip(entries, keep):
            if not kept:
                try:
                    self._record(entry)
                except Exception as e:  # a guard this torch describes otherwise: not saved, never a failed trace
                    self.problems.append(f"{getattr(entry, 'guard_type', '?')}: {type(e).__name__}: {e}")
        return keep

    def _record(self, entry: Any) -> None:
        kind = entry.guard_type
        if kind in _STATE:
            return
        guard = entry.orig_guard
        name = str(guard.name)  # in the checks' own form: ``L['self']...``, ``G['...']``
        options = getattr(guard.create_fn, "keywords", None) or {}
        # ``code_parts`` (torch 2.15) snapshots the rendered checks; older torch has them on the guard.
        parts = [str(p) for p in (getattr(entry, "code_parts", None) or getattr(guard, "code_list", None) or ())]
        if kind in _IDENTITY or any(_BY_ID.search(p) for p in parts):
            if not entry.has_value:
                self.problems.append(f"{kind} on {name}: no value to fingerprint")
                return
            if kind == "TYPE_MATCH":  # the object's type, not the object: one class text for 32 layers
                self._identities.append((f"type({name})", type(entry.value)))
            else:
                self._identities.append((name, entry.value))
        if kind in _IDENTITY:
            return
        checks = [p for p in parts if not _BY_ID.search(p)]
        if not parts:
            if kind == "EMPTY_NN_MODULE_HOOKS_DICT":
                checks = [f"not {name}"]
            elif kind == "NOT_PRESENT_IN_GENERIC_DICT" and "attr" in options:
                checks = [f"not ___dict_contains({options['attr']!r}, {name}.__dict__)"]
            elif kind == "DICT_CONTAINS" and "key" in options:
                checks = [f"___dict_contains({options['key']!r}, {name})"]
            elif kind == "DICT_NOT_CONTAINS" and "key" in options:
                checks = [f"not ___dict_contains({options['key']!r}, {name})"]
            elif kind == "HASATTR" and "attr" in options and entry.has_value:
                present = hasattr(entry.value, options["attr"])  # as Dynamo's guard decides
                checks = [f"{'' if present else 'not '}hasattr({name}, {options['attr']!r})"]
            elif kind == "DUPLICATE_INPUT" and "source_b" in options:
                other = options["source_b"].name
                checks = [f"{name} is {other() if callable(other) else other}"]
            else:
                self.problems.append(f"{kind} on {name}")
                return
        for check in checks:
            try:
                compile(check, "<guard>", "eval")
            except SyntaxError:
                self.problems.append(f"{kind} on {name}: {check[:80]}")
                continue
            self.facts.append(Fact("holds", check, subject=name if name and name != check else ""))

    def finish(self, traced: list[types.CodeType], target: Any = None) -> list[Fact]:
        """The facts, once tracing is over: identities fingerprinted (a class by the members the trace
        ran), `target` (a traced function: the frame itself, which no guard names) by its code. Raises
        `Uncheckable` for what no fact can check."""
        traced_ids = {id(c) for c in traced}
        names: dict[int, tuple[type, tuple[str, ...]]] = {}
        facts = list(self.facts)
        for expr, value in [*self._identities, *([("___target", target)] if target is not None else [])]:
            cls = value if isinstance(value, type) else type(value) if _plain_instance(value) else None
            if cls is None:
                facts.append(Fact("is", expr, fingerprint(value, self.covered)))
                continue
            if id(cls) not in names:
                names[id(cls)] = (cls, traced_members(cls, traced_ids))
            chosen = names[id(cls)][1]
            subject = expr if cls is value else f"type({expr})"
            facts.append(Fact("equals", f"___members({subject}, {chosen!r})", members(cls, chosen, self.covered)))
        self.facts = facts
        self.raise_problems(traced)
        return facts

    def per_process_globals(self) -> set[str]:
        """Globals the facts name that Dynamo made up in this process (``_<id>_c0``, ``___module_..._c0``)."""
        exprs = [f.expr for f in self.facts] + [expr for expr, _ in self._identities]
        return {n for expr in exprs for n in _GLOBAL.findall(expr) if _PER_PROCESS.fullmatch(n)}

    def uncovered(self, traced: list[types.CodeType]) -> list[types.CodeType]:
        """Traced code outside torch and the standard library that no fact's fingerprint covers."""
        covered = {id(c) for c in self.covered}
        return [c for c in traced if id(c) not in covered and not library_code(c)]

    def raise_problems(self, traced: list[types.CodeType]) -> None:
        """Raises `Uncheckable` naming what no fact can check (a guard, or traced code nothing reaches)."""
        if self.problems:
            raise Uncheckable(f"a guard cannot be checked in another process ({self.problems[0]})")
        missing = self.uncovered(traced)
        if missing:
            code = missing[0]
            raise Uncheckable(
                f"the code of {code.co_qualname if hasattr(code, 'co_qualname') else code.co_name} "
                f"({code.co_filename}) is traced but reached through nothing its guards name"
            )


#: The failed checks in the text of a guard failure (``GuardDebugInfo(... verbose_code_parts=[...],
#: num_guards_executed=...)``, torch 2.12-2.15).
_FAILED_PARTS = re.compile(r"verbose_code_parts=(\[.*\]),\s*num_guards_executed", re.S)
_LOCAL = re.compile(r"'?L\['args'\]\[(\d+)\]'?|'?L\['kwargs'\]\['([^']*)'\]'?|'?L\['([^']*)'\]'?")
_TENSOR_CHECK = re.compile(r"^tensor (.+?) (\w+ mismatch.*?)\. expected (.*)$")


def refused_input(e: BaseException, positional: list[str]) -> str | None:
    """Which input a loaded compiled function's guards refused, and how, from the failure's text:
    ``argument 'mask': dtype mismatch (expected Float, actual Double)``. `positional` names the
    positional parameters in order (a module's ``forward`` without ``self``). None when the text says
    nothing readable."""
    found = _FAILED_PARTS.search(str(e))
    if found is None:
        return None
    try:
        parts = ast.literal_eval(found.group(1))
    except (ValueError, SyntaxError):
        return None
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        return None

    def name(match: re.Match[str]) -> str:
        index, keyword, local = match.groups()
        if index is not None:
            i = int(index)
            return f"argument {positional[i]!r}" if i < len(positional) else f"positional argument {i}"
        return f"argument {keyword if keyword is not None else local!r}"

    described = []
    for part in parts:
        text = _LOCAL.sub(name, part.strip())
        tensor = _TENSOR_CHECK.match(text)
        described.append(f"{tensor[1]}: {tensor[2]} (expected {tensor[3]})" if tensor else text)
    more = f" (and {len(described) - 1} more)" if len(described) > 1 else ""
    return described[0] + more
