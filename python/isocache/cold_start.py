"""Tracing an `isocache.compile` entry once, and saving it: a cold start.

The model is traced through torch's ahead-of-time capture with the isocache
backend (`saved_graph.serializable_backend`) and a guard filter that turns the
guards torch cannot save into facts (`_torch/guards.GuardRecorder`). The entry
is saved only when every fact can be checked in another process and holds on
the model right after tracing; it lists the variants it replaces in its slot.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import time
import types
from typing import Any

import torch
import torch.fx

from . import _core
from ._torch import dynamo, guards
from .backend import Backend
from .entry import MAX_VARIANTS, EntryRefused, pack, unpack
from .marking import marked_stacks
from .saved_graph import SplitGraphCallable, serializable_backend
from .tiers.base_store import Entries
from .traced import Call, Slot, Traced
from .validity import Dependencies, Uncheckable, describe

__all__ = ["trace_and_save"]

logger = logging.getLogger("isocache")


def trace_and_save(traced: Traced, backend: Backend, call: Call, slot: Slot | None) -> Any:
    """Traces `traced` for `call` (raising what Dynamo raises) and saves it in `slot` when it can
    (best effort, one INFO line when its facts cannot be checked elsewhere)."""
    start = time.perf_counter()
    dynamo.note_tracing_started()
    made: list[SplitGraphCallable] = []
    split_graph = serializable_backend(backend)

    def compile_graph(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> SplitGraphCallable:
        made.append(split_graph(gm, example_inputs))
        return made[-1]

    recorder = guards.GuardRecorder()
    traced_code: list[types.CodeType] = []
    compiled = dynamo.aot_compile(
        traced.callable,
        compile_graph,
        dynamic=traced.dynamic,
        args=(*traced.leading, *call.args),
        kwargs=call.kwargs,
        guard_filter=recorder,
        traced_code=traced_code,
    )
    if slot is None:
        return compiled
    module_globals = _module_globals(compiled, recorder.per_process_globals())
    try:
        dependencies = _dependencies(traced, recorder, traced_code, call, module_globals)
    except Uncheckable as e:
        logger.info("isocache: not saving the compiled %s: %s; it is traced again in every process", traced.name, e)
        return compiled
    try:
        pieces = [digest for _, digest in made[-1].pieces] if made else []
        _save(traced, slot, compiled, dependencies, module_globals, pieces, time.perf_counter() - start)
    except Exception as e:  # saving is best effort
        logger.warning("isocache: could not save the compiled %s (%s: %s)", traced.name, type(e).__name__, e)
    return compiled


def _save(
    traced: Traced,
    slot: Slot,
    compiled: Any,
    dependencies: Dependencies,
    module_globals: dict[str, str],
    pieces: list[str],
    seconds: float,
) -> None:
    """Writes the entry: manifest, torch's saved function, the dependency record, and a copy of each
    distinct piece (`pieces`: each compiled piece's digest, for ``python -m isocache explain``)."""
    with tempfile.TemporaryDirectory(prefix="isocache-") as tmp:
        path = os.path.join(tmp, "compiled.bin")
        compiled.save_compiled_function(path)
        with open(path, "rb") as f:
            data = f.read()
    manifest = slot.manifest
    variant = _core.blake3_hex(
        f"{slot.key}:{manifest['config']}:{manifest['structure']}:{dependencies.digest()}".encode()
    )
    saved = dict(
        manifest,
        module_globals=module_globals,
        model=traced.name,
        pieces=pieces,
        variant=variant,
        marked=marked_stacks(traced.model) if traced.model is not None else [],
        others=_keep_previous(slot.saved, variant, slot.entries),
    )
    entries = slot.entries
    bundle = {d: (hit.value, hit.compile_seconds) for d in dict.fromkeys(pieces) if (hit := entries.peek(d))}
    entries.put(slot.key, pack(saved, data, dependencies.to_bytes(), bundle), seconds, kind="model")


def _module_globals(compiled: Any, also: set[str]) -> dict[str, str]:
    """Module objects Dynamo bound as globals named by their id in this process
    (``___module_collections_<id>_c0``, and `also`: such names the recorded facts use): the
    loading process binds them again."""
    wanted, scopes = dynamo.module_globals_wanted(compiled)
    wanted |= also
    found: dict[str, str] = {}
    for scope in scopes + [vars(m) for m in list(sys.modules.values()) if m is not None]:
        for name in wanted - found.keys():
            value = scope.get(name)
            if isinstance(value, types.ModuleType):
                found[name] = value.__name__
        if len(found) == len(wanted):
            break
    return found


def _dependencies(
    traced: Traced,
    recorder: guards.GuardRecorder,
    traced_code: list[types.CodeType],
    call: Call,
    module_globals: dict[str, str],
) -> Dependencies:
    """What the trace depended on, as facts checked once here, against the model they were recorded
    on. Raises `Uncheckable` for anything another process could not check."""
    facts = recorder.finish(traced_code, traced.function)
    unbound = recorder.per_process_globals() - module_globals.keys()
    if unbound:
        raise Uncheckable(f"a guard names {sorted(unbound)[0]}, a global of this process that is not a module")
    dependencies = Dependencies(facts)
    failure = dependencies.first_failure(traced.frame(call), traced.root_globals(module_globals), traced.check_scope())
    if failure is not None:
        raise Uncheckable(f"its recorded facts do not hold right after tracing ({describe(*failure)})")
    return dependencies


def _keep_previous(previous: bytes | None, variant: str, entries: Entries) -> list[str]:
    """The variants a new entry lists after itself: the one it replaces in the slot (kept under its own
    key) and those that one listed, newest first, at most `MAX_VARIANTS` in all."""
    if previous is None:
        return []
    try:
        entry = unpack(previous)
    except (EntryRefused, ValueError):
        return []
    own = entry.manifest.get("variant")
    others = [str(k) for k in entry.manifest.get("others", [])]
    if isinstance(own, str) and own != variant:
        entries.put(own, previous, 0.0, kind="model")
        others.insert(0, own)
    return [k for k in dict.fromkeys(others) if k != variant][: MAX_VARIANTS - 1]
