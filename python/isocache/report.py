"""Compile events, per-graph summaries and the process counters.

Every piece ends in `GraphReport.piece()`'s exit, whatever path it took and
whether it returned or raised; that exit records the event, bumps the
counters and, after the last piece of a graph, logs the one summary line.
The path itself is decided by the resolver (`resolver.py`); the exit only
marks a piece whose block raised as FAILED.

The process counters are a typed `Counters` (`counters.snapshot()`), bumped
under a lock as things happen; `stats()` is their dict, and
`counters.expect(compiled=3, ...)` asserts the changes a block makes (tests).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import enum
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any, Callable

__all__ = [
    "WARM_PARTS",
    "CompileEvent",
    "Counters",
    "GraphReport",
    "Path",
    "ProcessCounters",
    "counters",
    "expect",
    "is_dynamo_restart",
    "record_model_load",
    "record_trace",
    "reset_stats",
    "stats",
]

logger = logging.getLogger("isocache")


class Path(str, enum.Enum):
    """How a piece got its callable."""

    COMPILE = "compile"
    LOAD = "load"
    REUSE = "reuse"
    FAILED = "failed"


@dataclasses.dataclass
class CompileEvent:
    piece_index: int
    num_pieces: int
    compile_range: str
    digest: str = ""
    path: Path = Path.FAILED
    seconds: float = 0.0
    wait_seconds: float = 0.0
    digest_seconds: float = 0.0
    reason: str | None = None
    #: For a LOAD: the compile seconds the stored artifact took (time saved).
    saved_seconds: float = 0.0
    #: Dynamo asked to trace the frame again; the piece is not counted.
    restarted: bool = False


@dataclasses.dataclass
class Counters:
    """Counts (ints) and seconds (floats) of this process; `stats()` is its dict."""

    graphs: int = 0
    pieces: int = 0
    compiled: int = 0
    loaded: int = 0
    reused: int = 0
    failed: int = 0
    quarantined: int = 0
    remote_hits: int = 0
    remote_misses: int = 0
    remote_errors: int = 0
    models_loaded: int = 0
    #: Compile worker processes this process started (each a whole interpreter: memory).
    workers_started: int = 0
    compile_seconds: float = 0.0
    load_seconds: float = 0.0
    digest_seconds: float = 0.0
    trace_seconds: float = 0.0
    #: Wall-clock seconds from each graph's arrival to its last piece's exit, summed over graphs: the
    #: figure of each graph's INFO line (``... in 6.272 s``), whatever ran in parallel inside it.
    graph_seconds: float = 0.0
    #: A warm `isocache.compile` start, by part: reading its entry, checking it against the model,
    #: loading its pieces, Dynamo's guards and bytecode, and the first call.
    warm_read_seconds: float = 0.0
    warm_verify_seconds: float = 0.0
    warm_pieces_seconds: float = 0.0
    warm_guards_seconds: float = 0.0
    warm_first_call_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Field -> value, counts as ints and seconds as floats (the shape of `stats()`)."""
        return {
            f.name: (float if isinstance(f.default, float) else int)(getattr(self, f.name))
            for f in dataclasses.fields(self)
        }

    def minus(self, before: Counters) -> Counters:
        """The change from `before` to this."""
        return Counters(**{f.name: getattr(self, f.name) - getattr(before, f.name) for f in dataclasses.fields(self)})


COUNTER_NAMES = tuple(f.name for f in dataclasses.fields(Counters))
_PATH_COUNTER = {Path.COMPILE: "compiled", Path.LOAD: "loaded", Path.REUSE: "reused", Path.FAILED: "failed"}

#: The tallies open in this context (`ProcessCounters.tally`): each also receives every bump.
_tallies: contextvars.ContextVar[tuple[Counters, ...]] = contextvars.ContextVar("isocache_tallies", default=())


class ProcessCounters:
    """The process's `Counters` behind a lock: bumped as things happen, read as snapshots."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values = Counters()

    def bump(self, **deltas: float) -> None:
        """Adds `deltas` (``compiled=1``, ``load_seconds=0.2``); an unknown name is an error."""
        unknown = set(deltas) - set(COUNTER_NAMES)
        if unknown:
            raise AttributeError(f"no such isocache counter: {', '.join(sorted(unknown))}")
        tallies = _tallies.get()
        with self._lock:
            for target in (self._values, *tallies):
                for name, delta in deltas.items():
                    setattr(target, name, getattr(target, name) + delta)

    def snapshot(self) -> Counters:
        with self._lock:
            return dataclasses.replace(self._values)

    def reset(self) -> None:
        with self._lock:
            self._values = Counters()

    @contextlib.contextmanager
    def tally(self) -> Iterator[Counters]:
        """Counts what this thread (this context) bumps inside the block, in a `Counters` of its own."""
        mine = Counters()
        token = _tallies.set((*_tallies.get(), mine))
        try:
            yield mine
        finally:
            _tallies.reset(token)

    @contextlib.contextmanager
    def expect(self, **deltas: float | Callable[[float], bool]) -> Iterator[None]:
        """Asserts that the block changes each named counter by exactly that much.

        In the style of vLLM's ``compilation_counter.expect``::

            with counters.expect(compiled=3, loaded=0, remote_errors=lambda d: d >= 1):
                model(x)

        A callable is a predicate on the change. Counters not named are not checked.
        """
        unknown = set(deltas) - set(COUNTER_NAMES)
        if unknown:
            raise AttributeError(f"no such isocache counter: {', '.join(sorted(unknown))}")
        before = self.snapshot()
        yield
        change = self.snapshot().minus(before)
        wrong = []
        for name, want in deltas.items():
            got = getattr(change, name)
            if not (want(got) if callable(want) else got == want):
                shown = "a change that satisfies the predicate" if callable(want) else repr(want)
                wrong.append(f"{name}: expected {shown}, got {got!r}")
        if wrong:
            raise AssertionError("isocache counters changed otherwise than expected: " + "; ".join(wrong))


#: This process's counters.
counters = ProcessCounters()


def reset_stats() -> None:
    """Sets every counter of this process back to zero."""
    counters.reset()


def stats() -> dict[str, Any]:
    """The counters of this process (integers for counts, floats for seconds)."""
    return counters.snapshot().as_dict()


def expect(**deltas: float | Callable[[float], bool]) -> contextlib.AbstractContextManager[None]:
    """`counters.expect`: asserts the changes a block makes to this process's counters."""
    return counters.expect(**deltas)


def _bump(**deltas: float) -> None:
    counters.bump(**deltas)


#: The parts of a warm start, in order, as `record_model_load` takes them.
WARM_PARTS = ("read", "verify", "pieces", "guards", "first_call")


def record_model_load(seconds: dict[str, float]) -> None:
    """A saved compiled model was loaded without tracing and called once; `seconds` by `WARM_PARTS` name."""
    _bump(models_loaded=1, **{f"warm_{part}_seconds": seconds.get(part, 0.0) for part in WARM_PARTS})


def record_trace(seconds: float) -> None:
    """Seconds Dynamo spent tracing a frame before handing its graph to isocache."""
    _bump(trace_seconds=seconds)


def _pieces(n: int) -> str:
    return f"{n} piece" if n == 1 else f"{n} pieces"


def is_dynamo_restart(e: BaseException) -> bool:
    """Dynamo asks to trace the frame again (for example to specialize float inputs)."""
    from ._torch.dynamo import is_restart  # lazily: the command line imports this module without torch

    return is_restart(e)


class GraphReport:
    """Collects the events of one Dynamo graph and emits its summary."""

    def __init__(
        self, num_pieces: int, compile_range: str, model_name: str | None = None, trace_seconds: float | None = None
    ) -> None:
        self.num_pieces = num_pieces
        self.compile_range = compile_range
        #: Seconds Dynamo traced the frame before isocache got its graph (None: not known).
        self.trace_seconds = trace_seconds
        #: Set when a saved compiled model loads: its summary says tracing was skipped.
        self.model_name = model_name
        self.events: list[CompileEvent] = []
        self.started = time.perf_counter()
        #: Seconds from `started` to the last piece's exit, once it exited (the summary's figure).
        self.elapsed: float | None = None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def piece(self, piece_index: int) -> Iterator[CompileEvent]:
        """The one exit of a piece: yields its event; records it however the block ends."""
        event = CompileEvent(piece_index, self.num_pieces, self.compile_range)
        start = time.perf_counter()
        try:
            yield event
        except BaseException as e:
            event.path = Path.FAILED
            event.reason = event.reason or f"{type(e).__name__}: {e}"
            event.restarted = is_dynamo_restart(e)
            raise
        finally:
            event.seconds = time.perf_counter() - start
            self._finish(event)

    def _finish(self, event: CompileEvent) -> None:
        if event.restarted:
            logger.debug(
                "isocache: piece %d/%d: Dynamo restarts the analysis of this frame (%s)",
                event.piece_index + 1,
                event.num_pieces,
                event.reason,
            )
            return
        deltas: dict[str, float] = {"pieces": 1, _PATH_COUNTER[event.path]: 1, "digest_seconds": event.digest_seconds}
        if event.path is Path.COMPILE:
            deltas["compile_seconds"] = event.seconds
        elif event.path is Path.LOAD:
            deltas["load_seconds"] = event.seconds
        with self._lock:
            self.events.append(event)
            last = len(self.events) == self.num_pieces
        if last:
            self.elapsed = time.perf_counter() - self.started
            deltas |= {"graphs": 1, "graph_seconds": self.elapsed}
        _bump(**deltas)
        logger.debug(
            "isocache: piece %d/%d %s %s in %.3f s%s%s",
            event.piece_index + 1,
            event.num_pieces,
            event.path.value,
            event.digest[:16],
            event.seconds,
            f" (waited {event.wait_seconds:.3f} s)" if event.wait_seconds else "",
            f": {event.reason}" if event.reason else "",
        )
        if last and self.model_name is None:  # a loaded model's line comes after its first call
            logger.info(self.summary())

    def count(self, path: Path) -> int:
        return sum(1 for e in self.events if e.path is path)

    def summary(self) -> str:
        compiled, loaded = self.count(Path.COMPILE), self.count(Path.LOAD)
        reused, failed = self.count(Path.REUSE), self.count(Path.FAILED)
        failed_text = f", {failed} failed" if failed else ""
        elapsed = self.elapsed if self.elapsed is not None else time.perf_counter() - self.started
        if self.model_name is not None:
            return (
                f"isocache: loaded compiled model {self.model_name}: {_pieces(self.num_pieces)} "
                f"({loaded} loaded, {reused} reused{failed_text}), tracing skipped"
            )
        traced = f" after {self.trace_seconds:.3f} s of Dynamo tracing" if self.trace_seconds is not None else ""
        return (
            f"isocache: compile range {self.compile_range}: {_pieces(self.num_pieces)} "
            f"({compiled} compiled, {loaded} loaded, {reused} reused{failed_text}) "
            f"in {elapsed:.3f} s{traced}"
        )
