"""Loading a saved `isocache.compile` entry: a warm start, without Dynamo tracing.

A slot's entry is read with one checked read; its configuration, module
structure and recorded facts (`validity.py`) are checked on the call's frame
before anything is loaded; when they do not hold, each variant the entry lists
is tried (one read each), and when none fits, `EntryRefused` names the closest
variant's first failing fact. A fitting entry's compiled function is rebuilt by
torch, and its split graph takes every piece from the tiers it is handed: the
process's memory, the entry's own bundle, then the backend's stores.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from ._torch import dynamo
from .backend import Backend
from .entry import MAX_VARIANTS, Entry, EntryRefused, unpack
from .marking import mark_stacks, unmark_blocks
from .namespace import Namespace
from .report import GraphReport, record_model_load
from .saved_graph import SplitGraphCallable
from .tiers.bundle import BundleTier
from .traced import Call, Slot, Traced
from .validity import Dependencies, describe

__all__ = ["WarmStart", "load"]

logger = logging.getLogger("isocache")


@dataclasses.dataclass(frozen=True)
class _Stale:
    """Why a saved variant does not fit, and how far its check got (the closest variant is reported)."""

    reason: str
    progress: int  # the index of the first fact that failed; -1: its configuration or structure


@dataclasses.dataclass
class WarmStart:
    """A loaded entry, and the seconds of each part of its warm start so far (reported with its first call)."""

    compiled: Any
    parts: dict[str, float]
    report: GraphReport

    def first_call_done(self, seconds: float) -> None:
        """Reports the warm start once its first call returned: one INFO line, and `stats()`."""
        parts = dict(self.parts, first_call=seconds)
        record_model_load(parts)
        logger.info(
            "%s in %.3f s (%s)",
            self.report.summary(),
            sum(parts.values()),
            ", ".join(f"{part.replace('_', ' ')} {value:.3f} s" for part, value in parts.items()),
        )


def load(traced: Traced, call: Call, slot: Slot, backend: Backend, namespace: Namespace, started: float) -> WarmStart:
    """Loads the saved variant that fits `traced` and `call`: the slot's (read since `started`), else
    the first variant it lists whose configuration and recorded facts hold (one more read each).
    Raises `EntryRefused` with the closest variant's reason when none fits."""
    read = time.perf_counter() - started
    manifest = slot.manifest
    assert slot.saved is not None
    entry = unpack(slot.saved)
    closest = _stale(traced, entry, manifest, call)
    if closest is None:
        return _load(traced, entry, backend, namespace, read, time.perf_counter() - started - read)
    others = [str(k) for k in entry.manifest.get("others", [])][:MAX_VARIANTS]
    for key in others:
        hit = slot.entries.get(key)
        if hit is None:
            continue
        try:
            other = unpack(hit.value)
        except EntryRefused:
            continue
        stale = _stale(traced, other, manifest, call)
        if stale is None:
            return _load(traced, other, backend, namespace, read, time.perf_counter() - started - read)
        closest = max(closest, stale, key=lambda s: s.progress)
    also = (
        f" (nor do the {len(others)} other saved variants)"
        if len(others) > 1
        else (" (nor does the other saved variant)" if others else "")
    )
    raise EntryRefused(closest.reason + also)


def _stale(traced: Traced, entry: Entry, manifest: dict[str, str], call: Call) -> _Stale | None:
    """Why `entry` does not fit this model and call (None: it fits): its configuration, its module
    structure, or the first recorded fact that no longer holds."""
    saved = entry.manifest
    for key, what in (("config", "its configuration"), ("structure", "its module structure")):
        if saved.get(key) != manifest[key]:
            return _Stale(f"{what} changed since it was compiled", -1)
    try:
        dependencies = Dependencies.from_bytes(entry.dependencies)
    except ValueError as e:
        raise EntryRefused(f"its record of what it depends on is unreadable ({e})") from None
    stacks = saved.get("marked")
    if isinstance(stacks, list) and stacks and traced.model is not None:
        # As when it was traced (its facts name the marked forwards).
        unequal = mark_stacks(traced.model, stacks)
        if unequal is not None:
            return _Stale(unequal, -1)
    scope = traced.root_globals(saved.get("module_globals", {}))
    try:
        failure = dependencies.first_failure(traced.frame(call), scope, traced.check_scope())
    except (ValueError, EOFError, TypeError) as e:  # a record this Python cannot read
        raise EntryRefused(f"its record of what it depends on is unreadable ({e})") from None
    if failure is None:
        return None
    if stacks and traced.model is not None:
        unmark_blocks(traced.model)  # a trace marks the blocks that are repeated now
    return _Stale(describe(*failure), dependencies.facts.index(failure[0]))


def _load(
    traced: Traced, entry: Entry, backend: Backend, namespace: Namespace, read_seconds: float, verify_seconds: float
) -> WarmStart:
    """Loads an entry whose facts hold: torch rebuilds its function, then its split graph takes each
    piece from memory, the entry's bundle, or the backend's stores."""
    start = time.perf_counter()
    compiled = dynamo.load_compiled_function(
        entry.compiled, traced.load_globals(entry.manifest.get("module_globals", {}))
    )
    split_graph = dynamo.saved_backend_output(compiled)
    if not isinstance(split_graph, SplitGraphCallable):
        raise EntryRefused("its compiled function holds no isocache split graph")
    if split_graph.namespace != namespace.name:
        raise EntryRefused(f"its pieces are of namespace {split_graph.namespace}, not {namespace}")
    loaded = time.perf_counter()
    resolver = backend.resolver(namespace, [BundleTier(entry.bundle)] if entry.bundle else ())
    report = GraphReport(len(split_graph.pieces), "saved", model_name=traced.name)
    split_graph.load_pieces(resolver, report)
    parts = {
        "read": read_seconds,
        "verify": verify_seconds,
        "pieces": time.perf_counter() - loaded,
        "guards": loaded - start,
    }
    return WarmStart(compiled, parts, report)
